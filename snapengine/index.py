"""The in-memory side of a COW file's index: pages of entries, cached, checked.

An ``IndexPage`` holds the 256 entries of one on-disk page (``entries``: slot and
checksum interleaved, as on disk) and two 256-bit ints: ``saved`` (bit i: block i's
old data is in the COW file) and ``changed`` (bit i: block i was written since the
snapshot point). Checking a whole request against them is one int operation, which is
what keeps the re-touch path cheap. What an entry means, and which bits it sets, is
entry.py's business; so is the arithmetic that clips a block range to a page.

``Index`` caches pages in an LRU bounded by the minor's ``-c``. Saved entries are
written through before the page changes in memory. Change marks are not: a page that
holds marks not yet on disk is *dirty*, and is written back when evicted or at a clean
point (the write-intent record covers them meanwhile, see intents.py). An evicted
dirty page waits in ``_writeback`` until written, and a reload takes it from there,
never from the stale disk. Write-backs are serialized and always write the page's
latest content. A page that a write is about to change is pinned and stays cached.
"""

from __future__ import annotations

import threading
from array import array

from .cache import LRUCache
from .cowfile import PAGE_BLOCKS, PAGE_SIZE, CowFile
from .entry import bit_runs, classify, no_entries, span_bits, window

PAGE_COST = 5632  # bytes one cached page costs in the daemon: entries, objects, malloc slack
MIN_CACHE_PAGES = 1024  # floor of the cache (5.5 MiB): room for every page in flight
_ZERO_PAGE = bytes(PAGE_SIZE)
_EMPTY_ENTRIES = no_entries(PAGE_BLOCKS)  # copied by slicing: no over-allocation


class IndexPage:
    __slots__ = ("number", "entries", "saved", "changed", "pins", "dirty", "version")

    def __init__(self, number: int, entries: array, saved: int, changed: int) -> None:
        self.number = number
        self.entries = entries  # array('Q'): slot, checksum, slot, checksum, ...
        self.saved = saved
        self.changed = changed
        self.pins = 0  # writes in flight on this page: it must stay cached
        self.dirty = False  # entries differ from the disk (change marks not written)
        self.version = 0  # +1 on every change of entries, to detect stale write-backs

    @classmethod
    def parse(cls, number: int, raw: bytes, nr_slots: int, seed: int, path: str,
              zeros: bool = True) -> "IndexPage":
        """Build a page from disk, checking every entry (entry.classify)."""
        entries = _EMPTY_ENTRIES[:]  # exactly PAGE_SIZE of storage
        if raw == _ZERO_PAGE:
            return cls(number, entries, 0, 0)
        memoryview(entries).cast("B")[:] = raw
        saved, changed = classify(entries, number * PAGE_BLOCKS, nr_slots, seed, path, zeros)
        return cls(number, entries, saved, changed)

    def count(self) -> int:
        """Changed blocks in this page."""
        return self.changed.bit_count()


class Index:
    """Block → entry map of one COW file.

    Thread-safety: call every method with ``cond`` held, except ``peek`` (lock-free,
    possibly stale), ``write_back`` and ``flush`` (which take it themselves).
    ``pages()`` may release ``cond`` while it reads from or writes to disk; pages it
    returns stay valid while ``cond`` is held, and beyond that only if pinned.
    """

    def __init__(self, cow: CowFile, cond: threading.Condition, max_cache_bytes: int) -> None:
        self.cow = cow
        self._cond = cond
        self._loading: set[int] = set()
        self._writeback: dict[int, IndexPage] = {}  # evicted, not yet written
        self._evicted: list[IndexPage] = []  # dirty pages to write once the lock is free
        self._wb_lock = threading.Lock()  # one write-back at a time: the latest wins
        self._cache: LRUCache[int, IndexPage] = LRUCache(
            self._bound(max_cache_bytes), PAGE_COST, pinned=lambda p: p.pins > 0,
            dispose=self._dispose)
        self.loads = 0
        self.slot_limit = cow.header.nr_slots  # highest slot an entry may name; engine-kept
        self.peek = self._cache.peek  # lock-free, possibly stale: the fast paths' lookup
        self.cached = self._cache.get  # a cached page (made recent) or None: no load

    @staticmethod
    def _bound(max_cache_bytes: int) -> int:
        return max(max_cache_bytes, MIN_CACHE_PAGES * PAGE_COST)

    @property
    def cache_bytes(self) -> int:
        return self._cache.bytes

    def resize(self, max_cache_bytes: int) -> None:
        self._cache.resize(self._bound(max_cache_bytes))

    def pages(self, first: int, end: int) -> list[IndexPage]:
        """The pages covering blocks [first, end), loading those not cached."""
        lo, hi = first // PAGE_BLOCKS, (end - 1) // PAGE_BLOCKS
        get = self._cache.get
        if lo == hi:
            page = get(lo)
            if page is not None:
                return [page]
        held: list[IndexPage] = []  # pinned while the others load: no livelock
        try:
            while True:
                pages = [get(n) for n in range(lo, hi + 1)]
                missing = [lo + i for i, p in enumerate(pages) if p is None]
                if not missing:
                    return pages  # type: ignore[return-value]
                for number in missing:
                    self._load(number)
                    page = self._cache.peek(number)
                    if page is not None:
                        page.pins += 1
                        held.append(page)
                self.write_evicted()
        finally:
            for page in held:
                page.pins -= 1

    def _load(self, number: int) -> None:
        if number in self._cache:
            return
        page = self._writeback.pop(number, None)  # evicted dirty: newer than the disk
        if page is not None:
            self._cache.put(number, page)
            return
        if number in self._loading:  # another thread is reading it: wait for it
            while number in self._loading:
                self._cond.wait()
            return
        self._loading.add(number)
        header = self.cow.header
        self._cond.release()
        try:
            raw = self.cow.read_page(number)
            page = IndexPage.parse(number, raw, self.slot_limit, header.seed, self.cow.path,
                                   header.version >= 2)
        finally:
            self._cond.acquire()
            self._loading.discard(number)
            self._cond.notify_all()
        self.loads += 1
        self._cache.put(number, page)

    def _dispose(self, page: IndexPage) -> None:
        if page.dirty:
            self._writeback[page.number] = page
            self._evicted.append(page)

    def write_evicted(self) -> None:
        """Write the dirty pages just evicted; ``cond`` is released meanwhile."""
        if not self._evicted:
            return
        evicted, self._evicted = self._evicted, []
        self._cond.release()
        try:
            for page in evicted:
                self.write_back(page)
        finally:
            self._cond.acquire()

    def write_back(self, page: IndexPage) -> None:
        """Write ``page``'s latest entries if it is dirty. Call without ``cond``."""
        with self._wb_lock:
            with self._cond:
                if not page.dirty:
                    return
                data, version = page.entries.tobytes(), page.version
            self.cow.write_page(page.number, data)
            with self._cond:
                if page.version == version:
                    page.dirty = False
                    if self._writeback.get(page.number) is page:
                        del self._writeback[page.number]

    def flush(self) -> None:
        """Write every dirty page (cached or evicted). Call without ``cond``, with no
        write in flight."""
        with self._cond:
            pages = self._cache.values() + list(self._writeback.values())
        for page in pages:
            self.write_back(page)

    # -- reading entries (each page's part of a block range: entry.window) -----------
    @staticmethod
    def unsaved(pages: list[IndexPage], first: int, end: int) -> list[tuple[int, int]]:
        """Runs (block, count) in [first, end) whose old data is not saved."""
        runs: list[tuple[int, int]] = []
        for page in pages:
            base, lo, hi = window(page.number, first, end)
            want = span_bits(lo, hi)
            missing = want & ~page.saved
            if missing == want and not runs:  # the usual first touch: one run
                runs.append((base + lo, hi - lo))
            else:
                for start, length in bit_runs(missing):
                    block = base + start
                    if runs and runs[-1][0] + runs[-1][1] == block:
                        runs[-1] = (runs[-1][0], runs[-1][1] + length)
                    else:
                        runs.append((block, length))
        return runs

    @staticmethod
    def unchanged(pages: list[IndexPage], first: int, end: int) -> list[tuple[IndexPage, int]]:
        """(page, bits) of the blocks in [first, end) not marked changed."""
        out = []
        for page in pages:
            _, lo, hi = window(page.number, first, end)
            bits = span_bits(lo, hi) & ~page.changed
            if bits:
                out.append((page, bits))
        return out

    @staticmethod
    def entries(pages: list[IndexPage], first: int, end: int) -> array:
        """Entries of blocks [first, end), interleaved slot/checksum."""
        _, lo, hi = window(pages[0].number, first, end)
        out = pages[0].entries[2 * lo:2 * hi]
        for page in pages[1:]:
            _, lo, hi = window(page.number, first, end)
            out.extend(page.entries[2 * lo:2 * hi])
        return out

    @staticmethod
    def store(pages: list[IndexPage], block: int, entries: array) -> None:
        """Store entries (already on disk) for consecutive blocks from ``block``."""
        end = block + len(entries) // 2
        for page in pages:
            base, lo, hi = window(page.number, block, end)
            if lo < hi:
                src = 2 * (base + lo - block)
                page.entries[2 * lo:2 * hi] = entries[src:src + 2 * (hi - lo)]
                page.version += 1

    @staticmethod
    def mark(pages: list[IndexPage], block: int, n: int, changed: int) -> None:
        """Blocks [block, block + n) are saved; those whose bit is set in ``changed``
        (bit 0 is ``block``) have changed too."""
        for page in pages:
            base, lo, hi = window(page.number, block, block + n)
            if lo < hi:
                page.saved |= span_bits(lo, hi)
                shift = base + lo - block  # the bit of page block ``lo`` in ``changed``
                page.changed |= ((changed >> shift) & ((1 << (hi - lo)) - 1)) << lo
