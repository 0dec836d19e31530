"""A served origin: the disk every write goes to, and the gate tracking hangs on.

Every mutation (write, trim, zero) passes through ``Origin``: it enters the write
gate, lets the current tracker (if any) save or record the blocks it is about to
touch, then changes the origin. Swapping the tracker (setup, transitions, destroy)
closes the gate, which waits for the writes in flight and holds new ones back for
the instant of the swap; so each write is wholly before or wholly after a snapshot
point, never across it.

The origin never loses a write: a tracker failure fails the snapshot, never the
write (trackers do not raise from ``before_write``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections import deque
from contextlib import contextmanager
from typing import Iterator, Protocol

from .errors import SnapError
from .fileio import FileIO
from .units import BLOCK_SHIFT, BLOCK_SIZE

TRIM = "trim"  # the kinds of change before_change is told of
ZERO = "zero"


class Tracker(Protocol):
    def before_write(self, first: int, end: int) -> None:
        """Make blocks [first, end) safe to overwrite. Never raises."""

    def before_change(self, first: int, end: int, kind: str) -> bool:
        """The same for a trim or write-zeroes (``kind``, tracker.TRIM or ZERO); False:
        the origin must not apply it (a trim during a snapshot). Never raises."""


class WriteGate:
    """Counts mutations in flight; ``closed()`` drains them and holds new ones back.

    The fast path takes no lock: ``deque.append``/``pop`` are atomic in CPython, and
    each side publishes before it looks (a writer appends, then checks ``_closed``; a
    closer sets ``_closed``, then checks the count), so a writer either is counted
    before the closer looks, or sees the gate closed and backs off until it reopens.
    A lock on the fast path made writers convoy behind the GIL.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._inflight: deque[None] = deque()
        self._closed = False
        self._shut = False  # for good: the daemon is shutting down

    def enter(self) -> None:
        while True:
            self._inflight.append(None)
            if not self._closed:
                return
            self.leave()  # a swap is under way: back off until it is done
            with self._cond:
                while self._closed and not self._shut:
                    self._cond.wait()
                if self._shut:
                    raise SnapError(errno.ESHUTDOWN, "the daemon is shutting down: "
                                    "writes are no longer accepted")

    def shut(self) -> None:
        """Drain the writes in flight and refuse every later one (ESHUTDOWN)."""
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._closed = self._shut = True
            while self._inflight:
                self._cond.wait()

    def leave(self) -> None:
        self._inflight.pop()
        if self._closed:
            with self._cond:
                self._cond.notify_all()

    @contextmanager
    def closed(self) -> Iterator[None]:
        with self._cond:
            while self._closed and not self._shut:  # one swap at a time
                self._cond.wait()
            if self._shut:  # never reopens: a swap would wait for ever
                raise SnapError(errno.ESHUTDOWN, "the daemon is shutting down")
            self._closed = True
            while self._inflight:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._closed = False
                self._cond.notify_all()


def open_exclusive(path: str, opener=FileIO.open) -> FileIO:
    """Open an origin read-write so nothing else can write it while it is served."""
    if os.path.isdir(path):
        raise SnapError(errno.EISDIR, f"origin {path} is a directory")
    try:
        is_block = os.path.exists(path) and os.stat(path).st_mode & 0o170000 == 0o060000
        io = opener(path, os.O_RDWR | (os.O_EXCL if is_block else 0))
    except OSError as e:
        raise SnapError(e.errno or errno.EIO, f"cannot open origin {path}: {e.strerror}")
    if not io.is_block:
        try:
            fcntl.flock(io.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            io.close()
            raise SnapError(errno.EBUSY, f"origin {path} is locked by another process")
    return io


class Origin:
    """One origin: its file, its name, its clients and its tracker."""

    def __init__(self, path: str, name: str, io: FileIO) -> None:
        self.path = path
        self.name = name
        self.io = io
        self.size = io.size()
        self.identity = io.identity()
        self.gate = WriteGate()
        self.tracker: Tracker | None = None
        self.clients = 0  # open NBD connections on this origin's export
        self.minor: int | None = None  # the minor tracking it, if any

    @property
    def real_path(self) -> str:
        return os.path.realpath(self.path)

    def pread(self, buf, offset: int) -> None:
        if self.io.pread_into(buf, offset) != len(buf):
            raise SnapError(errno.EIO, f"short read from origin {self.path} at {offset}")

    def pwrite(self, buf, offset: int, fua: bool) -> None:
        gate = self.gate
        gate.enter()
        try:
            tracker = self.tracker
            if tracker is not None:
                tracker.before_write(offset >> BLOCK_SHIFT,
                                     (offset + len(buf) + BLOCK_SIZE - 1) >> BLOCK_SHIFT)
            if fua:
                self.io.pwrite_dsync(buf, offset)
            else:
                self.io.pwrite(buf, offset)  # through the FileIO seam (faults, power cuts)
        finally:
            gate.leave()

    def zero(self, length: int, offset: int, may_trim: bool, fua: bool) -> None:
        self._change(length, offset, lambda: self.io.zero(offset, length, may_trim), fua, ZERO)

    def trim(self, length: int, offset: int, fua: bool) -> None:
        self._change(length, offset, lambda: self.io.punch(offset, length), fua, TRIM)

    def _change(self, length: int, offset: int, apply, fua: bool, kind: str) -> None:
        self.gate.enter()
        try:
            tracker = self.tracker
            if tracker is not None and not tracker.before_change(
                    offset >> BLOCK_SHIFT, (offset + length + BLOCK_SIZE - 1) >> BLOCK_SHIFT,
                    kind):
                return  # dropped (a trim during a snapshot: the content stays)
            apply()
            if fua:
                self.io.fdatasync()
        finally:
            self.gate.leave()

    def flush(self) -> None:
        self.io.fdatasync()

    def close(self) -> None:
        self.io.close()


class AbsentOrigin(Origin):
    """A registered minor's origin that this daemon does not serve (now)."""

    def __init__(self, path: str) -> None:  # no file: nothing can be written through it
        self.path = self.name = path
        self.size = 0
        self.identity = (-1, -1)
        self.clients = 0
        self.minor = None
        self.tracker = None

    def close(self) -> None:
        pass
