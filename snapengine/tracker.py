"""Copy-before-write and change marking on one COW file: the two modes' policies
(the snapshot one in snapshot.py).

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
    allocate slots (the ``-f`` limit), pin their pages. Skipped, without the lock,
    when the cached page's saved bits already cover the clusters (a cluster saved
    ahead): those bits are set only in step 4, once nothing more is to be done.
 3. Without the lock: read the old data from the origin, checksum it, write it to its
    slots, then write the entries: changed for the blocks of the request, AHEAD (saved,
    not changed) for the rest of their clusters. ``--durable``: fdatasync (group commit).
 4. Under the lock: publish the entries; drain every read that started before this
    point and overlaps the claim (ordering.py); set SAVED (and changed); drop the claim.
 5. Blocks of the request saved earlier but not yet changed (AHEAD), or, in incremental
    mode, not yet marked: make the write-intent bit of their 64 MiB region durable
    (intents.py), then queue the change mark (lock-free). Queued marks are applied to
    the pages under the lock, a few by each writer that finds MARK_BATCH queued
    (entry.mark_changed, entry.write_marks), and all before a count is read or a
    checkpoint is taken; a page with marks is dirty: they reach the disk when it is
    evicted or at a clean point. Applying never lets go of the lock between setting
    a page's changed bits and writing their entries.
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

Block status (extents.py) leans on the same order: it looks at the origin's holes,
then at the index; a block still not saved then had not changed on the origin, so a
hole seen for it is the snapshot's content (zeros), whatever write races the query.

Failure: any error while saving (I/O, the ``-f`` limit, a corrupt index page) fails the
snapshot. ``error`` is set, waiting writers are released, every later write goes on to
the origin, reads answer EIO. The write that met the error succeeds: the origin never
loses a write. A store that is full (errors.StoreFull: the limit that cannot grow, or
ENOSPC) keeps the change list: the saved data is released and the snapshot tracker
records marks only, as in incremental mode (docs/design.md, "When the COW store fills
up"). A write that goes on because of a failure waits until the failure is in the
header (``failure_barrier``).

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

import logging
import threading
from array import array
from collections import deque

from .cowfile import FLAG_CLEAN, FLAG_FAILED, FLAG_KEPT, CowFile, boot_id
from .entry import PAGE_MASK, PAGE_SHIFT, changed_slot, mark_changed, write_marks
from .errors import SnapError, StoreFull
from .fileio import FileIO, GroupSync
from .health import Health
from .index import Index
from .intents import WriteIntents
from .oldzeros import KnownData, data_runs
from .ordering import Ordering
from .space import Space
from .units import nr_blocks

log = logging.getLogger(__name__)

MARK_BATCH = 32  # queued change marks from which writers apply them, under the lock
MARK_STEP = 2  # marks one writer applies then: the work spread evenly over the writes
# (a writer applying a batch of 64 took ~150 us, +180 us on the p99 of a write at
# iodepth 1; docs/performance.md)
MARK_CAP = 4096  # queued marks beyond which a writer waits to apply them all


def failure_flags(flags: int, health: Health) -> int:
    """Header ``flags`` with FAILED, and KEPT (the change list survived), as ``health``
    says: the one place that turns a minor's failure into its header's flags."""
    flags &= ~(FLAG_FAILED | FLAG_KEPT)
    if health.error:
        flags |= FLAG_FAILED | FLAG_KEPT if health.kept else FLAG_FAILED
    return flags


class CowTracker:
    """Base of both modes: change marks, write intents, failure, the header.

    Locking: ``_lock`` guards the index (and its cache) and the claims; it is held for
    in-memory work only. ``_cond`` (on the same lock) is waited on by writers for other
    claims, by committing writers for older reads (``Ordering.drain``), and by page
    loads. Reads register and drop their holds without the lock (ordering.py).
    """

    MARKS_WITHOUT_DATA = False  # a changed block with no saved entry gets a MARK (entry.py)

    def __init__(self, cow: CowFile, origin_io: FileIO, max_cache_bytes: int,
                 health: Health | None = None, space: Space | None = None) -> None:
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
        self.space = Space() if space is None else space  # the minor's: auto-expand
        self._fail_lock = threading.Lock()  # held from a failure until it is on disk
        h = cow.header
        if h.error and not self.health.error:
            kind, kept = (StoreFull, ", its change list kept") if h.kept else (SnapError, "")
            self.health.fail(kind(-h.error, f"the snapshot had already failed (error "
                                  f"{h.error}{kept})"))
        self.durable = cow.header.durable
        self.group_sync = GroupSync(cow.io)
        self.intents = WriteIntents(cow)
        self.known_data = KnownData()  # the origin's data runs seen (oldzeros.py)

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
        if first >= end:
            return
        if not self.health.tracking:
            self.failure_barrier()
            return
        try:
            try:
                self._save(first, end)
            except StoreFull as e:  # the snapshot is lost, its change list is not
                self.fail(e)
            self._mark_changed(first, end)
        except Exception as e:  # the write goes on; the snapshot says it is broken
            self.fail(e)

    def before_change(self, first: int, end: int, kind: str) -> bool:
        """A trim or write-zeroes (``kind``) of blocks [first, end) is about to be
        applied; return whether the origin applies it. Never raises. Here (incremental
        mode): applied, and the blocks that held data are marked changed."""
        if first >= end or not self.health.tracking:
            self.failure_barrier()
            return True
        try:
            for lo, hi in data_runs(self.origin_io, self.origin_size, first, end,
                                    self.known_data):
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
        if queued >= MARK_BATCH:  # a few each; only past the cap must a writer wait
            if queued < MARK_CAP:
                self.apply_marks(blocking=False, limit=MARK_STEP)
            else:
                self.apply_marks()

    def apply_marks(self, blocking: bool = True, limit: int = -1) -> None:
        """Apply the queued change marks (the oldest ``limit``; -1: all) to the index
        pages (in memory: they become dirty). Call without the lock; done before every
        checkpoint and every count. Not ``blocking``: give up at once if another thread
        holds the lock (it is probably applying them already)."""
        if not self._pending or not self._lock.acquire(blocking):
            return
        try:
            try:
                self._apply_pending(limit)
            finally:
                self._lock.release()
        except Exception as e:  # a page could not be loaded: the list is broken
            self.fail(e)

    def _apply_pending(self, limit: int) -> None:
        # after an overflow, blocks written unsaved are marked, as in incremental mode
        pending = self._pending
        marks = self.MARKS_WITHOUT_DATA or self.health.error != 0
        cached = self.index.cached
        fresh: list[tuple[array, int]] = []  # blocks to MARK: checksums in one pass
        while pending and limit:  # (-1 counts down for ever)
            limit -= 1
            first, end = pending.popleft()
            page = cached(first >> PAGE_SHIFT) if end - first == 1 else None
            if page is None:  # several blocks, or a page to load (the lock is released:
                write_marks(fresh, self.seed)  # no entry may wait across that)
                fresh = []
                self._apply_run(first, end, marks)
                continue
            bit = 1 << (first & PAGE_MASK)  # the usual 4 KiB mark, inline
            if page.changed & bit:
                continue
            if page.saved & bit:
                i = (first & PAGE_MASK) << 1
                page.entries[i] = changed_slot(page.entries[i])
            elif marks:
                fresh.append((page.entries, first))
            else:  # snapshot mode, its copy failed: it must not pass for saved
                continue
            page.changed |= bit
            page.dirty = True
            page.version += 1
            self._nr_changed += 1
        write_marks(fresh, self.seed)

    def _apply_run(self, first: int, end: int, marks: bool) -> None:
        """One queued mark of blocks [first, end), any size, pages loaded as needed."""
        for page, bits in Index.unchanged(self.index.pages(first, end), first, end):
            bits = mark_changed(page.entries, page.number << PAGE_SHIFT, bits, page.saved,
                                self.seed, marks)
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
        """Fail the snapshot, or the change list, keeping the first reason; the failure
        is on disk before any write that sees it goes on (``failure_barrier``). An
        overflow (StoreFull) keeps the list and releases the saved data."""
        with self._fail_lock:
            if not self.health.fail(e):  # from here no claim starts, no slot is taken
                return
            with self._lock:  # a claim that missed the failure has its slots by now
                self._cond.notify_all()
            self._record_failure()
        kept = self.health.kept
        log.error("%s: %s: %s", self.cow.path, "the snapshot failed, its change list is "
                  "kept" if kept else "tracking failed, the COW file is no longer valid",
                  self.reason)
        if kept:
            self._release_saved()

    def _record_failure(self) -> None:
        """The failure into the header. If that fails, the file cannot say that its
        list is kept: the list is lost too."""
        flags = failure_flags(self.cow.header.flags, self.health)
        try:  # nr_slots: every slot an entry may name (the index is checked against it)
            self.cow.write_header(flags=flags, error=self.health.error, nr_slots=self.nr_slots)
        except OSError as e2:
            log.error("%s: cannot record the failure in the header: %s", self.cow.path, e2)
            self.health.fail(e2)  # a kept list is lost with it

    def failure_barrier(self) -> None:
        """A write that goes on because of a failure waits until it is on disk: else a
        crash could leave a header that vouches for data the write changed."""
        with self._fail_lock:
            pass

    def _release_saved(self) -> None:
        """After an overflow: wait for the copies in flight, then give the saved data's
        space back to the file system (the snapshot is gone, the index stays)."""
        with self._lock:
            self.order.settle()
        try:
            self.cow.release_data()
        except OSError as e:  # only space is lost: the header says failed already
            log.warning("%s: cannot release the saved data: %s", self.cow.path, e)

    def quiesce(self) -> None:
        """Stop serving: wait for reads in flight; later reads get ENXIO.

        The caller has closed the origin's write gate, so no write is in flight."""
        with self._lock:
            self.order.close()

    def checkpoint(self, clean: bool, flags: int | None = None,
                   health: Health | None = None) -> None:
        """Write the header with the counters and the failure of ``health`` (default
        the tracker's); if ``clean``, first write every pending mark and sync
        everything, then forget the write intents.

        Call with no write in flight (the origin's gate closed, or no client)."""
        nr_changed = self.nr_changed  # applies the queued marks (which may fail it)
        h = self.cow.header
        health = self.health if health is None else health
        flags = failure_flags(h.flags if flags is None else flags, health)
        flags = flags | FLAG_CLEAN if clean else flags & ~FLAG_CLEAN
        if clean:
            self.index.flush()
            self.cow.sync()
            self.intents.forget()
        self.cow.write_header(flags=flags, nr_changed_blocks=nr_changed,
                              nr_slots=self.nr_slots, error=health.error,
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


class IncrementalTracker(CowTracker):
    """Incremental mode: records which blocks change, keeps no data. A change costs a
    mark in memory; the write-intent record keeps crashes from losing it."""

    MARKS_WITHOUT_DATA = True
