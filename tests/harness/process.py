"""Commands, tools and waiting: what every other part of the harness stands on."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, TypeVar

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)  # the venv's bin: snapengine, elioctl, update-img
IN_CI = os.environ.get("CI") == "true"
POLL_INTERVAL = 0.05  # seconds between two looks at a condition
STOP_TIMEOUT = 60.0  # seconds for a process to exit after SIGTERM, before SIGKILL

T = TypeVar("T")


class CommandFailed(AssertionError):
    """A command exited with a non-zero status; the message holds its output's tail."""


def require(*tools: str) -> None:
    """Skip when a tool is missing on a developer's machine; fail in CI."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        if IN_CI:
            pytest.fail(f"missing in CI: {', '.join(missing)}")
        pytest.skip(f"missing: {', '.join(missing)}")


def require_root_devices() -> None:
    """FUSE and loop devices (root only)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    if not os.path.exists("/dev/fuse"):
        problems.append("no /dev/fuse")
    if not os.path.exists("/dev/loop-control"):
        problems.append("no loop devices")
    if problems:
        if IN_CI:
            pytest.fail("; ".join(problems))
        pytest.skip("; ".join(problems))


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something true, and return that; raise
    TimeoutError naming ``what`` after ``timeout`` seconds. The predicate may raise to
    give up early (a process it waits for has exited, say)."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_INTERVAL)
    return result


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion, output captured as text; CommandFailed if ``check``
    and it exits non-zero."""
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise CommandFailed(f"{' '.join(map(str, cmd))} exited {r.returncode}\n"
                            f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-4000:]}")
    return r


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM,
                 timeout: float = STOP_TIMEOUT) -> int:
    """Send ``sig``, wait; SIGKILL only if it does not exit in ``timeout`` seconds (then
    TimeoutExpired is raised, once it is gone). Returns the exit status."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def log_tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""
