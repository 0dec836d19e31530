"""Write intents: the durable record of where change marks may not be on disk yet.

Design notes
------------
Change marks are kept in memory and reach the disk with their index page (index.py),
so a crash can lose them. Before the first mark in a 64 MiB region (INTENT_REGION)
since the last clean point, the region's bit in the COW file's write-intent bitmap
is written and made durable (fdatasync, shared by concurrent writers: GroupSync).
Recovery counts every block of a marked region as changed (recovery.presume_changed):
a superset of the truth, never less. At a clean point every mark is written and
synced, and then the bits are cleared (``forget``).

Cost: one fdatasync per region per clean-to-clean period; every other call is one
lock-free dict lookup. The bitmap bytes written and the bits known durable are kept
apart, so a bit is not trusted before its sync has returned.
"""

from __future__ import annotations

import threading

from .cowfile import INTENT_SHIFT, CowFile
from .fileio import GroupSync
from .units import BLOCK_SHIFT

REGION_SHIFT = INTENT_SHIFT - BLOCK_SHIFT  # block >> REGION_SHIFT is its write-intent region


class WriteIntents:
    """The write-intent bits of one COW file, as written and as known durable.

    Thread-safety: ``record`` is called by many writers at once (lock-free when the
    bits are durable already); ``forget`` with no write in flight."""

    def __init__(self, cow: CowFile, group_sync: GroupSync) -> None:
        self.cow = cow
        self.group_sync = group_sync
        self._lock = threading.Lock()
        self._written: dict[int, int] = {}  # bitmap byte -> value written
        self._durable: dict[int, int] = {}  # bitmap byte -> bits known durable
        for region in cow.read_intents():
            byte, bit = region >> 3, 1 << (region & 7)
            self._written[byte] = self._durable[byte] = self._written.get(byte, 0) | bit

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
        with self._lock:
            written = self._written
            for byte in {r >> 3 for r in new}:
                value = written.get(byte, 0)
                for r in new:
                    if r >> 3 == byte:
                        value |= 1 << (r & 7)
                if value != written.get(byte, 0):
                    self.cow.write_intent_byte(byte, value)
                    written[byte] = value
        self.group_sync.sync()  # covers what we (and anyone before us) wrote
        with self._lock:
            for r in new:
                durable[r >> 3] = durable.get(r >> 3, 0) | 1 << (r & 7)

    def forget(self) -> None:
        """At a clean point (every mark written and synced): no region is in doubt."""
        with self._lock:
            self.cow.clear_intents(self._written)
            self._written.clear()
            self._durable.clear()
