"""Write intents: the durable record of where change marks may not be on disk yet.

Design notes
------------
Change marks are kept in memory and reach the disk with their index page (index.py),
so a crash can lose them. Before the first mark in a 64 MiB region (INTENT_REGION)
since the last clean point, the region's bit in the COW file's write-intent bitmap
is written and made durable. Recovery counts every block of a marked region as
changed (recovery.presume_changed): a superset of the truth, never less. At a clean
point every mark is written and synced, and then the bits are cleared (``forget``).

Cost: one durable write of the bitmap byte (RWF_DSYNC: that page and a flush of the
disk's cache) per region per clean-to-clean period; every other call is one lock-free
dict lookup. An fdatasync there used to write every dirty page of the COW file, on a
disk up to 64 MiB of copies each time: it took 40 % off a 1M first-touch pass
(docs/performance.md). Nothing else relies on that sync: saved data is made durable
by --durable's own sync, and marks and entries not synced are what the bits cover.
A byte is written under the lock and is durable when the write returns, so a bit is
trusted (``_durable``) only once its write has returned, and writes of one byte never
overtake each other.
"""

from __future__ import annotations

import threading

from .cowfile import INTENT_SHIFT, CowFile
from .units import BLOCK_SHIFT

REGION_SHIFT = INTENT_SHIFT - BLOCK_SHIFT  # block >> REGION_SHIFT is its write-intent region


class WriteIntents:
    """The write-intent bits of one COW file, as written and as known durable.

    Thread-safety: ``record`` is called by many writers at once (lock-free when the
    bits are durable already); ``forget`` with no write in flight."""

    def __init__(self, cow: CowFile) -> None:
        self.cow = cow
        self._lock = threading.Lock()
        self._durable: dict[int, int] = {}  # bitmap byte -> its value, written durably
        for region in cow.read_intents():
            byte, bit = region >> 3, 1 << (region & 7)
            self._durable[byte] = self._durable.get(byte, 0) | bit

    def record(self, first: int, end: int) -> None:
        """Make the write-intent bits of the regions of [first, end) durable, if not yet."""
        durable = self._durable
        region = first >> REGION_SHIFT
        if region == (end - 1) >> REGION_SHIFT and durable.get(region >> 3, 0) >> (region & 7) & 1:
            return  # the usual case, lock-free
        new = [r for r in range(region, ((end - 1) >> REGION_SHIFT) + 1)
               if not durable.get(r >> 3, 0) >> (r & 7) & 1]
        if not new:
            return
        with self._lock:  # held across the durable write: other regions' first marks
            for byte in {r >> 3 for r in new}:  # wait, as they would for a sync
                value = durable.get(byte, 0)
                for r in new:
                    if r >> 3 == byte:
                        value |= 1 << (r & 7)
                if value != durable.get(byte, 0):
                    self.cow.write_intent_byte(byte, value, durable=True)
                    durable[byte] = value

    def forget(self) -> None:
        """At a clean point (every mark written and synced): no region is in doubt."""
        with self._lock:
            self.cow.clear_intents(self._durable)
            self._durable.clear()
