"""Reading the changed-block list out of a COW file, and checking a whole index.

A block is changed when its index entry is not (0, 0) (cowfile's design notes). The
index is read through SEEK_DATA/SEEK_HOLE, so the cost follows the number of index
pages ever written, not the origin size.
"""

from __future__ import annotations

import errno
from typing import Iterator

from .cowfile import FLAG_FAILED, INDEX_OFFSET, MARK, PAGE_BLOCKS, PAGE_SIZE, CowFile
from .errors import SnapError
from .index import IndexPage, bit_runs
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
                                         limit, header.seed, cow.path)
                if parsed.done:
                    yield parsed
            page += n
        next_page = max(next_page, end)


def changed_blocks(cow: CowFile) -> Iterator[int]:
    """Every changed block number, ascending."""
    for page in index_pages(cow):
        base = page.number * PAGE_BLOCKS
        for start, length in bit_runs(page.done):
            yield from range(base + start, base + start + length)


def changed_extents(cow: CowFile) -> Iterator[tuple[int, int]]:
    """Changed blocks merged into (block, count) runs, ascending."""
    run_start = run_end = -1
    for page in index_pages(cow):
        base = page.number * PAGE_BLOCKS
        for start, length in bit_runs(page.done):
            if base + start == run_end:
                run_end += length
                continue
            if run_end > 0:
                yield run_start, run_end - run_start
            run_start, run_end = base + start, base + start + length
    if run_end > 0:
        yield run_start, run_end - run_start


def byte_extents(cow: CowFile) -> Iterator[tuple[int, int]]:
    """Changed extents as (offset, length) in bytes, clipped to the origin size."""
    size = cow.header.origin_size
    for block, count in changed_extents(cow):
        offset = block * BLOCK_SIZE
        yield offset, min(count * BLOCK_SIZE, size - offset)


def count_changed(cow: CowFile, nr_slots: int | None = None) -> tuple[int, int]:
    """(changed blocks, highest slot named) over the whole index; checks every entry."""
    count = 0
    top = 0
    for page in index_pages(cow, nr_slots):
        count += page.count()
        named = [s for s in page.entries[0::2] if s and s != MARK]
        if named:
            top = max(top, max(named))
    return count, top


def verify_index(cow: CowFile) -> None:
    """Check a closed COW file's index against its header; raise EUCLEAN naming the fault."""
    header = cow.header
    count, top = count_changed(cow)
    if count != header.nr_changed_blocks:
        raise SnapError(errno.EUCLEAN, f"{cow.path}: the index holds {count} changed blocks, "
                        f"the header says {header.nr_changed_blocks}")
    if top > header.nr_slots:
        raise SnapError(errno.EUCLEAN, f"{cow.path}: the index names slot {top}, the header "
                        f"has {header.nr_slots}")


def open_closed(path: str) -> CowFile:
    """Open a COW file to read its changed-block list: it must be closed cleanly, not
    failed, and its index must agree with its header; else EINVAL saying why."""
    try:
        cow = CowFile.open(path, writable=False)
    except FileNotFoundError:
        raise SnapError(errno.ENOENT, f"COW file {path} does not exist")
    except IsADirectoryError:
        raise SnapError(errno.EISDIR, f"COW file {path} is a directory")
    except SnapError as e:
        raise SnapError(errno.EINVAL, e.detail)
    try:
        h = cow.header
        if not h.clean:
            raise SnapError(errno.EINVAL, f"{path} was not closed cleanly (it is in use, or "
                            "its daemon died): its list of changed blocks cannot be trusted")
        if h.flags & FLAG_FAILED:
            raise SnapError(errno.EINVAL, f"{path} belongs to a failed snapshot (error {h.error})")
        try:
            verify_index(cow)
        except SnapError as e:
            raise SnapError(errno.EINVAL, f"{e.detail} (truncated or damaged)")
        return cow
    except BaseException:
        cow.close()
        raise
