"""GroupSync (fileio.py): concurrent callers share fdatasyncs, and a failed one sticks.

The file under it is a stand-in whose fdatasync the test holds and releases with events,
so which caller arrives while which sync runs is decided by the test, not by timing.
"""

from __future__ import annotations

import errno
import threading

import pytest

from snapengine.fileio import GroupSync

DONE_S = 10.0  # seconds for a thread that must get through to do so
BLOCKED_S = 0.2  # seconds a thread that must stay blocked is watched


class HeldIO:
    """An fdatasync that waits for ``release`` (when ``hold`` is set) and counts calls;
    ``errors`` are raised by the next calls, in order."""

    def __init__(self, hold: bool = False) -> None:
        self.calls = 0
        self.running = threading.Event()  # a sync is under way
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.errors: list[OSError] = []
        self._lock = threading.Lock()

    def fdatasync(self) -> None:
        with self._lock:
            self.calls += 1
            error = self.errors.pop(0) if self.errors else None
        self.running.set()
        assert self.release.wait(DONE_S), "the test never released the sync"
        if error is not None:
            raise error


def call_sync(gs: GroupSync, results: list, arrived: threading.Event | None = None):
    """A thread calling ``gs.sync()`` once; its outcome lands in ``results``."""
    def run() -> None:
        if arrived is not None:
            arrived.set()
        try:
            gs.sync()
            results.append("ok")
        except OSError as e:
            results.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def join_all(threads) -> None:
    for t in threads:
        t.join(DONE_S)
        assert not t.is_alive(), "a sync() hung"


def test_one_caller_one_sync():
    io = HeldIO()
    gs = GroupSync(io)
    gs.sync()
    gs.sync()
    assert io.calls == 2  # each call needs a sync that started after it


def test_callers_arriving_during_a_sync_share_the_next_one():
    """One sync runs (held); eight callers arrive meanwhile: none returns on that sync,
    which may have started before their writes, and all eight return on one more."""
    io = HeldIO(hold=True)
    gs = GroupSync(io)
    results: list = []
    first = call_sync(gs, results)
    assert io.running.wait(DONE_S)
    arrivals = [threading.Event() for _ in range(8)]
    late = [call_sync(gs, results, arrived) for arrived in arrivals]
    for arrived in arrivals:
        assert arrived.wait(DONE_S)
    assert io.calls == 1 and results == []
    io.release.set()
    join_all([first] + late)
    assert results == ["ok"] * 9
    assert io.calls == 2, f"{io.calls} fdatasyncs for 9 callers, 8 of them concurrent"


def test_no_caller_returns_before_a_sync_that_started_after_it():
    """A caller arriving while a sync is held waits for the next sync to complete."""
    io = HeldIO(hold=True)
    gs = GroupSync(io)
    results: list = []
    first = call_sync(gs, results)
    assert io.running.wait(DONE_S)
    second = call_sync(gs, results)
    second.join(BLOCKED_S)
    assert second.is_alive() and results == []
    io.release.set()
    join_all([first, second])
    assert results == ["ok", "ok"] and io.calls == 2


def test_a_failed_sync_sticks():
    """fdatasync failed: the caller gets its error, and so does every later caller, without
    another fdatasync (the dirty pages may be gone: a retry that succeeded would lie)."""
    io = HeldIO()
    io.errors.append(OSError(errno.EIO, "I/O error"))
    gs = GroupSync(io)
    with pytest.raises(OSError) as first:
        gs.sync()
    assert first.value.errno == errno.EIO
    for _ in range(3):
        with pytest.raises(OSError) as later:
            gs.sync()
        assert later.value is first.value
    assert io.calls == 1


def test_callers_waiting_on_a_failing_sync_get_its_error():
    io = HeldIO(hold=True)
    io.errors.append(OSError(errno.ENOSPC, "No space left on device"))
    gs = GroupSync(io)
    results: list = []
    first = call_sync(gs, results)
    assert io.running.wait(DONE_S)
    arrivals = [threading.Event() for _ in range(4)]
    waiting = [call_sync(gs, results, arrived) for arrived in arrivals]
    for arrived in arrivals:
        assert arrived.wait(DONE_S)
    io.release.set()
    join_all([first] + waiting)
    assert len(results) == 5
    assert all(isinstance(r, OSError) and r.errno == errno.ENOSPC for r in results), results
    assert io.calls == 1
