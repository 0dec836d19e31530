"""Snapshot mode: copy-before-write into the COW file, and the snapshot image it serves.

``SnapshotTracker`` is the snapshot policy of tracker.py's ``CowTracker``: the design notes
there give the write path (steps 2 to 4 are here), why it is safe, and what a failure
does. Here also: the ``-f`` limit and auto-expand (space.py) at allocation, and the
overflow (errors.StoreFull) that fails the snapshot and keeps its change list
(docs/design.md, "When the COW store fills up").
"""

from __future__ import annotations

import errno
import logging

from .cowfile import FLAG_INCREMENTAL, CowFile, block_checksums
from .entry import PAGE_MASK, PAGE_SHIFT, bit_runs, saved_entries, span_bits, zero_entries
from .errors import SnapError, StoreFull
from .fileio import FileIO
from .health import Health
from .index import Index
from .oldzeros import old_zeros, split_runs
from .ordering import Claim
from .origin import TRIM
from .snapread import SnapshotReader, copy_buffer
from .space import Space
from .tracker import CowTracker
from .units import BLOCK_SHIFT, BLOCK_SIZE

log = logging.getLogger(__name__)

COPY_BLOCKS = 16  # blocks saved together on a first touch: 64 KiB clusters, as qemu
ZERO_CHUNK = 256  # blocks of a write-zeroes read and saved at a time (1 MiB)


class _NeedsRoom(Exception):
    """An allocation would pass the limit: grow it (outside the lock), then retry."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed  # bytes of data the limit must allow


class SnapshotTracker(CowTracker):
    """Snapshot mode: saves old data before overwrite and serves the snapshot image
    (``read(buf, offset)``: snapread.SnapshotReader.read)."""

    MARKS_WITHOUT_DATA = False  # a block whose copy failed is not marked: it is not saved

    def __init__(self, cow: CowFile, origin_io: FileIO, max_cache_bytes: int,
                 health: Health | None = None, space: Space | None = None) -> None:
        super().__init__(cow, origin_io, max_cache_bytes, health, space)
        self.zeros_ok = cow.header.version >= 2  # entries saved as zeros may be written
        self.reader = SnapshotReader(cow, origin_io, self.index, self.order, self.health,
                                     self.fail)
        self.read = self.reader.read  # bound once: the export calls it with no hop between

    def before_change(self, first: int, end: int, kind: str) -> bool:
        """A trim is dropped; a write-zeroes saves what it would change (the design
        notes): blocks whose old content is zeros are saved as zeros, and not marked."""
        if self.health.error:  # failed: only the change list, if kept, goes on
            return super().before_change(first, end, kind)
        if kind == TRIM:
            return False
        try:
            for lo in range(first, end, ZERO_CHUNK):
                hi = min(lo + ZERO_CHUNK, end)
                try:
                    kept = self._save(lo, hi, zeroing=True)
                except StoreFull as e:  # the snapshot is lost, its change list is not
                    self.fail(e)
                    kept = 0
                for a, n in bit_runs(span_bits(0, hi - lo) & ~kept):
                    self._mark_changed(lo + a, lo + a + n)
        except Exception as e:
            self.fail(e)
        return True

    def _save(self, first: int, end: int, zeroing: bool = False) -> int:
        """Save what is not saved yet in the clusters of [first, end) (steps 2 to 4).
        Return the bits (bit 0: block ``first``) of the request's blocks saved as zeros
        whose content a write-zeroes (``zeroing``) leaves as it was."""
        lo = first & ~(COPY_BLOCKS - 1)  # whole clusters: their neighbours come along
        hi = min(-(-end // COPY_BLOCKS) * COPY_BLOCKS, self.nr_blocks)
        if self._all_saved(lo, hi):  # SAVED: nothing to claim (a cluster saved ahead,
            return 0  # the other 15 writes of a first touch); no lock taken
        zeros, data = 0, None
        if self.zeros_ok and not self.health.error:
            zeros, data = old_zeros(self.origin_io, self.origin_size, lo, hi, zeroing,
                                    self.known_data)
        while True:
            try:
                with self._lock:
                    claim = self._claim(lo, hi, zeros)
                break
            except _NeedsRoom as short:  # auto-expand, or StoreFull
                self._grow(short.needed)
        if claim is None:
            if self.health.error:  # not saved: the write may go on once that is on disk
                self.failure_barrier()
            return 0
        try:
            kept = self._copy(claim, first, end, data, lo, zeroing)
        except BaseException:
            with self._lock:
                self._release(claim)
            raise
        with self._lock:
            for (block, _, _), entries in zip(claim.runs, claim.entries):
                Index.store(claim.pages, block, entries)  # PUBLISHED
            self.order.drain(claim.first, claim.end)
            for (block, n, _), changed in zip(claim.runs, claim.changed):
                Index.mark(claim.pages, block, n, changed)  # SAVED
                self._nr_changed += changed.bit_count()
            self._release(claim)
        return kept >> (first - lo) & span_bits(0, end - first)

    def _all_saved(self, lo: int, hi: int) -> bool:
        """Lock-free and possibly stale (bits only get set): [lo, hi) is saved already."""
        number = lo >> PAGE_SHIFT
        if (hi - 1) >> PAGE_SHIFT != number:
            return False
        page = self.index.peek(number)
        want = span_bits(0, hi - lo)
        return page is not None and page.saved >> (lo & PAGE_MASK) & want == want

    def _claim(self, first: int, end: int, zeros: int = 0) -> Claim | None:
        while True:
            if self.health.error or self.order.closed:
                return None
            pages = self.index.pages(first, end)
            todo = Index.unsaved(pages, first, end)
            if not todo:
                return None
            lo, hi = todo[0][0], todo[-1][0] + todo[-1][1]
            if not self.order.overlaps(lo, hi):
                break
            self.order.wait()
        claim = Claim(lo, hi, self._allocate(todo, zeros, first), pages)
        for page in pages:
            page.pins += 1
        self.order.add(claim)
        return claim

    def _release(self, claim: Claim) -> None:
        for page in claim.pages:
            page.pins -= 1
        self.order.release(claim)

    def _allocate(self, todo: list[tuple[int, int]], zeros: int = 0,
                  base: int = 0) -> list[tuple[int, int, int]]:
        """Runs (block, count, first slot) of ``todo``; slot 0 for a run saved as zeros
        (``zeros``: bits from block ``base``), which needs no slot and no data."""
        runs = [(block, n, -1) for block, n in todo] if not zeros else \
            [run for block, n in todo for run in split_runs(block, n, zeros >> (block - base))]
        need = todo[0][1] if not zeros and len(todo) == 1 else \
            sum(n for _, n, slot in runs if slot)
        limit = self.cow.header.fallocate
        if (self.next_slot - 1 + need) * BLOCK_SIZE > limit:
            raise _NeedsRoom((self.next_slot - 1 + need) * BLOCK_SIZE)
        out = []
        for block, n, slot in runs:
            if slot:
                out.append((block, n, self.next_slot))
                self.next_slot += n
            else:
                out.append((block, n, 0))
        self.index.slot_limit = self.next_slot - 1
        self.space.allocated(self.cow.path, self.nr_slots * BLOCK_SIZE, limit)
        return out

    def _grow(self, needed: int) -> None:
        """Raise the limit to allow ``needed`` bytes of data (auto-expand), or raise
        StoreFull. One grower at a time; the header holds the new limit before any slot
        above the old one is used."""
        with self._fail_lock:  # a failure recorded meanwhile wins; nobody else writes
            limit = self.cow.header.fallocate  # the header under this lock
            if needed <= limit or self.health.error:
                return  # grown by another writer, or failed: _claim sees which
            new = self.space.grow(self.cow.path, limit, needed)
            try:
                self.cow.write_header(fallocate=new)
            except OSError as e:
                raise SnapError(e.errno or errno.EIO, f"cannot raise the limit of "
                                f"{self.cow.path} to {new} bytes: {e.strerror}")
        log.info("%s: limit raised from %d to %d bytes (auto-expand)", self.cow.path, limit, new)
        self.space.expanded(limit, new, auto=True)

    def _copy(self, claim: Claim, first: int, end: int, data: memoryview | None = None,
              base: int = 0, zeroing: bool = False) -> int:
        """Step 3: old data to its slots, then the entries; blocks outside [first, end)
        are saved AHEAD (not changed). ``data``: the old content of the blocks from
        ``base``, if already read. Return the bits (from ``base``) of the blocks saved as
        zeros whose content a write-zeroes keeps."""
        kept = 0
        for block, n, slot in claim.runs:
            p = min(max(first - block, 0), n)  # blocks before the request: ahead
            q = min(max(end - block, p), n)  # from here on: ahead again
            if not slot:  # old content all zeros: an entry, no data
                if zeroing:  # zeros over zeros: nothing changes
                    p = q = 0
                    kept |= span_bits(0, n) << (block - base)
                entries, changed = zero_entries(block, n, p, q, self.seed)
            else:
                buf = self._old_data(block, n, data, base)
                entries, changed = saved_entries(slot, p, q,
                                                 block_checksums(buf, block, self.seed))
                self._into_store(self.cow.write_data, slot, buf)
            self._into_store(self.cow.write_entries, block, entries)
            claim.entries.append(entries)
            claim.changed.append(changed)
        if self.durable:  # old data and entries reach the disk before the overwrite can
            self.group_sync.sync()
        return kept

    def _into_store(self, write, where: int, what) -> None:
        """A write of saved data or its entries; a full file system is an overflow (the
        index in memory stays right: the entries are published only after this)."""
        try:
            write(where, what)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise StoreFull(errno.ENOSPC, f"the file system of COW file {self.cow.path} is "
                            "full; the snapshot can no longer be kept")

    def _old_data(self, block: int, n: int, data: memoryview | None, base: int) -> memoryview:
        """The old content of blocks [block, block + n): from ``data`` or the origin."""
        if data is not None:
            return data[(block - base) << BLOCK_SHIFT:(block - base + n) << BLOCK_SHIFT]
        buf = copy_buffer(n << BLOCK_SHIFT)
        got = self.origin_io.pread_into(buf, block << BLOCK_SHIFT)
        if got < len(buf):  # the origin's last, partial block: pad with zeroes
            buf[got:] = bytes(len(buf) - got)
        return buf

    def mark_incremental(self, clean: bool, health: Health | None = None) -> None:
        """The header says "incremental": every mark written and the index synced first
        (it is the list from now on; write intents only cover later changes). The saved
        data is still there: snapshot reads in flight go on until ``quiesce``.
        ``health``: the list's from now on (a fresh one clears an overflow's failure)."""
        self.apply_marks()
        self.index.flush()
        self.cow.sync()
        self.checkpoint(clean, flags=self.cow.header.flags | FLAG_INCREMENTAL, health=health)
