"""Block status (NBD ``base:allocation``): which parts of an export are data, holes, zeros.

An answer is a list of ``(offset, length, type)``, ``type`` a sum of HOLE and ZERO (the
NBD and nbdkit values), in order, without gaps, from the offset asked; it may end
before the range asked does (NBD allows it; MAX_SPAN bounds one request's work), never
past the export's end.

* **Origin**: a file's holes (SEEK_DATA / SEEK_HOLE) are HOLE | ZERO, the rest data. A
  block device is all data: the kernel has no cheap answer.
* **Snapshot**: for each block, what a read of the snapshot returns. A block saved with
  its data is data; one saved as zeros (version 2) is ZERO; one not saved is read from
  the origin, so it reports the origin's allocation *now*.

Why a hole reported for a block not saved never reads as non-zero from the snapshot:
the origin's allocation is looked at first, the index second. A block still not saved
when the index is looked at has not been changed on the origin before that (the origin
is overwritten only after the old content is saved: tracker.py's write path), so the
hole seen a moment earlier was the snapshot's own content, zeros. A block saved by then
reports what was saved. In the other order a write-zeroes racing the query could save a
block's data and punch the origin between the two looks, and its data would be
reported as a hole (a test stages that race). A trim during a snapshot is dropped, and
no other race turns data into a hole: at worst a hole is reported as data, which
promises nothing.

Cost of one request: a SEEK_DATA / SEEK_HOLE pass over the COW file's index (the pages
never written are holes there: nothing is read for them), the pages that hold entries
(from the cache, or read without caching them: a full map must not evict the write
path's pages), a C-level look at their entries, and one SEEK pass over the origin.
"""

from __future__ import annotations

import errno
from itertools import compress, repeat
from operator import ge

from .cowfile import ENTRY_SIZE, INDEX_OFFSET, PAGE_BLOCKS, PAGE_SIZE, ZERO_AHEAD
from .entry import MARK, PAGE_SHIFT, bit_runs
from .errors import SnapError
from .fileio import FileIO
from .index import IndexPage
from .units import BLOCK_SHIFT, BLOCK_SIZE

HOLE = 1  # NBD_STATE_HOLE, nbdkit.EXTENT_HOLE: not allocated
ZERO = 2  # NBD_STATE_ZERO, nbdkit.EXTENT_ZERO: reads as zeros
DATA = 0
MAX_SPAN = 1 << 30  # bytes one answer covers at most

Extent = tuple[int, int, int]


def file_extents(io: FileIO, offset: int, end: int) -> list[Extent]:
    """[offset, end) of a file origin: data, and holes (HOLE | ZERO)."""
    if io.is_block:
        return [(offset, end - offset, DATA)]
    out: list[Extent] = []
    pos = offset
    for start, length in io.data_extents(offset, end):
        if start > pos:
            out.append((pos, start - pos, HOLE | ZERO))
        out.append((start, length, DATA))
        pos = start + length
    if pos < end:
        out.append((pos, end - pos, HOLE | ZERO))
    return out


def origin_extents(io: FileIO, size: int, count: int, offset: int,
                   req_one: bool) -> list[Extent]:
    end = _end(size, count, offset)
    out = file_extents(io, offset, end)
    return out[:1] if req_one else out


def snapshot_extents(tracker, size: int, count: int, offset: int,
                     req_one: bool) -> list[Extent]:
    """What reads of ``tracker``'s snapshot return over [offset, offset + count)."""
    if tracker.health.error:
        raise SnapError(errno.EIO, f"the snapshot has failed: {tracker.health.reason}")
    end = _end(size, count, offset)
    first, last = offset >> BLOCK_SHIFT, (end + BLOCK_SIZE - 1) >> BLOCK_SHIFT
    origin = file_extents(tracker.origin_io, offset, end)  # first: see the design notes
    saved = [(max(b << BLOCK_SHIFT, offset), min((b + n) << BLOCK_SHIFT, end), kind)
             for b, n, kind in saved_runs(tracker, first, last)]
    out = merge(overlay(origin, saved))
    return out[:1] if req_one else out


def _end(size: int, count: int, offset: int) -> int:
    if offset >= size:
        raise SnapError(errno.EINVAL, f"block status at {offset}: past the end ({size})")
    return min(offset + count, offset + MAX_SPAN, size)


def saved_runs(tracker, first: int, last: int) -> list[tuple[int, int, int]]:
    """(block, count, DATA or ZERO) of the saved blocks of [first, last), ascending."""
    cow = tracker.cow
    out = []
    lo = INDEX_OFFSET + first * ENTRY_SIZE
    for start, length in cow.io.data_extents(lo, INDEX_OFFSET + last * ENTRY_SIZE):
        p = (start - INDEX_OFFSET) // PAGE_SIZE
        q = (start + length - INDEX_OFFSET + PAGE_SIZE - 1) // PAGE_SIZE
        for number in range(p, q):
            data, zero = _page_bits(tracker, number)
            base = number << PAGE_SHIFT
            for bits, kind in ((data, DATA), (zero, ZERO)):
                for a, n in bit_runs(bits):
                    b, e = max(base + a, first), min(base + a + n, last)
                    if b < e:
                        out.append((b, e - b, kind))
    out.sort()
    return out


def _page_bits(tracker, number: int) -> tuple[int, int]:
    """(saved with data, saved as zeros) bits of index page ``number``."""
    page = tracker.index.peek(number)
    if page is None:  # read it, check it, do not cache it
        cow = tracker.cow
        page = IndexPage.parse(number, cow.read_page(number), tracker.index.slot_limit,
                               cow.header.seed, cow.path, cow.header.version >= 2)
    slots = page.entries[0::2]
    zero = 0
    for i in compress(range(PAGE_BLOCKS), map(ge, slots, repeat(ZERO_AHEAD))):
        if slots[i] != MARK:  # ZERO or ZERO_AHEAD
            zero |= 1 << i
    return page.saved & ~zero, zero


def overlay(base: list[Extent], top: list[Extent]) -> list[Extent]:
    """``base`` (covering a range, in order) with the ranges of ``top`` (``(start, end,
    type)``, in order, not overlapping) put over it."""
    out: list[Extent] = []
    i = 0
    for start, length, kind in base:
        pos, end = start, start + length
        while i < len(top) and top[i][1] <= pos:
            i += 1
        j = i
        while j < len(top) and top[j][0] < end:
            t_start, t_end, t_kind = top[j]
            if t_start > pos:
                out.append((pos, t_start - pos, kind))
            b, e = max(t_start, pos), min(t_end, end)
            out.append((b, e - b, t_kind))
            pos = e
            j += 1
        if pos < end:
            out.append((pos, end - pos, kind))
    return out


def merge(extents: list[Extent]) -> list[Extent]:
    """Neighbours of one type joined."""
    out: list[Extent] = []
    for start, length, kind in extents:
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, kind)
        elif length:
            out.append((start, length, kind))
    return out

