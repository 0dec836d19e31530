"""Reading the changed-block list out of a COW file, and checking a whole index.

A block is changed when its index entry says so (entry.py: ``(s, c)`` or ``(MARK, c)``;
an AHEAD entry is saved, not changed). The index is read through SEEK_DATA/SEEK_HOLE,
so the cost follows the number of index pages ever written, not the origin size. One
pass checks every entry, counts the changed blocks, finds the highest slot named and
merges the changed blocks into extents. Several change lists of one chain merge into
one (``union``): each changed block once, whichever lists name it.
"""

from __future__ import annotations

import errno
import heapq
from array import array
from dataclasses import dataclass
from typing import Iterable, Iterator

from .cowfile import FLAG_FAILED, INDEX_OFFSET, PAGE_BLOCKS, PAGE_SIZE, CowFile, Header
from .entry import bit_runs, top_slot
from .errors import SnapError
from .index import IndexPage
from .units import BLOCK_SIZE, nr_blocks

READ_CHUNK = 1 << 20  # bytes of index read at once


def index_pages(cow: CowFile, nr_slots: int | None = None) -> Iterator[IndexPage]:
    """Every index page that holds entries, parsed and checked, in block order."""
    header = cow.header
    limit = header.nr_slots if nr_slots is None else nr_slots
    nr_pages = (nr_blocks(header.origin_size) + PAGE_BLOCKS - 1) // PAGE_BLOCKS
    next_page = 0  # extents may share a page where the filesystem block is smaller
    for offset, length in cow.index_extents():
        page = max((offset - INDEX_OFFSET) // PAGE_SIZE, next_page)
        end = min(-(-(offset + length - INDEX_OFFSET) // PAGE_SIZE), nr_pages)
        while page < end:
            n = min(READ_CHUNK // PAGE_SIZE, end - page)
            raw = cow.io.pread(n * PAGE_SIZE, INDEX_OFFSET + page * PAGE_SIZE)
            raw += bytes(n * PAGE_SIZE - len(raw))
            for i in range(n):
                parsed = IndexPage.parse(page + i, raw[i * PAGE_SIZE:(i + 1) * PAGE_SIZE],
                                         limit, header.seed, cow.path, header.version >= 2)
                if parsed.saved or parsed.changed:
                    yield parsed
            page += n
        next_page = max(next_page, end)


@dataclass
class Scan:
    """What one pass over an index found."""

    count: int  # changed blocks
    top_slot: int  # highest data slot an entry names
    extents: array  # changed blocks merged: block, count, block, count, ...

    def byte_extents(self, origin_size: int) -> Iterator[tuple[int, int]]:
        """(offset, length) in bytes, the last one clipped to the origin size."""
        return byte_extents(self.extents, origin_size)


def runs(extents: array) -> Iterator[tuple[int, int]]:
    """The (block, count) pairs of an extents array."""
    for i in range(0, len(extents), 2):
        yield extents[i], extents[i + 1]


def byte_extents(extents: array, origin_size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) in bytes of block extents, the last one clipped to the origin size."""
    for block, count in runs(extents):
        offset = block * BLOCK_SIZE
        yield offset, min(count * BLOCK_SIZE, origin_size - offset)


def union(scans: Iterable[Scan]) -> array:
    """The changed blocks of several scans as one extents array (block, count, ...),
    ascending, each block once: runs that overlap or touch are joined. Each scan's own
    extents are ascending, so a k-way merge keeps it one pass."""
    merged = array("Q")
    for block, count in heapq.merge(*(runs(s.extents) for s in scans)):
        if merged and block <= merged[-2] + merged[-1]:
            merged[-1] = max(merged[-1], block + count - merged[-2])
        else:
            merged.extend((block, count))
    return merged


def nr_extent_blocks(extents: array) -> int:
    """How many blocks an extents array covers."""
    return sum(extents[1::2])


def scan(cow: CowFile, nr_slots: int | None = None) -> Scan:
    """Check every entry of ``cow``'s index (slots up to ``nr_slots``, default the
    header's) and collect the changed blocks."""
    count = top = 0
    extents = array("Q")
    for page in index_pages(cow, nr_slots):
        count += page.count()
        top = max(top, top_slot(page.entries))
        base = page.number * PAGE_BLOCKS
        for start, length in bit_runs(page.changed):
            if extents and extents[-2] + extents[-1] == base + start:
                extents[-1] += length
            else:
                extents.extend((base + start, length))
    return Scan(count, top, extents)


def verify_index(cow: CowFile) -> Scan:
    """Check a closed COW file's index against its header; raise EUCLEAN naming the fault."""
    header = cow.header
    found = scan(cow)
    if found.count != header.nr_changed_blocks:
        raise SnapError(errno.EUCLEAN, f"{cow.path}: the index holds {found.count} changed "
                        f"blocks, the header says {header.nr_changed_blocks}")
    if found.top_slot > header.nr_slots:
        raise SnapError(errno.EUCLEAN, f"{cow.path}: the index names slot {found.top_slot}, "
                        f"the header has {header.nr_slots}")
    return found


def changed_blocks(cow: CowFile) -> Iterator[int]:
    """Every changed block of ``cow``, ascending (its index checked on the way)."""
    for block, count in runs(scan(cow).extents):
        yield from range(block, block + count)


@dataclass
class ChangeList:
    """The changed blocks recorded in a closed COW file, proven whole."""

    path: str
    header: Header
    scan: Scan

    def byte_extents(self) -> Iterator[tuple[int, int]]:
        return self.scan.byte_extents(self.header.origin_size)


def read_closed(path: str) -> ChangeList:
    """The change list of a COW file that must be closed cleanly, not failed, with an
    index that agrees with its header; else EINVAL saying why."""
    try:
        cow = CowFile.open(path, writable=False)
    except FileNotFoundError:
        raise SnapError(errno.ENOENT, f"COW file {path} does not exist")
    except IsADirectoryError:
        raise SnapError(errno.EISDIR, f"COW file {path} is a directory")
    except SnapError as e:
        raise SnapError(errno.EINVAL, e.detail)
    with cow:
        h = cow.header
        if not h.clean:
            raise SnapError(errno.EINVAL, f"{path} was not closed cleanly (it is in use, or "
                            "its daemon died): its list of changed blocks cannot be trusted")
        if h.flags & FLAG_FAILED:
            raise SnapError(errno.EINVAL, f"{path} belongs to a failed snapshot (error {h.error})")
        try:
            found = verify_index(cow)
        except SnapError as e:
            raise SnapError(errno.EINVAL, f"{e.detail} (truncated or damaged)")
    return ChangeList(path, h, found)
