"""Copy-before-write and change marking on one COW file: the two modes' policies.

Design notes
------------
Two facts per block of a tracked origin (entry.py says how an index entry holds
them): **saved** (snapshot mode: its old data is in the COW file) and **changed** (it
was written since the snapshot point). A saved block passes through these states:

    UNSAVED    no entry, no claim
    CLAIMED    one writer owns it: it is copying the old data (ordering.Claim)
    PUBLISHED  the entry is in memory: new readers read the saved copy; readers that
               started earlier may still be reading the origin
    SAVED      bit set in the page's ``saved``: writers may overwrite the origin

Write path (``before_write``, called by the origin before it changes blocks):

 1. Lock-free: every block of the request already changed (one int operation on the
    cached page)? Then return: this is the whole cost of a re-touch write.
 2. Snapshot mode, under the lock: the blocks not saved in the request's 64 KiB
    clusters (COPY_BLOCKS); wait while another claim overlaps them; claim them,
    allocate slots (the ``-f`` limit), pin their pages.
 3. Without the lock: read the old data from the origin, checksum it, write it to its
    slots, then write the entries: changed for the blocks of the request, AHEAD (saved,
    not changed) for the rest of their clusters. ``--durable``: fdatasync (group commit).
 4. Under the lock: publish the entries; drain every read that started before this
    point and overlaps the claim (ordering.py); set SAVED (and changed); drop the claim.
 5. Blocks of the request saved earlier but not yet changed (AHEAD), or, in incremental
    mode, not yet marked: make the write-intent bit of their 64 MiB region durable
    (intents.py), then queue the change mark (lock-free). Queued marks are applied to
    the pages in batches (entry.mark_changed), and always before a count is read or a
    checkpoint is taken; a page with marks is dirty: they reach the disk when it is
    evicted or at a clean point.
 6. The origin writes the new data.

Why it is safe: a block of the origin is overwritten only after its old data and then
its entry are in the COW file (written through: a crash of the process cannot lose
them), and after every snapshot read that could have chosen to read that block from
the origin has finished (snapread.py reads under a hold). A read that starts later
sees the entry and reads the saved copy. Two writers of one block never both copy it
(the claim), and the second cannot overwrite it before the first has saved it (it
waits on the claim). Change marks may be lost by a crash, but never unnoticed: their
region's intent bit was durable first, and recovery counts every block of a marked
region as changed (a superset).

Failure: any error while saving (I/O, ENOSPC, the ``-f`` limit, a corrupt index page)
fails the snapshot. ``error`` is set, waiting writers are released, every later write
goes straight to the origin, reads answer EIO. The write that met the error succeeds:
the origin never loses a write.

Trims and write-zeroes (``before_change``; docs/design.md has the table and why it
keeps both promises): during a snapshot a trim is dropped (NBD lets a server ignore
one: nothing changes, nothing is saved or marked); a write-zeroes saves the data it
overwrites and records blocks of zeros as ZERO_AHEAD (no slot, not marked). On every
first touch of a version 2 file, a file origin's holes are saved as zeros, without a
copy (oldzeros.py finds them, before the claim). In incremental mode both are applied
and the blocks that held data are marked.

No lock is held across I/O: page loads and write-backs (index.py), data copies and
intent syncs release it.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections import deque

from .cowfile import FLAG_CLEAN, FLAG_FAILED, FLAG_INCREMENTAL, CowFile, block_checksums, boot_id
from .entry import (
    PAGE_MASK,
    PAGE_SHIFT,
    bit_runs,
    mark_changed,
    saved_entries,
    span_bits,
    zero_entries,
)
from .errors import SnapError
from .fileio import FileIO, GroupSync
from .health import Health
from .index import Index
from .intents import WriteIntents
from .oldzeros import data_runs, old_zeros, split_runs
from .ordering import Claim, Ordering
from .origin import TRIM
from .snapread import SnapshotReader, copy_buffer
from .units import BLOCK_SHIFT, BLOCK_SIZE, nr_blocks

log = logging.getLogger(__name__)

COPY_BLOCKS = 16  # blocks saved together on a first touch: 64 KiB clusters, as qemu
ZERO_CHUNK = 256  # blocks of a write-zeroes read and saved at a time (1 MiB)


MARK_BATCH = 64  # queued change marks applied together, under one lock
MARK_CAP = 4096  # queued marks beyond which a writer waits to apply them


class CowTracker:
    """Base of both modes: change marks, write intents, failure, the header.

    Locking: ``_lock`` guards the index (and its cache) and the claims; it is held for
    in-memory work only. ``_cond`` (on the same lock) is waited on by writers for other
    claims, by committing writers for older reads (``Ordering.drain``), and by page
    loads. Reads register and drop their holds without the lock (ordering.py).
    """

    MARKS_WITHOUT_DATA = False  # a changed block with no saved entry gets a MARK (entry.py)

    def __init__(self, cow: CowFile, origin_io: FileIO, max_cache_bytes: int,
                 health: Health | None = None) -> None:
        self.cow = cow
        self.origin_io = origin_io
        self.seed = cow.header.seed
        self.nr_blocks = nr_blocks(cow.header.origin_size)
        self.origin_size = cow.header.origin_size
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.index = Index(cow, self._cond, max_cache_bytes)
        self.order = Ordering(self._cond)
        self._nr_changed = cow.header.nr_changed_blocks  # marks applied; see nr_changed
        self._pending: deque[tuple[int, int]] = deque()  # change marks not yet applied
        self.next_slot = cow.header.nr_slots + 1
        self.health = Health() if health is None else health  # the minor's: one failure
        if cow.header.error and not self.health.error:
            self.health.fail(SnapError(-cow.header.error,
                                       f"failed before (error {cow.header.error})"))
        self.durable = cow.header.durable
        self.group_sync = GroupSync(cow.io)
        self.intents = WriteIntents(cow, self.group_sync)

    # -- the write path ---------------------------------------------------------------
    def before_write(self, first: int, end: int) -> None:
        """Make blocks [first, end) safe to overwrite, and mark them changed.
        Never raises: a failure fails the snapshot, not the write."""
        number = first >> PAGE_SHIFT
        if (end - 1) >> PAGE_SHIFT == number:  # the re-touch path, inline and lock-free:
            page = self.index.peek(number)  # bits only ever get set, so a stale page
            if page is not None:  # cannot say "changed" wrongly
                want = (1 << (end - first)) - 1
                if page.changed >> (first & PAGE_MASK) & want == want:
                    return
        if first >= end or self.health.error:
            return
        try:
            self._save(first, end)
            self._mark_changed(first, end)
        except Exception as e:  # the write goes on; the snapshot says it is broken
            self.fail(e)

    def before_change(self, first: int, end: int, kind: str) -> bool:
        """A trim or write-zeroes (``kind``) of blocks [first, end) is about to be
        applied; return whether the origin applies it. Never raises. Here (incremental
        mode): applied, and the blocks that held data are marked changed."""
        if first >= end or self.health.error:
            return True
        try:
            for lo, hi in data_runs(self.origin_io, self.origin_size, first, end):
                self._mark_changed(lo, hi)
        except Exception as e:
            self.fail(e)
        return True

    def _save(self, first: int, end: int) -> None:
        """Snapshot mode: copy what is not saved yet (steps 2 to 4)."""

    def _mark_changed(self, first: int, end: int) -> None:
        """Step 5: mark changed the blocks of [first, end) saved but not changed. The
        region's intent is durable first; the mark itself is queued (an atomic append,
        no lock: writers do not contend) and applied with others in one batch."""
        self.intents.record(first, end)
        self._pending.append((first, end))
        queued = len(self._pending)
        if queued >= MARK_BATCH:  # someone applies them; only past the cap must we wait
            self.apply_marks(blocking=queued >= MARK_CAP)

    def apply_marks(self, blocking: bool = True) -> None:
        """Apply the queued change marks to the index pages (in memory: they become
        dirty). Call without the lock; done before every checkpoint and every count.
        Not ``blocking``: give up at once if another thread holds the lock (it is
        probably applying them already)."""
        if not self._pending or not self._lock.acquire(blocking):
            return
        try:
            try:
                self._apply_pending()
            finally:
                self._lock.release()
        except Exception as e:  # a page could not be loaded: the list is broken
            self.fail(e)

    def _apply_pending(self) -> None:
        pending, seed, marks = self._pending, self.seed, self.MARKS_WITHOUT_DATA
        while pending:
            first, end = pending.popleft()
            for page, bits in Index.unchanged(self.index.pages(first, end), first, end):
                bits = mark_changed(page.entries, page.number << PAGE_SHIFT, bits, page.saved,
                                    seed, marks)
                page.changed |= bits
                page.dirty = True
                page.version += 1
                self._nr_changed += bits.bit_count()

    @property
    def nr_changed(self) -> int:
        """Blocks changed since the snapshot point (queued marks applied first)."""
        self.apply_marks()
        return self._nr_changed

    # -- failure and life cycle ---------------------------------------------------------
    @property
    def error(self) -> int:
        return self.health.error

    @property
    def reason(self) -> str:
        return self.health.reason

    def fail(self, e: BaseException) -> None:
        """Fail the snapshot or change list for good, keeping the first reason."""
        with self._lock:
            if not self.health.fail(e):
                return
            self._cond.notify_all()
        log.error("%s: tracking failed, the COW file is no longer valid: %s",
                  self.cow.path, self.reason)
        try:
            self.cow.write_header(flags=self.cow.header.flags | FLAG_FAILED,
                                  error=self.health.error)
        except OSError as e2:
            log.error("%s: cannot record the failure in the header: %s", self.cow.path, e2)

    def quiesce(self) -> None:
        """Stop serving: wait for reads in flight; later reads get ENXIO.

        The caller has closed the origin's write gate, so no write is in flight."""
        with self._lock:
            self.order.close()

    def checkpoint(self, clean: bool, flags: int | None = None) -> None:
        """Write the header with the counters; if ``clean``, first write every pending
        mark and sync everything, then forget the write intents.

        Call with no write in flight (the origin's gate closed, or no client)."""
        nr_changed = self.nr_changed  # applies the queued marks (which may fail it)
        h = self.cow.header
        flags = h.flags if flags is None else flags
        flags = flags | FLAG_CLEAN if clean else flags & ~FLAG_CLEAN
        if self.health.error:
            flags |= FLAG_FAILED
        if clean:
            self.index.flush()
            self.cow.sync()
            self.intents.forget()
        self.cow.write_header(flags=flags, nr_changed_blocks=nr_changed,
                              nr_slots=self.nr_slots, error=self.health.error,
                              boot_id=h.boot_id if clean else boot_id())

    @property
    def nr_slots(self) -> int:
        return self.next_slot - 1

    @property
    def cache_bytes(self) -> int:
        return self.index.cache_bytes

    def resize_cache(self, max_cache_bytes: int) -> None:
        with self._lock:
            self.index.resize(max_cache_bytes)
            self.index.write_evicted()


class SnapshotTracker(CowTracker):
    """Snapshot mode: saves old data before overwrite and serves the snapshot image
    (``read(buf, offset)``: snapread.SnapshotReader.read)."""

    MARKS_WITHOUT_DATA = False  # a block whose copy failed is not marked: it is not saved

    def __init__(self, cow: CowFile, origin_io: FileIO, max_cache_bytes: int,
                 health: Health | None = None) -> None:
        super().__init__(cow, origin_io, max_cache_bytes, health)
        self.zeros_ok = cow.header.version >= 2  # entries saved as zeros may be written
        self.reader = SnapshotReader(cow, origin_io, self.index, self.order, self.health,
                                     self.fail)
        self.read = self.reader.read  # bound once: the export calls it with no hop between

    def before_change(self, first: int, end: int, kind: str) -> bool:
        """A trim is dropped; a write-zeroes saves what it would change (the design
        notes): blocks whose old content is zeros are saved as zeros, and not marked."""
        if self.health.error:
            return True  # failed: the origin is served untracked
        if kind == TRIM:
            return False
        try:
            for lo in range(first, end, ZERO_CHUNK):
                hi = min(lo + ZERO_CHUNK, end)
                kept = self._save(lo, hi, zeroing=True)
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
        zeros, data = 0, None
        if self.zeros_ok and not self._all_saved(lo, hi):
            zeros, data = old_zeros(self.origin_io, self.origin_size, lo, hi, zeroing)
        with self._lock:
            claim = self._claim(lo, hi, zeros)
        if claim is None:
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
            raise SnapError(errno.EFBIG, f"COW file {self.cow.path} reached its limit of "
                            f"{limit} bytes (-f); the snapshot can no longer be kept")
        out = []
        for block, n, slot in runs:
            if slot:
                out.append((block, n, self.next_slot))
                self.next_slot += n
            else:
                out.append((block, n, 0))
        self.index.slot_limit = self.next_slot - 1
        return out

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
                self.cow.write_data(slot, buf)
            self.cow.write_entries(block, entries)
            claim.entries.append(entries)
            claim.changed.append(changed)
        if self.durable:  # old data and entries reach the disk before the overwrite can
            self.group_sync.sync()
        return kept

    def _old_data(self, block: int, n: int, data: memoryview | None, base: int) -> memoryview:
        """The old content of blocks [block, block + n): from ``data`` or the origin."""
        if data is not None:
            return data[(block - base) << BLOCK_SHIFT:(block - base + n) << BLOCK_SHIFT]
        buf = copy_buffer(n << BLOCK_SHIFT)
        got = self.origin_io.pread_into(buf, block << BLOCK_SHIFT)
        if got < len(buf):  # the origin's last, partial block: pad with zeroes
            buf[got:] = bytes(len(buf) - got)
        return buf

    def mark_incremental(self, clean: bool) -> None:
        """The header says "incremental": every mark written and the index synced first
        (it is the list from now on; write intents only cover later changes). The saved
        data is still there: snapshot reads in flight go on until ``quiesce``."""
        self.apply_marks()
        self.index.flush()
        self.cow.sync()
        self.checkpoint(clean, flags=self.cow.header.flags | FLAG_INCREMENTAL)


class IncrementalTracker(CowTracker):
    """Incremental mode: records which blocks change, keeps no data. A change costs a
    mark in memory; the write-intent record keeps crashes from losing it."""

    MARKS_WITHOUT_DATA = True
