"""The freeze guard: a small process that freezes file systems and always thaws them.

    python3 freezeguard.py TIMEOUT MOUNTPOINT...

Run by the daemon (freeze.py) around a snapshot point. It freezes each mount point
(FIFREEZE, in the order given), says ``frozen`` on stdout (or ``error ERRNO MESSAGE``,
after thawing what it froze), then thaws them all (FITHAW, the reverse order) at the
first of: a line on stdin (the snapshot point is set), the end of stdin (the daemon
died: its pipe closed), or TIMEOUT seconds (the watchdog). It says ``thawed`` or
``thawed-by-watchdog`` and exits. Being its own process is what lets it keep the
promise when the daemon is killed; it imports only the standard library, so any
Python 3 runs it as a plain script.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import sys

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)


def freeze(points: list[str]) -> list[int]:
    """Freeze every mount point; on a failure thaw those done and raise OSError."""
    done: list[int] = []
    try:
        for point in points:
            fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, FIFREEZE, 0)
            except OSError as e:
                os.close(fd)
                raise OSError(e.errno, f"cannot freeze {point}: {e.strerror}")
            done.append(fd)
    except BaseException:
        thaw(done)
        raise
    return done


def thaw(fds: list[int]) -> None:
    for fd in reversed(fds):
        try:
            fcntl.ioctl(fd, FITHAW, 0)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: not frozen (any more)
                print(f"warning cannot thaw fd {fd}: {e.strerror}", flush=True)
        os.close(fd)


def wait_for_release(timeout: float) -> bool:
    """True when told (a line, or the end of stdin), False after ``timeout`` seconds."""
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    return bool(ready)


def main(argv: list[str]) -> int:
    timeout, points = float(argv[0]), argv[1:]
    try:
        fds = freeze(points)
    except OSError as e:
        print(f"error {e.errno or errno.EIO} {e.strerror or e}", flush=True)
        return 1
    print("frozen", flush=True)
    told = wait_for_release(timeout)
    thaw(fds)
    print("thawed" if told else "thawed-by-watchdog", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
