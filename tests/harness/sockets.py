"""Unix sockets: does anyone answer, and waiting until a server does."""

from __future__ import annotations

import os
import socket
import subprocess
import time

from .process import POLL_INTERVAL, log_tail

START_TIMEOUT = 30.0  # seconds for a server to answer on its socket


class ServerStartError(RuntimeError):
    """A server exited, or did not answer in time; the message has its log's tail."""


def socket_answers(path: str) -> bool:
    """Someone accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def control_answers(path: str) -> bool:
    """The control socket ``path`` serves a request (it may be up yet refuse with
    EAGAIN while all its connection slots are taken)."""
    from snapengine.client import request
    try:
        request(path, "get-free-minor")
        return True
    except OSError:
        return False


def remove_stale_socket(path: str) -> None:
    """A killed server leaves its socket behind: remove it if nobody answers on it."""
    if os.path.lexists(path) and not socket_answers(path):
        os.unlink(path)


def wait_socket(path: str, proc: subprocess.Popen, name: str, log: str,
                timeout: float = START_TIMEOUT) -> None:
    """Wait until ``path`` answers; ServerStartError if ``proc`` exits first or the
    time runs out."""
    deadline = time.monotonic() + timeout
    while not socket_answers(path):
        if proc.poll() is not None:
            raise ServerStartError(f"{name} exited with status {proc.returncode}:\n"
                                   f"{log_tail(log)}")
        if time.monotonic() > deadline:
            raise ServerStartError(f"{name} did not answer on {path} within {timeout:.0f} s:"
                                   f"\n{log_tail(log)}")
        time.sleep(POLL_INTERVAL)


def free_tcp_port() -> int:
    """A TCP port of 127.0.0.1 free now (for --tcp, --metrics)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
