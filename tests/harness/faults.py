"""A file I/O layer that fails on purpose: EIO, ENOSPC and short writes at exact points.

``FaultPlan.opener`` is handed to the engine in place of ``FileIO.open`` (``Engine(...,
opener=plan.opener)``). Every file it opens is a real file (``FaultyIO``, a ``FileIO``);
on the files whose path matches the plan's pattern, the faults added with
``plan.inject`` fire::

    plan = FaultPlan("*/cow1")                   # fnmatch on the absolute path
    plan.inject("pwrite", errno.EIO)             # the next COW pwrite fails, once
    plan.inject("pwrite", errno.ENOSPC, short=True, after=3, times=None)
                                                 # from the 4th pwrite on: part written, then ENOSPC
    plan.inject("fsync", errno.EIO, probability=0.1, times=None)   # at random (seeded)

Operations are ``pwrite`` (pwrite and pwrite_dsync), ``pread`` (pread and pread_into)
and ``fsync`` (fsync and fdatasync). ``after=N`` lets N matching operations through,
counted from the moment the fault is injected; ``times`` is how often it fires (None:
every time from then on). A short write writes the first half of the buffer (at least
one byte) to the file, then raises, as a disk that fills up mid-request does.

Nothing here replaces a method of the engine: the engine calls ``FileIO`` methods as
usual, and this subclass decides whether the kernel is asked at all. Every fault that
fired is in ``plan.fired``, so a test can check that it hit the COW file and never the
origin.

Races are staged with hooks, which never fail an operation, only see it (and may make
its thread wait), on any file, the origin included::

    plan.hook("pread", pause_the_reader, pattern=origin_path)
    # pause_the_reader(io, op, offset, length) runs in the thread doing the pread
"""

from __future__ import annotations

import errno as errnos
import fnmatch
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

from snapengine.fileio import FileIO

OPS = ("pwrite", "pread", "fsync")


@dataclass
class Fault:
    """One planned failure of one kind of operation."""

    op: str  # "pwrite", "pread" or "fsync"
    errno: int = errnos.EIO
    after: int = 0  # matching operations let through first
    times: int | None = 1  # how many times it fires; None: for ever
    probability: float = 1.0  # once due, chance of firing on each operation
    short: bool = False  # pwrite only: write part of the buffer, then raise
    seen: int = 0  # matching operations counted so far
    fired: int = 0

    def due(self, rng: random.Random) -> bool:
        self.seen += 1
        if self.seen <= self.after:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        if self.probability < 1.0 and rng.random() >= self.probability:
            return False
        self.fired += 1
        return True


@dataclass(frozen=True)
class Fired:
    """A fault that happened: on which file, which operation, where."""

    path: str
    op: str
    errno: int
    offset: int | None
    length: int | None
    written: int = 0  # bytes a short write did put in the file


class FaultPlan:
    """Which files fail (``pattern``, an fnmatch pattern on the path), how and when.

    Thread-safe: the engine does I/O from many threads at once."""

    def __init__(self, pattern: str, seed: int = 0) -> None:
        self.pattern = pattern
        self.faults: list[Fault] = []
        self.fired: list[Fired] = []
        self.counts = {op: 0 for op in OPS}  # operations seen on matching files
        self.opened: list[str] = []  # every path the opener opened, matching or not
        self.hooks: list[tuple[str, str, Callable]] = []  # (op, pattern, callback)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def inject(self, op: str, errno: int = errnos.EIO, *, after: int = 0,
               times: int | None = 1, probability: float = 1.0, short: bool = False) -> Fault:
        if op not in OPS:
            raise ValueError(f"op {op!r} is not one of {OPS}")
        if short and op != "pwrite":
            raise ValueError("only a pwrite can be short")
        fault = Fault(op, errno, after, times, probability, short)
        with self._lock:
            self.faults.append(fault)
        return fault

    def hook(self, op: str, callback: Callable, pattern: str = "*") -> None:
        """Call ``callback(io, op, offset, length)`` before each ``op`` on the files
        matching ``pattern`` (the origin too), in the thread doing it."""
        if op not in OPS:
            raise ValueError(f"op {op!r} is not one of {OPS}")
        with self._lock:
            self.hooks.append((op, pattern, callback))

    def clear(self) -> None:
        """Remove every fault and hook: from now on, I/O goes through untouched."""
        with self._lock:
            self.faults.clear()
            self.hooks.clear()

    def matches(self, path: str) -> bool:
        return fnmatch.fnmatchcase(path, self.pattern)

    def opener(self, path: str, flags: int, mode: int = 0o600) -> FaultyIO:
        io = FaultyIO.open(path, flags, mode)
        assert isinstance(io, FaultyIO)
        io.plan = self
        io.faulty = self.matches(path)
        with self._lock:
            self.opened.append(path)
        return io

    def check(self, io: FaultyIO, op: str, offset: int | None = None,
              length: int | None = None) -> Fault | None:
        """Run the hooks, then return the fault that fires on this operation, if any."""
        with self._lock:
            hooks = [cb for o, pattern, cb in self.hooks
                     if o == op and fnmatch.fnmatchcase(io.path, pattern)]
        for callback in hooks:  # outside the lock: a hook may wait
            callback(io, op, offset, length)
        if not io.faulty:
            return None
        with self._lock:
            self.counts[op] += 1
            for fault in self.faults:
                if fault.op == op and fault.due(self._rng):
                    return fault
        return None

    def record(self, io: FaultyIO, op: str, fault: Fault, offset: int | None,
               length: int | None, written: int = 0) -> OSError:
        with self._lock:
            self.fired.append(Fired(io.path, op, fault.errno, offset, length, written))
        where = f" at offset {offset}" if offset is not None else ""
        return OSError(fault.errno, f"{os.strerror(fault.errno)} (injected {op} fault on "
                       f"{io.path}{where})")

    def fired_paths(self) -> set[str]:
        with self._lock:
            return {f.path for f in self.fired}


class FaultyIO(FileIO):
    """``FileIO`` that asks its plan before each pwrite, pread and fsync."""

    plan: FaultPlan
    faulty: bool = False  # the path matches the plan's pattern

    def pwrite(self, buf, offset: int) -> None:
        view = memoryview(buf).cast("B")
        fault = self.plan.check(self, "pwrite", offset, len(view))
        if fault is None:
            super().pwrite(view, offset)
            return
        written = 0
        if fault.short and len(view) > 1:
            written = max(1, len(view) // 2)
            super().pwrite(view[:written], offset)
        raise self.plan.record(self, "pwrite", fault, offset, len(view), written)

    def pwrite_dsync(self, buf, offset: int) -> None:
        self.pwrite(buf, offset)
        self.fdatasync()

    def pread_into(self, buf, offset: int) -> int:
        length = memoryview(buf).nbytes
        fault = self.plan.check(self, "pread", offset, length)
        if fault is not None:
            raise self.plan.record(self, "pread", fault, offset, length)
        return super().pread_into(buf, offset)

    def fsync(self) -> None:
        fault = self.plan.check(self, "fsync")
        if fault is not None:
            raise self.plan.record(self, "fsync", fault, None, None)
        super().fsync()

    def fdatasync(self) -> None:
        fault = self.plan.check(self, "fsync")
        if fault is not None:
            raise self.plan.record(self, "fsync", fault, None, None)
        super().fdatasync()
