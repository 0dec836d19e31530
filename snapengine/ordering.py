"""Who may touch which blocks when: writers' claims, and readers' holds.

Design notes
------------
Two rules keep a snapshot read from seeing new data, and a block from being saved
twice (tracker.py's write path relies on both):

- **Claims.** A writer that is about to save blocks claims them first, under the lock.
  A claim that overlaps another waits (``wait``) until that one is released; so two
  writers of one block never both copy it, and the second cannot overwrite it before
  the first has saved it.
- **Holds.** A snapshot read registers a *hold* (a ticket and the blocks it reads)
  before it looks at any entry, and drops it when it has read them. A writer that has
  published its entries (new readers now read the saved copy) calls ``drain``: it
  takes a ticket and waits until no older hold overlaps its blocks. A read that chose
  the origin for a block has therefore finished before the block is overwritten.

Holds take no lock: ``next()`` on ``itertools.count`` and one dict item set or delete
are atomic in CPython. A reader deletes its hold, then looks at ``draining``; a
drainer raises ``draining``, then looks at the holds. So either the drainer sees the
hold gone, or the reader sees the drainer and wakes it: no wake-up is lost.

``close`` ends service: later claims and reads are refused (``closed``), reads in
flight are drained.

Locking: every method except ``hold`` and ``release_hold`` is called with ``cond``
held; ``cond`` is the tracker's (the index's page loads wait on it too).
"""

from __future__ import annotations

import threading
from array import array
from itertools import count

ALL_BLOCKS = 1 << 62  # end of a range that covers every block


class Claim:
    """Blocks [first, end) one writer is saving: runs of (block, count, first slot).

    The writer keeps its own work here: the pages it pinned, and per run the entries
    written and the bits of the blocks the write changes."""

    __slots__ = ("first", "end", "runs", "pages", "entries", "changed")

    def __init__(self, first: int, end: int, runs: list[tuple[int, int, int]],
                 pages: list) -> None:
        self.first = first
        self.end = end
        self.runs = runs
        self.pages = pages  # index pages, pinned until the claim is released
        self.entries: list[array] = []
        self.changed: list[int] = []  # per run: bits of the blocks the write changes


class Ordering:
    """The claims and read holds of one tracker (see the design notes)."""

    def __init__(self, cond: threading.Condition) -> None:
        self.cond = cond
        self.claims: list[Claim] = []
        self.waiting = 0  # writers waiting for a claim to end
        self.holds: dict[int, tuple[int, int]] = {}  # reads in flight: ticket -> blocks
        self.tickets = count()  # next() is atomic: read tickets, and drainers' horizons
        self.draining = 0  # threads waiting for reads to end: reads must wake them
        self.closed = False  # no more claims or reads

    # -- claims (cond held) ---------------------------------------------------------
    def overlaps(self, first: int, end: int) -> bool:
        """Some claim covers a block of [first, end)."""
        return any(c.first < end and first < c.end for c in self.claims)

    def wait(self) -> None:
        """Wait for a claim to be released (or for a failure to be announced)."""
        self.waiting += 1
        try:
            self.cond.wait()
        finally:
            self.waiting -= 1

    def add(self, claim: Claim) -> None:
        self.claims.append(claim)

    def release(self, claim: Claim) -> None:
        """Drop ``claim`` (if it was added) and wake the writers waiting for one."""
        if claim in self.claims:
            self.claims.remove(claim)
        if self.waiting:
            self.cond.notify_all()

    def settle(self) -> None:
        """Wait until no claim is left (after a failure: no new one can start)."""
        while self.claims:
            self.wait()

    # -- holds (lock-free) ----------------------------------------------------------
    def hold(self, first: int, end: int) -> int:
        """Register a read of blocks [first, end) before it looks at anything; return
        its ticket. The snapshot read path inlines this."""
        ticket = next(self.tickets)
        self.holds[ticket] = (first, end)
        return ticket

    def release_hold(self, ticket: int) -> None:
        """The read of ``ticket`` is done; wake a drainer if there is one. The
        snapshot read path inlines this."""
        del self.holds[ticket]
        if self.draining:
            with self.cond:
                self.cond.notify_all()

    # -- draining (cond held) -------------------------------------------------------
    def drain(self, first: int, end: int) -> None:
        """Wait until no read that started before now overlaps blocks [first, end)."""
        before = next(self.tickets)
        self.draining += 1
        try:
            while any(h < before and f < end and first < e
                      for h, (f, e) in list(self.holds.items())):
                self.cond.wait()
        finally:
            self.draining -= 1

    def close(self) -> None:
        """Refuse later claims and reads, and wait for the reads in flight."""
        self.closed = True
        self.drain(0, ALL_BLOCKS)
