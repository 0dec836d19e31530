"""--freeze: file systems frozen (FIFREEZE) just before a snapshot point, thawed just after.

The daemon freezes, not elioctl: the daemon sets the point (the write gates) and stays
for all of it, so a killed or interrupted elioctl changes nothing. The freezing itself
is done by a guard process (freezeguard.py) that thaws when told, when the daemon's
pipe to it closes (the daemon died, even by kill -9), or after FREEZE_LIMIT seconds
(the watchdog), whichever comes first; the daemon also thaws directly if the guard
itself dies. docs/design.md ("One snapshot point for several origins") says why.

A file system to freeze must not hold what the snapshot point writes (a COW file, the
registry) or the file of an origin whose gate it closes: those writes would wait for
the thaw, and the point for them. ``check_mounts`` refuses that (EINVAL), before
anything is frozen.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import subprocess
from contextlib import contextmanager
from typing import Iterable, Iterator

from . import freezeguard
from .errors import SnapError

log = logging.getLogger(__name__)

FREEZE_LIMIT = 30.0  # seconds a file system may stay frozen, at most
PYTHON = "/usr/bin/python3"  # the guard needs only the standard library
GUARD = os.path.abspath(freezeguard.__file__)


def check_mounts(points: Iterable[str], written: Iterable[str]) -> list[str]:
    """The mount points to freeze, resolved; EINVAL for one that is not a mount point,
    one given twice, or one whose file system holds a path in ``written`` (what the
    snapshot point writes or waits for)."""
    out: list[str] = []
    devices: dict[int, str] = {}
    for point in points:
        real = os.path.realpath(point)
        if not os.path.isabs(point) or not os.path.ismount(real):
            raise SnapError(errno.EINVAL, f"--freeze {point}: not a mount point")
        if real in out:
            raise SnapError(errno.EINVAL, f"--freeze {point}: given twice")
        out.append(real)
        devices[os.stat(real).st_dev] = point
    for path in written:
        where = os.stat(os.path.dirname(path) or ".").st_dev
        if where in devices:
            raise SnapError(errno.EINVAL, f"--freeze {devices[where]} would freeze {path}, "
                            "which the snapshot point writes or waits for")
    return out


@contextmanager
def frozen(points: list[str], limit: float = FREEZE_LIMIT) -> Iterator[None]:
    """Hold ``points`` frozen for the body (nothing if empty); thawed on every path."""
    if not points:
        yield
        return
    guard = subprocess.Popen([PYTHON, GUARD, str(limit), *points], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, close_fds=True)
    try:
        _started(guard, points, limit)
    except _Refused:  # the guard thawed what it froze, and exits: nothing else to undo
        guard.wait()
        raise
    except BaseException:
        _end(guard, points, limit)
        raise
    log.info("froze %s", " ".join(points))
    try:
        yield
    finally:
        _end(guard, points, limit)


class _Refused(SnapError):
    """The guard could not freeze (it says why); it thawed what it had frozen."""


def _started(guard: subprocess.Popen, points: list[str], limit: float) -> None:
    """Wait for the guard's first word: frozen, or why not (_Refused; SnapError if it
    says nothing sensible in time)."""
    assert guard.stdout is not None
    ready, _, _ = select.select([guard.stdout], [], [], limit)
    line = guard.stdout.readline().strip() if ready else ""
    if line == "frozen":
        return
    parts = line.split(" ", 2)
    if len(parts) == 3 and parts[0] == "error" and parts[1].isdecimal():
        raise _Refused(int(parts[1]), parts[2])
    raise SnapError(errno.EIO, f"cannot freeze {' '.join(points)}: the freeze guard "
                    f"answered {line!r}" if line else "the freeze did not complete in time")


def _end(guard: subprocess.Popen, points: list[str], limit: float) -> None:
    """Tell the guard to thaw and wait for it; if it is gone or stuck, thaw directly."""
    assert guard.stdin is not None and guard.stdout is not None
    try:
        guard.stdin.write("thaw\n")
        guard.stdin.close()
    except OSError:
        pass
    try:
        said = guard.stdout.readline().strip()
        guard.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        said = ""
        guard.kill()
        guard.wait()
    if said == "thawed":
        log.info("thawed %s", " ".join(points))
        return
    if said == "thawed-by-watchdog":
        log.warning("%s stayed frozen for the %.0f s limit and were thawed before the "
                    "snapshot point was done", " ".join(points), limit)
        return
    log.error("the freeze guard of %s ended without thawing (%r): thawing directly",
              " ".join(points), said)
    thaw_directly(points)


def thaw_directly(points: list[str]) -> None:
    for point in reversed(points):
        try:
            fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            log.error("cannot open %s to thaw it: %s", point, e.strerror)
            continue
        try:
            fcntl.ioctl(fd, freezeguard.FITHAW, 0)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: not frozen
                log.error("cannot thaw %s: %s", point, e.strerror)
        finally:
            os.close(fd)
