"""The ordering core (snapengine/ordering.py): claims, read holds and drains, no I/O."""

from __future__ import annotations

import random
import threading

import pytest

from snapengine.ordering import Claim, Ordering

TIMEOUT = 30  # seconds a thread may take before the test calls it hung


class SpyCondition(threading.Condition):
    """A condition that says when someone has started waiting on it. Taking the lock
    after ``waiting`` is set proves the waiter is inside ``wait`` (it released it)."""

    def __init__(self) -> None:
        super().__init__(threading.Lock())
        self.waiting = threading.Event()

    def wait(self, timeout=None):
        self.waiting.set()
        return super().wait(timeout)


def started(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def wait_until_waiting(cond: SpyCondition) -> None:
    assert cond.waiting.wait(TIMEOUT), "the thread never waited"
    with cond:  # it is in wait(): it released the lock
        cond.waiting.clear()


def finish(thread: threading.Thread) -> None:
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "the thread is still waiting: a lost wake-up"


@pytest.fixture
def order():
    return Ordering(SpyCondition())


@pytest.mark.parametrize("first, end, overlaps", [
    pytest.param(0, 10, False, id="just-before"),
    pytest.param(0, 11, True, id="first-block"),
    pytest.param(19, 25, True, id="last-block"),
    pytest.param(20, 30, False, id="just-after"),
    pytest.param(0, 100, True, id="covers"),
    pytest.param(12, 13, True, id="inside"),
])
def test_claims_overlap(order, first, end, overlaps):
    order.add(Claim(10, 20, [], []))
    assert order.overlaps(first, end) is overlaps


def test_overlapping_claim_waits_for_release(order):
    cond = order.cond
    first = Claim(10, 20, [(10, 10, 1)], [])
    got: list[Claim] = []

    def second_writer():
        with cond:
            while order.overlaps(15, 25):
                order.wait()
            claim = Claim(15, 25, [], [])
            order.add(claim)
            got.append(claim)

    with cond:
        order.add(first)
    writer = started(second_writer)
    wait_until_waiting(cond)
    assert not got and order.waiting == 1
    with cond:
        order.release(first)
    finish(writer)
    assert order.claims == got and order.waiting == 0


def test_release_of_a_claim_never_added(order):
    """A writer whose allocation failed releases a claim that was not added."""
    with order.cond:
        order.release(Claim(0, 16, [], []))
    assert order.claims == []


def test_drain_waits_for_an_older_overlapping_hold(order):
    cond = order.cond
    ticket = order.hold(5, 10)
    done = threading.Event()

    def writer():
        with cond:
            order.drain(0, 8)
        done.set()

    drainer = started(writer)
    wait_until_waiting(cond)
    assert not done.is_set() and order.draining == 1
    order.release_hold(ticket)
    finish(drainer)
    assert done.is_set() and order.draining == 0 and not order.holds


def test_drain_passes_other_holds(order):
    """Holds that do not overlap, and holds newer than the drain, are not waited for."""
    order.hold(100, 200)
    with order.cond:
        order.drain(0, 100)  # returns at once: [100, 200) does not overlap
    old = order.hold(0, 1)
    done = threading.Event()

    def writer():
        with order.cond:
            order.drain(0, 8)
        done.set()

    drainer = started(writer)
    wait_until_waiting(order.cond)
    newer = order.hold(0, 8)  # started after the drain: it reads the published entries
    order.release_hold(old)
    finish(drainer)
    assert done.is_set() and newer in order.holds


def test_close_refuses_later_work_and_drains_every_read(order):
    tickets = [order.hold(0, 1), order.hold(1 << 40, (1 << 40) + 1)]

    def quiesce():
        with order.cond:
            order.close()

    closer = started(quiesce)
    wait_until_waiting(order.cond)
    assert order.closed
    order.release_hold(tickets[0])
    wait_until_waiting(order.cond)  # woken, and waiting again for the other read
    assert closer.is_alive()
    order.release_hold(tickets[1])
    finish(closer)


def test_no_lost_wake_up_under_load():
    """Readers hold and release, drainers drain, all at once: everyone finishes."""
    order = Ordering(threading.Condition(threading.Lock()))
    rng = random.Random(7)
    plans = [[(b, b + rng.randrange(1, 64)) for b in
              (rng.randrange(0, 1024) for _ in range(3000))] for _ in range(4)]

    def reader(plan):
        for first, end in plan:
            order.release_hold(order.hold(first, end))

    def drainer(plan):
        for first, end in plan[:500]:
            with order.cond:
                order.drain(first, end)

    threads = [started(lambda p=p: reader(p)) for p in plans]
    threads += [started(lambda p=p: drainer(p)) for p in plans[:2]]
    for thread in threads:
        finish(thread)
    assert not order.holds and order.draining == 0
