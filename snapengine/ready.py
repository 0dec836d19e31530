"""When the daemon is ready, and telling systemd so.

Ready means both sockets answer: the control socket replies to a request (it is opened
only once every origin is open and every minor of the registry resumed, in nbdkit's
get_ready), and the NBD socket completes an NBD handshake. ``snapengine serve`` waits
for that before it sends READY=1 to systemd (Type=notify, through sdnotify) and before
``--daemon`` returns. STOPPING=1 is sent when a signal starts the clean shutdown.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Callable

import sdnotify

from .client import request
from .errors import SnapError
from .rundir import RunDir

START_TIMEOUT = 30.0  # seconds the daemon gets to open both sockets
POLL = 0.1


def nbd_answers(path: str) -> bool:
    """An NBD handshake on the Unix socket ``path`` completes (then is abandoned)."""
    import nbd  # python3-libnbd, only needed here

    h = nbd.NBD()  # closed when collected (libnbd 1.14 has no close())
    try:
        h.set_opt_mode(True)
        h.connect_unix(path)
        h.opt_abort()
        return True
    except nbd.Error:
        return False


def ctl_answers(path: str) -> bool:
    try:
        request(path, "info")
        return True
    except SnapError:
        return False


def wait(run_dir: RunDir, exited: Callable[[], int | None], log: str,
         timeout: float = START_TIMEOUT) -> None:
    """Return once both sockets answer; SnapError if the daemon exits (``exited()``
    gives its status) or does not get there within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = exited()
        if status is not None:
            raise SnapError(errno.EIO, f"the daemon exited with status {status}; see {log}")
        if ctl_answers(run_dir.ctl_socket) and nbd_answers(run_dir.nbd_socket):
            return
        time.sleep(POLL)
    raise SnapError(errno.ETIMEDOUT, f"the daemon did not answer on {run_dir.ctl_socket} "
                    f"and {run_dir.nbd_socket} within {timeout:.0f} s; see {log}")


def notify(state: str) -> None:
    """Tell the service manager ``state`` (READY=1, STOPPING=1); nothing without one."""
    if os.environ.get("NOTIFY_SOCKET"):
        sdnotify.SystemdNotifier().notify(state)
