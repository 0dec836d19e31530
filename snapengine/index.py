"""The in-memory side of a COW file's index: pages of entries, cached, checked.

An ``IndexPage`` holds the 256 entries of one on-disk page (``entries``: slot and
checksum interleaved, as on disk) and ``done``, a 256-bit int with bit i set when
block i needs nothing more from a writer (its old data is safe, or its change is
recorded). Checking a whole request against ``done`` is one int operation, which is
what keeps the re-touch write path cheap.

``Index`` caches pages in an LRU bounded by the minor's ``-c``. Pages are written
through (the engine writes entries to the COW file before it changes a page), so a
page is never dirty and eviction never writes. A page that a write is about to change
is pinned and stays cached.
"""

from __future__ import annotations

import errno
import threading
from array import array
from itertools import compress
from operator import or_

from .cache import LRUCache
from .cowfile import MARK, PAGE_BLOCKS, PAGE_SIZE, CowFile, mark_checksums
from .errors import SnapError

PAGE_COST = 5632  # bytes one cached page costs in the daemon: entries, objects, malloc slack
MIN_CACHE_PAGES = 1024  # floor of the cache (5.5 MiB): room for every page in flight
_ZERO_PAGE = bytes(PAGE_SIZE)
_EMPTY_ENTRIES = array("Q", [0]) * (2 * PAGE_BLOCKS)  # copied by slicing: no over-allocation
_ALL = (1 << PAGE_BLOCKS) - 1


def bit_runs(bits: int):
    """Yield (start, length) of each run of set bits, lowest first."""
    while bits:
        start = (bits & -bits).bit_length() - 1
        shifted = bits >> start
        length = (~shifted & (shifted + 1)).bit_length() - 1
        yield start, length
        bits &= ~(((1 << length) - 1) << start)


def span_bits(start: int, end: int) -> int:
    """Bits start..end-1 set."""
    return ((1 << (end - start)) - 1) << start


class IndexPage:
    __slots__ = ("number", "entries", "done", "pins")

    def __init__(self, number: int, entries: array, done: int) -> None:
        self.number = number
        self.entries = entries  # array('Q'): slot, checksum, slot, checksum, ...
        self.done = done
        self.pins = 0

    @classmethod
    def parse(cls, number: int, raw: bytes, nr_slots: int, seed: int, path: str) -> "IndexPage":
        """Build a page from disk, checking every entry (see cowfile's design notes)."""
        entries = _EMPTY_ENTRIES[:]  # exactly PAGE_SIZE of storage
        if raw == _ZERO_PAGE:
            return cls(number, entries, 0)
        memoryview(entries).cast("B")[:] = raw
        slots, csums = entries[0::2], entries[1::2]
        used = list(compress(range(PAGE_BLOCKS), map(or_, slots, csums)))  # C-level scan
        first = number * PAGE_BLOCKS
        marked = [i for i in used if slots[i] == MARK]
        marks = dict(zip(marked, mark_checksums([first + i for i in marked], seed)))
        done = 0
        for i in used:
            slot, csum = slots[i], csums[i]
            if not slot or not csum or (slot > nr_slots if slot != MARK else csum != marks[i]):
                raise SnapError(errno.EUCLEAN, f"{path}: corrupt index entry for block "
                                f"{first + i} (slot {slot:#x}, checksum {csum:#x}; "
                                f"{nr_slots} slots in use)")
            done |= 1 << i
        return cls(number, entries, done)

    def count(self) -> int:
        return self.done.bit_count()


class Index:
    """Block → entry map of one COW file.

    Thread-safety: call every method with ``cond`` held. ``pages()`` may release
    ``cond`` while it reads from disk; pages it returns stay valid while ``cond`` is
    held, and beyond that only if pinned.
    """

    def __init__(self, cow: CowFile, cond: threading.Condition, max_cache_bytes: int) -> None:
        self.cow = cow
        self._cond = cond
        self._loading: set[int] = set()
        self._cache: LRUCache[int, IndexPage] = LRUCache(
            self._bound(max_cache_bytes), PAGE_COST, pinned=lambda p: p.pins > 0)
        self.loads = 0
        self.slot_limit = cow.header.nr_slots  # highest slot an entry may name; engine-kept

    @staticmethod
    def _bound(max_cache_bytes: int) -> int:
        return max(max_cache_bytes, MIN_CACHE_PAGES * PAGE_COST)

    @property
    def cache_bytes(self) -> int:
        return self._cache.bytes

    def resize(self, max_cache_bytes: int) -> None:
        self._cache.resize(self._bound(max_cache_bytes))

    def cached(self, number: int) -> IndexPage | None:
        return self._cache.get(number)

    def pages(self, first: int, end: int) -> list[IndexPage]:
        """The pages covering blocks [first, end), loading those not cached."""
        lo, hi = first // PAGE_BLOCKS, (end - 1) // PAGE_BLOCKS
        get = self._cache.get
        if lo == hi:
            page = get(lo)
            if page is not None:
                return [page]
        while True:
            pages = [get(n) for n in range(lo, hi + 1)]
            missing = [lo + i for i, p in enumerate(pages) if p is None]
            if not missing:
                return pages  # type: ignore[return-value]
            for number in missing:
                self._load(number)

    def page(self, number: int) -> IndexPage:
        return self.pages(number * PAGE_BLOCKS, number * PAGE_BLOCKS + 1)[0]

    def _load(self, number: int) -> None:
        if number in self._cache:
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
            page = IndexPage.parse(number, raw, self.slot_limit, header.seed, self.cow.path)
        finally:
            self._cond.acquire()
            self._loading.discard(number)
            self._cond.notify_all()
        self.loads += 1
        self._cache.put(number, page)

    # -- reading entries -------------------------------------------------------------
    @staticmethod
    def todo(pages: list[IndexPage], first: int, end: int) -> list[tuple[int, int]]:
        """Runs (block, count) in [first, end) whose bit in ``done`` is clear."""
        runs: list[tuple[int, int]] = []
        base = pages[0].number * PAGE_BLOCKS
        for page in pages:
            lo = max(first - base, 0)
            hi = min(end - base, PAGE_BLOCKS)
            want = span_bits(lo, hi)
            missing = want & ~page.done
            if missing == want and not runs:  # the usual first touch: one run
                runs.append((base + lo, hi - lo))
            else:
                for start, length in bit_runs(missing):
                    block = base + start
                    if runs and runs[-1][0] + runs[-1][1] == block:
                        runs[-1] = (runs[-1][0], runs[-1][1] + length)
                    else:
                        runs.append((block, length))
            base += PAGE_BLOCKS
        return runs

    @staticmethod
    def entries(pages: list[IndexPage], first: int, end: int) -> array:
        """Entries of blocks [first, end), interleaved slot/checksum."""
        base = pages[0].number * PAGE_BLOCKS
        if len(pages) == 1:
            return pages[0].entries[2 * (first - base):2 * (end - base)]
        out = array("Q")
        for page in pages:
            lo = max(first - base, 0)
            hi = min(end - base, PAGE_BLOCKS)
            out.extend(page.entries[2 * lo:2 * hi])
            base += PAGE_BLOCKS
        return out

    @staticmethod
    def set_entries(pages: list[IndexPage], block: int, entries: array) -> None:
        """Store entries for consecutive blocks from ``block``."""
        n = len(entries) // 2
        if len(pages) == 1:
            lo = (block - pages[0].number * PAGE_BLOCKS) << 1
            pages[0].entries[lo:lo + 2 * n] = entries
            return
        for page in pages:
            base = page.number * PAGE_BLOCKS
            lo = max(block - base, 0)
            hi = min(block + n - base, PAGE_BLOCKS)
            if lo >= hi:
                continue
            src = 2 * (base + lo - block)
            page.entries[2 * lo:2 * hi] = entries[src:src + 2 * (hi - lo)]

    @staticmethod
    def mark_done(pages: list[IndexPage], block: int, n: int) -> None:
        if len(pages) == 1:
            pages[0].done |= ((1 << n) - 1) << (block - pages[0].number * PAGE_BLOCKS)
            return
        for page in pages:
            base = page.number * PAGE_BLOCKS
            lo = max(block - base, 0)
            hi = min(block + n - base, PAGE_BLOCKS)
            if lo < hi:
                page.done |= span_bits(lo, hi)
