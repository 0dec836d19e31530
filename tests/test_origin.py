"""WriteGate (origin.py): the gate every origin write passes, which a tracker swap closes.

``closed()`` must wait for the writes in flight and hold new ones back until it is
reopened; ``shut()`` does the same for good, and every later write gets ESHUTDOWN.
Threads are sequenced with events; a thread that must stay blocked is given BLOCKED_S
to get through wrongly (that bounded wait is the only timing in this file).
"""

from __future__ import annotations

import errno
import threading

import pytest

from snapengine.errors import SnapError
from snapengine.origin import WriteGate
from tests.harness import wait_for

BLOCKED_S = 0.2  # seconds a thread that must stay blocked is watched
DONE_S = 10.0  # seconds for a thread that must get through to do so


class Thread(threading.Thread):
    """A thread that keeps its target's exception, for the test to raise."""

    def __init__(self, target) -> None:
        super().__init__(target=self._run, daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None
        self.done = threading.Event()

    def _run(self) -> None:
        try:
            self._target_fn()
        except BaseException as e:  # noqa: BLE001 - raised by finish()
            self.error = e
        finally:
            self.done.set()

    def finish(self) -> None:
        assert self.done.wait(DONE_S), "the thread hung"
        self.join()
        if self.error is not None:
            raise self.error


def in_flight(gate: WriteGate):
    """A writer inside the gate until ``release`` is set; returns (thread, inside, release)."""
    inside, release = threading.Event(), threading.Event()

    def write() -> None:
        gate.enter()
        inside.set()
        release.wait()
        gate.leave()
    t = Thread(write)
    t.start()
    assert inside.wait(DONE_S)
    return t, release


def closer(gate: WriteGate, hold: threading.Event | None = None):
    """A thread that closes the gate (and keeps it closed until ``hold`` is set)."""
    inside = threading.Event()

    def close() -> None:
        with gate.closed():
            inside.set()
            if hold is not None:
                hold.wait()
    t = Thread(close)
    t.start()
    return t, inside


def test_an_idle_gate_closes_at_once():
    gate = WriteGate()
    with gate.closed():
        pass
    gate.enter()
    gate.leave()


def test_closed_waits_for_the_writes_in_flight():
    gate = WriteGate()
    writer, release = in_flight(gate)
    t, inside = closer(gate)
    assert not inside.wait(BLOCKED_S), "closed() did not wait for the write in flight"
    release.set()
    assert inside.wait(DONE_S)
    t.finish()
    writer.finish()


def test_closed_holds_new_writes_back_until_it_reopens():
    gate = WriteGate()
    reopen = threading.Event()
    t, inside = closer(gate, hold=reopen)
    assert inside.wait(DONE_S)
    entered = threading.Event()

    def write() -> None:
        gate.enter()
        entered.set()
        gate.leave()
    writer = Thread(write)
    writer.start()
    assert not entered.wait(BLOCKED_S), "a write got through a closed gate"
    reopen.set()
    assert entered.wait(DONE_S)
    writer.finish()
    t.finish()


def test_one_swap_at_a_time():
    gate = WriteGate()
    reopen = threading.Event()
    first, first_inside = closer(gate, hold=reopen)
    assert first_inside.wait(DONE_S)
    second, second_inside = closer(gate)
    assert not second_inside.wait(BLOCKED_S), "two closers inside the gate at once"
    reopen.set()
    assert second_inside.wait(DONE_S)
    first.finish()
    second.finish()


def test_no_write_is_inside_while_the_gate_is_closed():
    """Writers hammer the gate while a closer closes it over and over: inside closed(),
    no writer is ever between enter() and leave()."""
    gate = WriteGate()
    lock = threading.Lock()
    inside = [0]
    stop = threading.Event()
    start = threading.Barrier(5)

    def writer() -> None:
        start.wait()
        while not stop.is_set():
            gate.enter()
            with lock:
                inside[0] += 1
            with lock:
                inside[0] -= 1
            gate.leave()

    def swapper() -> None:
        start.wait()
        for _ in range(300):
            with gate.closed():
                with lock:
                    assert inside[0] == 0, f"{inside[0]} writers inside a closed gate"
        stop.set()
    threads = [Thread(writer) for _ in range(4)] + [Thread(swapper)]
    for t in threads:
        t.start()
    for t in threads:
        t.finish()


def test_shut_drains_the_writes_in_flight_then_refuses_every_write():
    gate = WriteGate()
    writer, release = in_flight(gate)
    shut = Thread(gate.shut)
    shut.start()

    def refused() -> bool:  # once shut() has closed the gate, a new write is refused
        try:
            gate.enter()
        except SnapError as e:
            assert e.errno == errno.ESHUTDOWN, e
            return True
        gate.leave()
        return False
    wait_for(refused, timeout=DONE_S, what="shut() to close the gate")
    assert not shut.done.wait(BLOCKED_S), "shut() returned with a write in flight"
    release.set()
    shut.finish()
    writer.finish()
    with pytest.raises(SnapError) as e:
        gate.enter()
    assert e.value.errno == errno.ESHUTDOWN
    assert "shutting down" in str(e.value)


def test_shut_waits_for_a_swap_under_way():
    gate = WriteGate()
    reopen = threading.Event()
    t, inside = closer(gate, hold=reopen)
    assert inside.wait(DONE_S)
    shut = Thread(gate.shut)
    shut.start()
    assert not shut.done.wait(BLOCKED_S), "shut() did not wait for the swap"
    reopen.set()
    shut.finish()
    t.finish()
    with pytest.raises(SnapError) as e:
        gate.enter()
    assert e.value.errno == errno.ESHUTDOWN


def test_a_write_held_back_by_a_swap_is_refused_if_the_gate_shuts():
    """A writer waiting at a closed gate gets ESHUTDOWN, not a way in, when the daemon
    shuts down; the swap itself finishes normally."""
    gate = WriteGate()
    reopen = threading.Event()
    t, inside = closer(gate, hold=reopen)
    assert inside.wait(DONE_S)
    outcome: list[str] = []

    def write() -> None:
        try:
            gate.enter()
        except SnapError as e:
            outcome.append(errno.errorcode[e.errno])
            return
        outcome.append("entered")
        gate.leave()
    writer = Thread(write)
    writer.start()
    assert not writer.done.wait(BLOCKED_S)
    shut = Thread(gate.shut)
    shut.start()
    reopen.set()
    t.finish()
    shut.finish()
    writer.finish()
    # either the writer got in when the swap ended (and shut() waited for it), or shut()
    # closed the gate first; never a write after shut() returned
    assert outcome in (["entered"], ["ESHUTDOWN"]), outcome
    with pytest.raises(SnapError):
        gate.enter()


def test_a_shut_gate_refuses_to_close_instead_of_waiting_for_ever():
    gate = WriteGate()
    gate.shut()
    with pytest.raises(SnapError) as e:
        with gate.closed():
            pass
    assert e.value.errno == errno.ESHUTDOWN
