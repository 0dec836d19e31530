"""What the measurement scripts share: a daemon to start and stop, NBD helpers, files."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import nbd

BIN = os.path.dirname(sys.executable)  # the venv's bin: snapengine, elioctl, update-img
BLOCK = 4096
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
WINDOW = 32  # NBD requests in flight
START_TIMEOUT = 30.0  # seconds for the daemon's control socket to answer
STOP_TIMEOUT = 120.0  # seconds for a clean shutdown


def run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


@dataclass
class Daemon:
    run_dir: str
    proc: subprocess.Popen

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.run_dir}/nbd.sock"

    @property
    def ctl(self) -> str:
        return os.path.join(self.run_dir, "ctl.sock")

    @property
    def pid(self) -> int:
        """The nbdkit process (the daemon proper)."""
        with open(os.path.join(self.run_dir, "nbdkit.pid")) as f:
            return int(f.read())

    def command(self, tool: str, *args: str) -> list[str]:
        return [os.path.join(BIN, tool), "--run-dir", self.run_dir, *args]

    def elioctl(self, *args: str) -> str:
        return run(self.command("elioctl", *args))


def sparse_file(path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@contextmanager
def workdir(parent: str | None) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="snapengine-bench-", dir=parent or "/var/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def control_socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


@contextmanager
def serving(run_dir: str, origins: list[tuple[str, str]]) -> Iterator[Daemon]:
    """``snapengine serve`` in the foreground; SIGTERM (clean shutdown) at the end."""
    os.makedirs(run_dir)
    cmd = [os.path.join(BIN, "snapengine"), "serve", "--run-dir", run_dir]
    cmd += [f"--origin={path}={name}" for path, name in origins]
    with open(os.path.join(run_dir, "serve.out"), "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not control_socket_answers(os.path.join(run_dir, "ctl.sock")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start (see {run_dir}/serve.out)")
            time.sleep(0.05)
        yield Daemon(run_dir, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def connected(uri: str) -> Iterator[nbd.NBD]:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        yield h
    finally:
        h.shutdown()


def retire_one(h: nbd.NBD) -> None:
    """Wait for one command to complete; raise if it failed."""
    while (cookie := h.aio_peek_command_completed()) == 0:
        h.poll(-1)
    h.aio_command_completed(cookie)
