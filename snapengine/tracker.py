"""Copy-before-write, change marking and snapshot reads on one COW file.

Design notes
------------
Two facts per block of a tracked origin: **saved** (snapshot mode: its old data is in
the COW file) and **changed** (it was written since the snapshot point). A saved block
passes through these states:

    UNSAVED    no entry, no claim
    CLAIMED    one writer owns it: it is copying the old data
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
 4. Under the lock: publish the entries; wait for every read that started before this
    point and overlaps the claim; set SAVED (and changed); drop the claim.
 5. Blocks of the request saved earlier but not yet changed (AHEAD), or, in incremental
    mode, not yet marked: make the write-intent bit of their 64 MiB region durable
    (once per region between clean points), then queue the change mark (lock-free).
    Queued marks are applied to the pages in batches, and always before a count is
    read or a checkpoint is taken; a page with marks is dirty: they reach the disk
    when it is evicted or at a clean point.
 6. The origin writes the new data.

Why it is safe: a block of the origin is overwritten only after its old data and then
its entry are in the COW file (written through: a crash of the process cannot lose
them), and after every snapshot read that could have chosen to read that block from
the origin has finished. A read that starts later sees the entry and reads the saved
copy. Two writers of one block never both copy it (the claim), and the second cannot
overwrite it before the first has saved it (it waits on the claim). Change marks may
be lost by a crash, but never unnoticed: their region's intent bit was durable first,
and recovery counts every block of a marked region as changed (a superset).

Read path (``read``), lock-free when the page is cached: register a hold (a ticket
and a dict entry, both atomic), take the entries; read saved blocks from the COW file
(checking each block's checksum) and the others from the origin; drop the hold. A
writer in step 4 takes a ticket after publishing, and waits for every older hold.

Failure: any error while saving (I/O, ENOSPC, the ``-f`` limit, a corrupt index page)
fails the snapshot. ``error`` is set, waiting writers are released, every later write
goes straight to the origin, reads answer EIO. The write that met the error succeeds:
the origin never loses a write.

No lock is held across I/O: page loads and write-backs (index.py), data copies and
intent syncs release it.
"""

from __future__ import annotations

import errno
import logging
import threading
from array import array
from collections import deque
from itertools import chain, compress, count, repeat
from operator import and_
import xxhash

from .cowfile import (
    AHEAD,
    FLAG_CLEAN,
    FLAG_FAILED,
    FLAG_INCREMENTAL,
    INTENT_SHIFT,
    MARK,
    SLOT_MASK,
    CowFile,
    block_checksums,
    block_checksums_at,
    boot_id,
    mark_checksum,
    mark_checksums,
)
from .errors import SnapError
from .fileio import FileIO, GroupSync
from .health import Health
from .index import Index, IndexPage, bit_runs
from .units import BLOCK_SHIFT, BLOCK_SIZE, nr_blocks

_xxh3 = xxhash.xxh3_64_intdigest  # one saved block's checksum (see cowfile.block_checksums)

log = logging.getLogger(__name__)

PAGE_SHIFT = 8  # log2(PAGE_BLOCKS): block >> PAGE_SHIFT is its index page
PAGE_MASK = (1 << PAGE_SHIFT) - 1
COPY_BLOCKS = 16  # blocks saved together on a first touch: 64 KiB clusters, as qemu
REGION_SHIFT = INTENT_SHIFT - BLOCK_SHIFT  # block >> REGION_SHIFT is its write-intent region
REUSE_MAX = 1 << 20  # copy buffers up to this size are kept per thread (16 threads: 16 MiB)
MARK_BATCH = 64  # queued change marks applied together, under one lock
MARK_CAP = 4096  # queued marks beyond which a writer waits to apply them

_local = threading.local()


def copy_buffer(nbytes: int) -> memoryview:
    """A scratch buffer of ``nbytes`` for this thread (reused: no allocation per copy)."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < nbytes:
        if nbytes > REUSE_MAX:
            return memoryview(bytearray(nbytes))
        buf = _local.buf = bytearray(REUSE_MAX)
    return memoryview(buf)[:nbytes]


class Claim:
    """Blocks one writer is saving: runs of (block, count, first slot)."""

    __slots__ = ("first", "end", "runs", "pages", "entries", "changed")

    def __init__(self, first: int, end: int, runs: list[tuple[int, int, int]],
                 pages: list[IndexPage]) -> None:
        self.first = first
        self.end = end
        self.runs = runs
        self.pages = pages
        self.entries: list[array] = []
        self.changed: list[int] = []  # per run: bits of the blocks the write changes


class CowTracker:
    """Base of both modes: change marks, write intents, failure, the header.

    Locking: ``_lock`` guards the index (and its cache) and the claims; it is held for
    in-memory work only. ``_cond`` (on the same lock) is waited on by writers for other
    claims, by committing writers for older reads (``_draining``), and by page loads.
    Reads register and drop their holds without the lock (atomic dict operations) and
    take it only to wake a draining writer.
    """

    def __init__(self, cow: CowFile, origin_io: FileIO, max_cache_bytes: int,
                 health: Health | None = None) -> None:
        self.cow = cow
        self.origin_io = origin_io
        self.seed = cow.header.seed
        self.nr_blocks = nr_blocks(cow.header.origin_size)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.index = Index(cow, self._cond, max_cache_bytes)
        self._nr_changed = cow.header.nr_changed_blocks  # marks applied; see nr_changed
        self._pending: deque[tuple[int, int]] = deque()  # change marks not yet applied
        self.next_slot = cow.header.nr_slots + 1
        self.health = Health() if health is None else health  # the minor's: one failure
        if cow.header.error and not self.health.error:
            self.health.fail(SnapError(-cow.header.error,
                                       f"failed before (error {cow.header.error})"))
        self.durable = cow.header.durable
        self.group_sync = GroupSync(cow.io)
        self._claims: list[Claim] = []
        self._waiting = 0  # writers waiting for a claim to end
        self._holds: dict[int, tuple[int, int]] = {}  # reads in flight: ticket -> blocks
        self._tickets = count()  # next() is atomic: read tickets, and writers' horizons
        self._draining = 0  # threads waiting for reads to end: reads must wake them
        self._closed = False
        self._intent_lock = threading.Lock()
        self._intent_written: dict[int, int] = {}  # bitmap byte -> value written
        self._intent_durable: dict[int, int] = {}  # bitmap byte -> bits known durable
        for region in cow.read_intents():
            byte, bit = region >> 3, 1 << (region & 7)
            self._intent_written[byte] = self._intent_durable[byte] = \
                self._intent_written.get(byte, 0) | bit

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

    def _save(self, first: int, end: int) -> None:
        """Snapshot mode: copy what is not saved yet (steps 2 to 4)."""

    def _mark_changed(self, first: int, end: int) -> None:
        """Step 5: mark changed the blocks of [first, end) saved but not changed. The
        region's intent is durable first; the mark itself is queued (an atomic append,
        no lock: writers do not contend) and applied with others in one batch."""
        self._record_intents(first, end)
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
                pending = self._pending
                while pending:
                    first, end = pending.popleft()
                    for page, bits in Index.unchanged(self.index.pages(first, end), first, end):
                        bits = self._set_changed(page, bits)
                        page.changed |= bits
                        page.dirty = True
                        page.version += 1
                        self._nr_changed += bits.bit_count()
            finally:
                self._lock.release()
        except Exception as e:  # a page could not be loaded: the list is broken
            self.fail(e)

    @property
    def nr_changed(self) -> int:
        """Blocks changed since the snapshot point (queued marks applied first)."""
        self.apply_marks()
        return self._nr_changed

    def _set_changed(self, page: IndexPage, bits: int) -> int:
        """Turn the entries of ``bits`` (unchanged blocks of ``page``) into changed
        ones, in memory; return the bits that may be marked changed."""
        raise NotImplementedError

    def _record_intents(self, first: int, end: int) -> None:
        """Make the write-intent bits of the regions of [first, end) durable, if not yet."""
        durable = self._intent_durable
        region = first >> REGION_SHIFT
        if region == (end - 1) >> REGION_SHIFT and durable.get(region >> 3, 0) >> (region & 7) & 1:
            return  # the usual case, lock-free
        new = [r for r in range(region, ((end - 1) >> REGION_SHIFT) + 1)
               if not durable.get(r >> 3, 0) >> (r & 7) & 1]
        if not new:
            return
        with self._intent_lock:
            written = self._intent_written
            for byte in {r >> 3 for r in new}:
                value = written.get(byte, 0)
                for r in new:
                    if r >> 3 == byte:
                        value |= 1 << (r & 7)
                if value != written.get(byte, 0):
                    self.cow.write_intent_byte(byte, value)
                    written[byte] = value
        self.group_sync.sync()  # covers what we (and anyone before us) wrote
        with self._intent_lock:
            for r in new:
                durable[r >> 3] = durable.get(r >> 3, 0) | 1 << (r & 7)

    def _forget_intents(self) -> None:
        """At a clean point (every mark written and synced): no region is in doubt."""
        with self._intent_lock:
            self.cow.clear_intents(self._intent_written)
            self._intent_written.clear()
            self._intent_durable.clear()

    # -- reads in flight ----------------------------------------------------------------
    def _drain(self, before: int, first: int, end: int) -> None:
        """Wait, with ``_lock`` held, until no read older than ticket ``before`` overlaps
        blocks [first, end). Reads delete their hold before looking at ``_draining``;
        a drainer raises ``_draining`` before it looks at the holds: no lost wake-up."""
        self._draining += 1
        try:
            while any(h < before and f < end and first < e
                      for h, (f, e) in list(self._holds.items())):
                self._cond.wait()
        finally:
            self._draining -= 1

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
            self.cow.write_header(flags=self.cow.header.flags | FLAG_FAILED, error=self.health.error)
        except OSError as e2:
            log.error("%s: cannot record the failure in the header: %s", self.cow.path, e2)

    def quiesce(self) -> None:
        """Stop serving: wait for reads in flight; later reads get ENXIO.

        The caller has closed the origin's write gate, so no write is in flight."""
        with self._lock:
            self._closed = True
            self._drain(next(self._tickets), 0, 1 << 62)

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
            self._forget_intents()
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
    """Snapshot mode: saves old data before overwrite and serves the snapshot image."""

    def _save(self, first: int, end: int) -> None:
        lo = first & ~(COPY_BLOCKS - 1)  # whole clusters: their neighbours come along
        hi = min(-(-end // COPY_BLOCKS) * COPY_BLOCKS, self.nr_blocks)
        with self._lock:
            claim = self._claim(lo, hi)
        if claim is None:
            return
        try:
            self._copy(claim, first, end)
        except BaseException:
            with self._lock:
                self._release(claim)
            raise
        with self._lock:
            for (block, _, _), entries in zip(claim.runs, claim.entries):
                Index.store(claim.pages, block, entries)  # PUBLISHED
            self._drain(next(self._tickets), claim.first, claim.end)
            for (block, n, _), changed in zip(claim.runs, claim.changed):
                Index.mark(claim.pages, block, n, changed)  # SAVED
                self._nr_changed += changed.bit_count()
            self._release(claim)

    def _claim(self, first: int, end: int) -> Claim | None:
        while True:
            if self.health.error or self._closed:
                return None
            pages = self.index.pages(first, end)
            todo = Index.unsaved(pages, first, end)
            if not todo:
                return None
            lo, hi = todo[0][0], todo[-1][0] + todo[-1][1]
            if not any(c.first < hi and lo < c.end for c in self._claims):
                break
            self._waiting += 1
            try:
                self._cond.wait()
            finally:
                self._waiting -= 1
        claim = Claim(lo, hi, self._allocate(todo), pages)
        for page in pages:
            page.pins += 1
        self._claims.append(claim)
        return claim

    def _release(self, claim: Claim) -> None:
        for page in claim.pages:
            page.pins -= 1
        if claim in self._claims:
            self._claims.remove(claim)
        if self._waiting:
            self._cond.notify_all()

    def _allocate(self, todo: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        n = todo[0][1] if len(todo) == 1 else sum(count for _, count in todo)
        limit = self.cow.header.fallocate
        if (self.next_slot - 1 + n) * BLOCK_SIZE > limit:
            raise SnapError(errno.EFBIG, f"COW file {self.cow.path} reached its limit of "
                            f"{limit} bytes (-f); the snapshot can no longer be kept")
        runs = []
        for block, count_ in todo:
            runs.append((block, count_, self.next_slot))
            self.next_slot += count_
        self.index.slot_limit = self.next_slot - 1
        return runs

    def _copy(self, claim: Claim, first: int, end: int) -> None:
        """Step 3: old data to its slots, then the entries; blocks outside [first, end)
        are saved AHEAD (not changed)."""
        for block, n, slot in claim.runs:
            data = copy_buffer(n << BLOCK_SHIFT)
            got = self.origin_io.pread_into(data, block << BLOCK_SHIFT)
            if got < len(data):  # the origin's last, partial block: pad with zeroes
                data[got:] = bytes(len(data) - got)
            p = min(max(first - block, 0), n)  # blocks before the request: ahead
            q = min(max(end - block, p), n)  # from here on: ahead again
            entries = array("Q", bytes(16 * n))
            entries[0::2] = array("Q", chain(range(AHEAD + slot, AHEAD + slot + p),
                                             range(slot + p, slot + q),
                                             range(AHEAD + slot + q, AHEAD + slot + n)))
            entries[1::2] = block_checksums(data, block, self.seed)
            self.cow.write_data(slot, data)
            self.cow.write_entries(block, entries)
            claim.entries.append(entries)
            claim.changed.append(((1 << (q - p)) - 1) << p)
        if self.durable:  # old data and entries reach the disk before the overwrite can
            self.group_sync.sync()

    def _set_changed(self, page: IndexPage, bits: int) -> int:
        entries = page.entries
        bits &= page.saved  # never a block whose old data is not safe (a failed copy)
        for start, length in bit_runs(bits):
            for i in range(2 * start, 2 * (start + length), 2):
                entries[i] &= SLOT_MASK
        return bits

    def become_incremental(self, clean: bool) -> None:
        """Keep only the record of changed blocks: every mark written and the index
        synced (it is the list from now on; write intents only cover later changes),
        the header, then the data dropped."""
        self.apply_marks()
        self.index.flush()
        self.cow.sync()
        self.checkpoint(clean, flags=self.cow.header.flags | FLAG_INCREMENTAL)
        self.cow.release_data()

    # -- the read path ----------------------------------------------------------------
    def read(self, buf, offset: int) -> None:
        """Fill ``buf`` with the snapshot image from ``offset``."""
        length = len(buf)
        if not length:
            return
        first = offset >> BLOCK_SHIFT
        end = (offset + length + BLOCK_SIZE - 1) >> BLOCK_SHIFT
        hold = next(self._tickets)
        self._holds[hold] = (first, end)  # before looking at anything: see _drain
        try:
            if self.health.error or self._closed:
                raise self._unreadable()
            page = self.index.peek(first >> PAGE_SHIFT) if length == BLOCK_SIZE else None
            if page is not None and not offset & (BLOCK_SIZE - 1):  # one aligned block
                i = (first & PAGE_MASK) << 1  # (the usual 4 KiB read: no array built)
                slot = page.entries[i] & SLOT_MASK
                if not slot:
                    if self.origin_io.pread_into(buf, offset) != BLOCK_SIZE:
                        self._read_origin(buf, offset)  # says what is wrong
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
            self.fail(e)  # bad data or a corrupt index page: the snapshot is broken
            raise SnapError(errno.EIO, e.detail)
        finally:
            del self._holds[hold]
            if self._draining:
                with self._lock:
                    self._cond.notify_all()

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
        with self._lock:
            return Index.entries(self.index.pages(first, end), first, end)

    def _unreadable(self) -> SnapError:
        if self.health.error:
            return SnapError(errno.EIO, f"the snapshot has failed: {self.reason}")
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
        blocks not saved, from the origin), then every saved block's checksum checked in
        one C-level pass."""
        slots = array("Q", map(and_, entries[0::2], repeat(SLOT_MASK)))
        n = len(slots)
        cow, origin = self.cow.io, self.origin_io
        slot_base = self.cow.header.data_offset - BLOCK_SIZE  # slot s is at base + s * 4096
        i = 0
        while i < n:
            slot = slots[i]
            j = i + 1
            while j < n and slots[j] == (slot + j - i if slot else 0):
                j += 1
            dst = view[i << BLOCK_SHIFT:j << BLOCK_SHIFT]
            if slot:
                if cow.pread_into(dst, slot_base + (slot << BLOCK_SHIFT)) != len(dst):
                    raise SnapError(errno.EIO, f"{self.cow.path}: saved data of blocks "
                                    f"{first + i}-{first + j - 1} (slot {slot}) is truncated")
            else:
                got = origin.pread_into(dst, (first + i) << BLOCK_SHIFT)
                dst[got:] = bytes(len(dst) - got)  # past the origin's end: zeroes
            i = j
        saved = n - slots.count(0)
        if saved == n:
            sums, csums = block_checksums(view, first, self.seed), entries[1::2]
            where = list(range(n))
        else:  # only the saved blocks carry checksums
            where = list(compress(range(n), slots))
            sums = block_checksums_at(view, where, first, self.seed)
            csums = array("Q", [entries[2 * k + 1] for k in where])
        if sums != csums:
            bad = where[next(k for k in range(len(sums)) if sums[k] != csums[k])]
            k = where.index(bad)
            raise SnapError(errno.EIO, f"{self.cow.path}: saved data of block {first + bad} "
                            f"(slot {slots[bad]}, offset {self.cow.slot_offset(slots[bad])}) "
                            f"fails its checksum: stored {csums[k]:#018x}, computed "
                            f"{sums[k]:#018x}")


class IncrementalTracker(CowTracker):
    """Incremental mode: records which blocks change, keeps no data. A change costs a
    mark in memory; the write-intent record keeps crashes from losing it."""

    def _set_changed(self, page: IndexPage, bits: int) -> int:
        entries = page.entries
        first = page.number << PAGE_SHIFT
        if not bits & (bits - 1):  # one block: the usual 4 KiB write
            i = bits.bit_length() - 1
            if entries[2 * i]:
                entries[2 * i] &= SLOT_MASK  # saved AHEAD in the snapshot phase
            else:
                entries[2 * i], entries[2 * i + 1] = MARK, mark_checksum(first + i, self.seed)
            return bits
        for start, length in bit_runs(bits):
            lo, hi = 2 * start, 2 * (start + length)
            if entries[lo:hi].count(0) == hi - lo:  # the usual case: no entry yet
                entries[lo:hi:2] = array("Q", [MARK]) * length
                entries[lo + 1:hi:2] = mark_checksums(range(first + start, first + start + length),
                                                      self.seed)
                continue
            for i in range(start, start + length):  # saved AHEAD in the snapshot phase
                if entries[2 * i]:
                    entries[2 * i] &= SLOT_MASK
                else:
                    entries[2 * i], entries[2 * i + 1] = MARK, mark_checksum(first + i, self.seed)
        return bits
