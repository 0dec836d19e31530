"""The snapshot read path: the image at the snapshot point, from the COW file and the origin.

Design notes
------------
A block with a saved entry is read from its slot in the COW file and its checksum
checked; any other block is read from the origin, which has not changed it since the
snapshot point (tracker.py saves a block before the origin may overwrite it).

``read`` is lock-free when the index page is cached: it registers a hold (ordering.py:
a ticket and a dict entry, both atomic) before it looks at any entry, takes the
entries, reads, and drops the hold. A writer that has just published entries waits
for every older hold over its blocks, so a read that chose the origin for a block
finishes before the block is overwritten; a read that starts later sees the entry.

The usual request, one aligned 4 KiB block of a cached page, is inlined: no array is
built. Longer reads make one pread per run of consecutive slots (or of blocks not
saved, from the origin), then check every saved block's checksum in one C-level pass.

Bad data (a checksum mismatch, a truncated slot) or a corrupt index page fails the
snapshot and answers EIO: a snapshot never returns wrong data. After a failure every
read answers EIO, after ``Ordering.close`` ENXIO.
"""

from __future__ import annotations

import errno
from array import array
from itertools import compress
from threading import get_ident
from typing import Callable

import xxhash

from .cowfile import CowFile, block_checksums, block_checksums_at
from .entry import PAGE_MASK, PAGE_SHIFT, SLOT_MASK, ZERO, ZERO_AHEAD, ZERO_SLOT, data_slots
from .errors import SnapError
from .fileio import FileIO
from .health import Health
from .index import Index
from .ordering import Ordering
from .units import BLOCK_SHIFT, BLOCK_SIZE

_xxh3 = xxhash.xxh3_64_intdigest  # one saved block's checksum (see cowfile.block_checksums)

_ZERO_BLOCK = bytes(BLOCK_SIZE)
REUSE_MAX = 1 << 20  # copy buffers up to this size are kept per thread (16 threads: 16 MiB)
MAX_BUFFERS = 64  # threads with a kept buffer; past it the cache starts again

# Keyed by the OS thread, not threading.local: nbdkit's Python plugin gives each
# callback a new thread state unless threadstate.py keeps it, and a threading.local
# empty on every request once cost a new, zeroed 1 MiB bytearray per copy. One
# thread runs one callback at a time, so its buffer is its own.
_buffers: dict[int, bytearray] = {}


def copy_buffer(nbytes: int) -> memoryview:
    """A scratch buffer of ``nbytes`` for this thread (reused: no allocation per copy).
    Valid until this thread asks again."""
    if nbytes > REUSE_MAX:
        return memoryview(bytearray(nbytes))
    key = get_ident()
    buf = _buffers.get(key)
    if buf is None:
        if len(_buffers) >= MAX_BUFFERS:  # threads come and go with connections
            _buffers.clear()
        buf = _buffers[key] = bytearray(REUSE_MAX)
    return memoryview(buf)[:nbytes]


class SnapshotReader:
    """Serves the snapshot image of one SnapshotTracker (its parts, not the tracker).

    Thread-safety: ``read`` may be called from any number of threads at once."""

    def __init__(self, cow: CowFile, origin_io: FileIO, index: Index, order: Ordering,
                 health: Health, fail: Callable[[BaseException], None]) -> None:
        self.cow = cow
        self.origin_io = origin_io
        self.index = index
        self.order = order
        self.health = health
        self.fail = fail  # fails the snapshot for good (the tracker's)
        self.seed = cow.header.seed
        self._holds = order.holds  # the hold is inlined in read: see Ordering.hold
        self._tickets = order.tickets

    def read(self, buf, offset: int) -> None:
        """Fill ``buf`` with the snapshot image from ``offset``."""
        length = len(buf)
        if not length:
            return
        first = offset >> BLOCK_SHIFT
        end = (offset + length + BLOCK_SIZE - 1) >> BLOCK_SHIFT
        hold = next(self._tickets)
        self._holds[hold] = (first, end)  # before looking at anything: see Ordering.drain
        try:
            if self.health.error or self.order.closed:
                raise self._unreadable()
            page = self.index.peek(first >> PAGE_SHIFT) if length == BLOCK_SIZE else None
            if page is not None and not offset & (BLOCK_SIZE - 1):  # one aligned block
                i = (first & PAGE_MASK) << 1  # (the usual 4 KiB read: no array built)
                raw = page.entries[i]
                slot = raw & SLOT_MASK
                if not slot:
                    if self.origin_io.pread_into(buf, offset) != BLOCK_SIZE:
                        self._read_origin(buf, offset)  # says what is wrong
                elif raw == ZERO or raw == ZERO_AHEAD:  # saved as zeros: no data slot
                    memoryview(buf).cast("B")[:] = _ZERO_BLOCK
                elif self.cow.io.pread_into(buf, self.cow.slot_offset(slot)) != BLOCK_SIZE or \
                        (_xxh3(buf, self.seed + first) or 1) != page.entries[i + 1]:
                    self._read(memoryview(buf).cast("B"), offset, first,
                               page.entries[i:i + 2])  # it says what is wrong
            else:
                entries = self._entries(first, end)
                if entries.count(0) == len(entries):  # nothing saved: all from the origin
                    self._read_origin(buf, offset)
                else:
                    self._read(memoryview(buf).cast("B"), offset, first, entries)
            if self.health.error:  # a first touch failed meanwhile: the origin may have moved on
                raise self._unreadable()
        except SnapError as e:
            if e.errno not in (errno.EIO, errno.EUCLEAN):
                raise
            if not self.health.error:  # (once failed, its data may be gone: no news)
                self.fail(e)  # bad data or a corrupt index page: the snapshot is broken
            raise SnapError(errno.EIO, e.detail)
        finally:
            del self._holds[hold]  # then look at draining: see Ordering.release_hold
            if self.order.draining:
                with self.order.cond:
                    self.order.cond.notify_all()

    def _read_origin(self, buf, offset: int) -> None:
        if self.origin_io.pread_into(buf, offset) != len(buf):
            raise SnapError(errno.EIO, f"short read from origin {self.origin_io.path} at {offset}")

    def _entries(self, first: int, end: int) -> array:
        """Entries of blocks [first, end): from the cached page without the lock, else
        under it (loading pages)."""
        number = first >> PAGE_SHIFT
        if (end - 1) >> PAGE_SHIFT == number:
            page = self.index.peek(number)
            if page is not None:
                lo = (first & PAGE_MASK) << 1
                return page.entries[lo:lo + ((end - first) << 1)]
        with self.order.cond:
            return Index.entries(self.index.pages(first, end), first, end)

    def _unreadable(self) -> SnapError:
        if self.health.error:
            return SnapError(errno.EIO, f"the snapshot has failed: {self.health.reason}")
        return SnapError(errno.ENXIO, "the snapshot has been removed")

    def _read(self, view: memoryview, offset: int, first: int, entries: array) -> None:
        """The snapshot's bytes from ``offset`` into ``view``; ``entries`` cover them."""
        n = len(entries) >> 1
        start = first << BLOCK_SHIFT
        if offset == start and len(view) == n << BLOCK_SHIFT:
            self._read_blocks(view, first, entries)
            return
        whole = copy_buffer(n << BLOCK_SHIFT)  # unaligned: whole blocks, then the part
        self._read_blocks(whole, first, entries)
        view[:] = whole[offset - start:offset - start + len(view)]

    def _read_blocks(self, view: memoryview, first: int, entries: array) -> None:
        """Whole blocks from ``first``: one read per run of consecutive slots (or of
        blocks not saved, from the origin), then the saved blocks' checksums checked."""
        slots = data_slots(entries)
        n = len(slots)
        cow, origin = self.cow.io, self.origin_io
        slot_base = self.cow.header.data_offset - BLOCK_SIZE  # slot s is at base + s * 4096
        i = 0
        while i < n:
            slot = slots[i]
            j = i + 1
            while j < n and slots[j] == (slot + j - i if slot and slot != ZERO_SLOT else slot):
                j += 1
            dst = view[i << BLOCK_SHIFT:j << BLOCK_SHIFT]
            if slot == ZERO_SLOT:  # saved as zeros
                dst[:] = bytes(len(dst))
            elif slot:
                if cow.pread_into(dst, slot_base + (slot << BLOCK_SHIFT)) != len(dst):
                    raise SnapError(errno.EIO, f"{self.cow.path}: saved data of blocks "
                                    f"{first + i}-{first + j - 1} (slot {slot}) is truncated")
            else:
                got = origin.pread_into(dst, (first + i) << BLOCK_SHIFT)
                dst[got:] = bytes(len(dst) - got)  # past the origin's end: zeroes
            i = j
        self._check(view, first, entries, slots)

    def _check(self, view: memoryview, first: int, entries: array, slots: array) -> None:
        """Every saved block of ``view`` (blocks from ``first``) against its checksum,
        in one C-level pass; EIO names the first that fails."""
        n = len(slots)
        zeros = slots.count(ZERO_SLOT)
        if not slots.count(0) and not zeros:
            sums, csums = block_checksums(view, first, self.seed), entries[1::2]
            where = list(range(n))
        else:  # only the blocks saved with data carry block checksums
            where = list(compress(range(n), slots))
            if zeros:
                where = [k for k in where if slots[k] != ZERO_SLOT]
            sums = block_checksums_at(view, where, first, self.seed)
            csums = array("Q", [entries[2 * k + 1] for k in where])
        if sums != csums:
            k = next(k for k in range(len(sums)) if sums[k] != csums[k])
            bad = where[k]
            raise SnapError(errno.EIO, f"{self.cow.path}: saved data of block {first + bad} "
                            f"(slot {slots[bad]}, offset {self.cow.slot_offset(slots[bad])}) "
                            f"fails its checksum: stored {csums[k]:#018x}, computed "
                            f"{sums[k]:#018x}")
