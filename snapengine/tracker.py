"""Copy-before-write, change marking and snapshot reads on one COW file.

Design notes
------------
Each block of a tracked origin is, for the minor's COW file, in one of four states:

    UNSAVED    no entry, no claim
    CLAIMED    one writer owns it: it is saving the old data (snapshot mode) or
               writing the change mark (incremental mode)
    PUBLISHED  snapshot mode: the entry is in memory, new readers read the saved copy;
               readers that started earlier may still be reading the origin
    DONE       bit set in the page's ``done``: writers go straight to the origin

Write path (``before_write``, called by the origin before it changes blocks):

 1. Under the lock: the blocks of the request not DONE (one int operation per page).
    None left: return; this is the whole cost of a re-touch write.
 2. Wait while another writer's claim overlaps them; claim them, allocate data slots
    (the ``-f`` limit is checked here), pin their index pages.
 3. Without the lock: read the old data from the origin, checksum it, write it to its
    slots, then write the entries (snapshot); or write the marks (incremental).
 4. Under the lock: publish the entries; wait for every read that started before this
    point and overlaps the claim; set DONE; drop the claim.
 5. The origin writes the new data.

Why it is safe: a block of the origin is overwritten only after its old data and then
its entry are in the COW file, and after every snapshot read that could have chosen to
read that block from the origin has finished. A read that starts later sees the entry
and reads the saved copy. Two writers of one block never both copy it (the claim), and
the second cannot overwrite it before the first has saved it (it waits on the claim).
Entries are written through, never cached dirty, so a crash of the process leaves the
COW file consistent with every origin write that was issued.

Read path (``read``): under the lock, register a hold and take the entries; without it,
read saved blocks from the COW file (checking each block's checksum) and the others
from the origin; drop the hold.

Failure: any error while saving (I/O, ENOSPC, the ``-f`` limit, a corrupt index page)
fails the snapshot. ``error`` is set, waiting writers are released, every later write
goes straight to the origin, reads answer EIO. The write that met the error succeeds:
the origin never loses a write.

No lock is held across I/O: page loads (index.py) and data copies release it.
"""

from __future__ import annotations

import errno
import logging
import threading
from array import array
from typing import Callable

from .cowfile import (FLAG_CLEAN, FLAG_FAILED, FLAG_INCREMENTAL, INTENT_SHIFT, MARK, CowFile,
                      block_checksums, boot_id, mark_checksums)
from .errors import SnapError
from .fileio import FileIO, GroupSync
from .index import Index, IndexPage
from .units import BLOCK_SHIFT, BLOCK_SIZE

log = logging.getLogger(__name__)

PAGE_SHIFT = 8  # log2(PAGE_BLOCKS): block >> PAGE_SHIFT is its index page
REGION_SHIFT = INTENT_SHIFT - BLOCK_SHIFT  # block >> REGION_SHIFT is its write-intent region
PAGE_MASK = (1 << PAGE_SHIFT) - 1
REUSE_MAX = 1 << 20  # copy buffers up to this size are kept per thread (16 threads: 16 MiB)

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

    __slots__ = ("first", "end", "runs", "pages", "entries")

    def __init__(self, first: int, end: int, runs: list[tuple[int, int, int]],
                 pages: list[IndexPage]) -> None:
        self.first = first
        self.end = end
        self.runs = runs
        self.pages = pages
        self.entries: list[array] = []

    @property
    def nr_blocks(self) -> int:
        return sum(count for _, count, _ in self.runs)


class CowTracker:
    """Base of both modes: claims, failure, the COW file's header bookkeeping.

    Locking: ``_lock`` guards the index (and its cache), the claims and the holds; it is
    held for in-memory work only. ``_cond`` (on the same lock) is waited on by writers
    for other claims, by committing writers for older reads (``_draining``), and by
    page loads. Reads drop their hold without the lock (dict deletion is atomic) and
    take it only to wake a draining writer.
    """

    incremental = False

    def __init__(self, cow: CowFile, origin_io: FileIO, max_cache_bytes: int,
                 on_fail: Callable[["CowTracker"], None] | None = None) -> None:
        self.cow = cow
        self.origin_io = origin_io
        self.seed = cow.header.seed
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.index = Index(cow, self._cond, max_cache_bytes)
        self.nr_changed = cow.header.nr_changed_blocks
        self.next_slot = cow.header.nr_slots + 1
        self.error = cow.header.error  # 0, or a negative errno once failed
        self.reason = f"failed before (error {self.error})" if self.error else ""
        self.on_fail = on_fail
        self.durable = cow.header.durable
        self.group_sync = GroupSync(cow.io)
        self.saved_blocks = 0  # blocks saved or marked by this process, for the benchmark
        self._claims: list[Claim] = []
        self._waiting = 0  # writers waiting for a claim to end
        self._holds: dict[int, tuple[int, int]] = {}  # reads in flight: id -> blocks
        self._next_hold = 0
        self._draining = 0  # threads waiting for reads to end: reads must wake them
        self._closed = False

    # -- the write path ---------------------------------------------------------------
    def before_write(self, first: int, end: int) -> None:
        """Make blocks [first, end) safe to overwrite. Never raises."""
        if self.error:
            return
        try:
            with self._lock:
                if self._all_done(first, end):  # the re-touch fast path
                    return
                claim = self._claim(first, end)
            if claim is None:
                return
            try:
                self._save(claim)
            except BaseException:
                with self._lock:
                    self._release(claim)
                raise
            with self._lock:
                self._commit(claim)
        except Exception as e:  # the write goes on; the snapshot says it is broken
            self.fail(e)

    def _all_done(self, first: int, end: int) -> bool:
        """Blocks [first, end) all DONE, judged from a cached page alone (else False)."""
        number = first >> PAGE_SHIFT
        if (end - 1) >> PAGE_SHIFT != number:
            return False
        page = self.index.cached(number)
        if page is None:
            return False
        want = ((1 << (end - first)) - 1) << (first & PAGE_MASK)
        return page.done & want == want

    def _claim(self, first: int, end: int) -> Claim | None:
        while True:
            if self.error or self._closed:
                return None
            pages = self.index.pages(first, end)
            todo = Index.todo(pages, first, end)
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
        raise NotImplementedError

    def _save(self, claim: Claim) -> None:
        raise NotImplementedError

    def _commit(self, claim: Claim) -> None:
        raise NotImplementedError

    def _publish(self, claim: Claim) -> None:
        for (block, _, _), entries in zip(claim.runs, claim.entries):
            Index.set_entries(claim.pages, block, entries)

    def _finish(self, claim: Claim) -> None:
        for block, count, _ in claim.runs:
            Index.mark_done(claim.pages, block, count)
        n = claim.nr_blocks
        self.nr_changed += n
        self.saved_blocks += n
        self._release(claim)

    # -- reads in flight ----------------------------------------------------------------
    def _hold(self, first: int, end: int) -> int:
        """Register a read of blocks [first, end); call with ``_lock`` held."""
        hold = self._next_hold
        self._next_hold = hold + 1
        self._holds[hold] = (first, end)
        return hold

    def _unhold(self, hold: int) -> None:
        """End a read; no lock needed. Deleting before looking at ``_draining`` pairs
        with a drainer raising ``_draining`` before it looks at the holds."""
        del self._holds[hold]
        if self._draining:
            with self._lock:
                self._cond.notify_all()

    def _drain(self, before: int, first: int, end: int) -> None:
        """Wait, with ``_lock`` held, until no read older than ``before`` overlaps
        blocks [first, end)."""
        self._draining += 1
        try:
            while any(h < before and f < end and first < e
                      for h, (f, e) in list(self._holds.items())):
                self._cond.wait()
        finally:
            self._draining -= 1

    # -- failure and life cycle ---------------------------------------------------------
    def fail(self, e: BaseException) -> None:
        """Fail the snapshot or change list for good, keeping the first reason."""
        err = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
        with self._lock:
            if self.error:
                return
            self.error = -err
            self.reason = str(e)
            self._cond.notify_all()
        log.error("%s: tracking failed, the COW file is no longer valid: %s",
                  self.cow.path, self.reason)
        try:
            self.cow.write_header(flags=self.cow.header.flags | FLAG_FAILED, error=self.error)
        except OSError as e2:
            log.error("%s: cannot record the failure in the header: %s", self.cow.path, e2)
        if self.on_fail is not None:
            self.on_fail(self)

    def quiesce(self) -> None:
        """Stop serving: wait for reads in flight; later reads get ENXIO.

        The caller has closed the origin's write gate, so no write is in flight."""
        with self._lock:
            self._closed = True
            self._drain(self._next_hold, 0, 1 << 62)

    def checkpoint(self, clean: bool, flags: int | None = None) -> None:
        """Write the header with the counters; if ``clean``, sync everything first.

        Call with no write in flight (the origin's gate closed, or no client)."""
        h = self.cow.header
        flags = h.flags if flags is None else flags
        flags = flags | FLAG_CLEAN if clean else flags & ~FLAG_CLEAN
        if self.error:
            flags |= FLAG_FAILED
        if clean:
            self.cow.sync()
            self._forget_intents()
        self.cow.write_header(flags=flags, nr_changed_blocks=self.nr_changed,
                              nr_slots=self.nr_slots, error=self.error,
                              boot_id=h.boot_id if clean else boot_id())

    def _forget_intents(self) -> None:
        """At a clean point (index synced): no region needs to be presumed changed."""

    @property
    def nr_slots(self) -> int:
        return self.next_slot - 1

    @property
    def cache_bytes(self) -> int:
        return self.index.cache_bytes

    def resize_cache(self, max_cache_bytes: int) -> None:
        with self._lock:
            self.index.resize(max_cache_bytes)


class SnapshotTracker(CowTracker):
    """Snapshot mode: saves old data before overwrite and serves the snapshot image."""

    def _allocate(self, todo: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        n = todo[0][1] if len(todo) == 1 else sum(count for _, count in todo)
        limit = self.cow.header.fallocate
        if (self.next_slot - 1 + n) * BLOCK_SIZE > limit:
            raise SnapError(errno.EFBIG, f"COW file {self.cow.path} reached its limit of "
                            f"{limit} bytes (-f); the snapshot can no longer be kept")
        runs = []
        for block, count in todo:
            runs.append((block, count, self.next_slot))
            self.next_slot += count
        self.index.slot_limit = self.next_slot - 1
        return runs

    def _save(self, claim: Claim) -> None:
        for block, count, slot in claim.runs:
            data = copy_buffer(count << BLOCK_SHIFT)
            got = self.origin_io.pread_into(data, block << BLOCK_SHIFT)
            if got < len(data):  # the origin's last, partial block: pad with zeroes
                data[got:] = bytes(len(data) - got)
            entries = array("Q", bytes(16 * count))
            entries[0::2] = array("Q", range(slot, slot + count))
            entries[1::2] = block_checksums(data, block, self.seed)
            self.cow.write_data(slot, data)
            self.cow.write_entries(block, entries)
            claim.entries.append(entries)
        if self.durable:  # old data and entries reach the disk before the overwrite can
            self.group_sync.sync()

    def _commit(self, claim: Claim) -> None:
        self._publish(claim)  # PUBLISHED: new readers take the saved copy
        self._drain(self._next_hold, claim.first, claim.end)
        self._finish(claim)  # DONE

    def become_incremental(self, clean: bool) -> None:
        """Keep only the record of changed blocks: the index synced (it is the list from
        now on, and write intents only cover later changes), the header, then the data
        dropped."""
        self.cow.sync()
        self.checkpoint(clean, flags=self.cow.header.flags | FLAG_INCREMENTAL)
        self.cow.release_data()

    # -- the read path ----------------------------------------------------------------
    def read(self, buf, offset: int) -> None:
        """Fill ``buf`` with the snapshot image from ``offset``."""
        length = len(buf)
        first = offset >> BLOCK_SHIFT
        end = (offset + length + BLOCK_SIZE - 1) >> BLOCK_SHIFT
        corrupt: SnapError | None = None
        with self._lock:
            if self.error or self._closed:
                raise self._unreadable()
            entries = self._cached_entries(first, end)
            if entries is None:  # a page to load (the lock is released meanwhile)
                try:
                    entries = Index.entries(self.index.pages(first, end), first, end)
                except SnapError as e:  # a corrupt index page: fail, outside the lock
                    corrupt = e
            if corrupt is None:
                hold = self._next_hold
                self._next_hold = hold + 1
                self._holds[hold] = (first, end)
        if corrupt is not None or entries is None:
            self.fail(corrupt or SnapError(errno.EIO, "index page missing"))
            raise self._unreadable()
        try:
            if entries.count(0) == len(entries):  # nothing saved: all from the origin
                if self.origin_io.pread_into(buf, offset) != length:
                    raise SnapError(errno.EIO, f"short read from origin {self.origin_io.path} "
                                    f"at {offset}")
            else:
                self._read(memoryview(buf).cast("B"), offset, first, entries)
        except SnapError as e:
            if e.errno == errno.EIO:
                self.fail(e)
            raise
        finally:
            del self._holds[hold]  # see _unhold: no lock needed
            if self._draining:
                with self._lock:
                    self._cond.notify_all()

    def _cached_entries(self, first: int, end: int) -> array | None:
        """Entries of blocks [first, end) if they lie in one cached page, else None."""
        number = first >> PAGE_SHIFT
        if (end - 1) >> PAGE_SHIFT != number:
            return None
        page = self.index.cached(number)
        if page is None:
            return None
        lo = (first & PAGE_MASK) << 1
        return page.entries[lo:lo + ((end - first) << 1)]

    def _unreadable(self) -> SnapError:
        if self.error:
            return SnapError(errno.EIO, f"the snapshot has failed: {self.reason}")
        return SnapError(errno.ENXIO, "the snapshot has been removed")

    def _read(self, view: memoryview, offset: int, first: int, entries: array) -> None:
        slots = entries[0::2]
        n = len(slots)
        zeros = slots.count(0)
        if zeros == n:  # nothing saved: the origin has it all
            self._read_run(view, offset, first, n, 0, entries)
            return
        if not zeros and slots[-1] - slots[0] == n - 1 and \
                slots == array("Q", range(slots[0], slots[0] + n)):
            self._read_run(view, offset, first, n, slots[0], entries[1::2])
            return
        i = 0
        while i < n:
            slot = slots[i]
            j = i + 1
            while j < n and slots[j] == (slot + j - i if slot else 0):
                j += 1
            self._read_run(view, offset, first + i, j - i, slot, entries[2 * i + 1:2 * j:2])
            i = j

    def _read_run(self, view: memoryview, offset: int, block: int, count: int, slot: int,
                  csums: array) -> None:
        start = block << BLOCK_SHIFT
        stop = (block + count) << BLOCK_SHIFT
        lo = max(start, offset)
        hi = min(stop, offset + len(view))
        dst = view[lo - offset:hi - offset]
        if not slot:
            if self.origin_io.pread_into(dst, lo) != len(dst):
                raise SnapError(errno.EIO, f"short read from origin {self.origin_io.path} at {lo}")
            return
        whole = lo == start and hi == stop
        data = dst if whole else copy_buffer(count << BLOCK_SHIFT)
        self.cow.read_data_into(slot, data)
        sums = block_checksums(data, block, self.seed)
        if sums != csums:
            self._checksum_error(sums, csums, block, slot)
        if not whole:
            dst[:] = data[lo - start:hi - start]

    def _checksum_error(self, sums: array, csums: array, block: int, slot: int) -> None:
        i = next(i for i in range(len(sums)) if sums[i] != csums[i])
        raise SnapError(errno.EIO, f"{self.cow.path}: saved data of block {block + i} "
                        f"(slot {slot + i}, offset {self.cow.slot_offset(slot + i)}) fails "
                        f"its checksum: stored {csums[i]:#018x}, computed {sums[i]:#018x}")


class IncrementalTracker(CowTracker):
    """Incremental mode: records which blocks change, keeps no data.

    Marks are written through (a crash of the process loses none), but not synced. So
    that a power cut cannot lose one either, the first change in each 64 MiB region
    since the last clean point first makes the region's write-intent bit durable; after
    a power cut every block of a marked region counts as changed (recovery.py).
    """

    incremental = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._intent_lock = threading.Lock()
        self._intent_written: dict[int, int] = {}  # bitmap byte -> value written
        self._intent_durable: dict[int, int] = {}  # bitmap byte -> bits known durable
        for region in self.cow.read_intents():
            byte, bit = region >> 3, 1 << (region & 7)
            self._intent_written[byte] = self._intent_durable[byte] = \
                self._intent_written.get(byte, 0) | bit

    def _allocate(self, todo: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        return [(block, count, 0) for block, count in todo]

    def _save(self, claim: Claim) -> None:
        self._record_intents(claim.runs)
        for block, count, _ in claim.runs:
            entries = array("Q", bytes(16 * count))
            entries[0::2] = array("Q", [MARK]) * count
            entries[1::2] = mark_checksums(range(block, block + count), self.seed)
            self.cow.write_entries(block, entries)
            claim.entries.append(entries)

    def _record_intents(self, runs: list[tuple[int, int, int]]) -> None:
        """Make the intent bits of the regions ``runs`` touch durable, if not yet."""
        durable = self._intent_durable
        new = [r for block, count, _ in runs
               for r in range(block >> REGION_SHIFT, ((block + count - 1) >> REGION_SHIFT) + 1)
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
        with self._intent_lock:
            self.cow.clear_intents(self._intent_written)
            self._intent_written.clear()
            self._intent_durable.clear()

    def _commit(self, claim: Claim) -> None:
        self._publish(claim)
        self._finish(claim)
