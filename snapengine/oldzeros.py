"""Which blocks of the origin hold zeros before a change: a file's holes, blocks read.

A block whose old content is all zeros needs no copy: tracker.py records it "saved as
zeros" (entry.py). Holes of a file origin are found with SEEK_DATA / SEEK_HOLE (one or
two lseek calls, no read); a write-zeroes also reads its clusters and looks for blocks
of zeros, which is all a block device allows. Both are asked before the blocks are
claimed: a block still unsaved at its claim has not been overwritten since the snapshot
point, so what they saw is its old content.

Block sets are ints, bit 0 the first block of the range asked about.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from .entry import bit_runs, span_bits
from .fileio import FileIO
from .units import BLOCK_SHIFT, BLOCK_SIZE

_ZERO_BLOCK = bytes(BLOCK_SIZE)


class KnownData:
    """Byte ranges of one origin file seen holding data, so that a first touch inside
    one costs no lseek. On tmpfs a SEEK_HOLE walks the page cache up to the next hole:
    12 ms on a full 2 GiB file, paid once per copied cluster before this cache.

    Only data is remembered, never a hole, so the cache can only make ``holes`` say
    "data" where there is now a hole: such a block is copied from the origin (it reads
    zeros, its content) instead of saved as zeros; right either way. A block with no
    entry has not changed since the snapshot point, so a hole is never needed fresher
    than the file system's answer, which is asked for every range not covered here.
    One per tracker: a new snapshot starts with nothing known.

    Thread-safety: lock-free; the runs are replaced whole, a lost update only costs an
    lseek later."""

    MAX_RUNS = 1024  # past this many separate runs the cache starts again

    def __init__(self) -> None:
        self._runs: tuple[list[int], list[int]] = ([], [])  # starts, ends: sorted, disjoint

    def covers(self, start: int, stop: int) -> bool:
        starts, ends = self._runs
        i = bisect_right(starts, start) - 1
        return i >= 0 and ends[i] >= stop

    def add(self, start: int, end: int) -> None:
        starts, ends = self._runs
        i, j = bisect_left(ends, start), bisect_right(starts, end)  # runs i..j-1 touch it
        if i < j:
            start, end = min(start, starts[i]), max(end, ends[j - 1])
        if len(starts) - (j - i) >= self.MAX_RUNS:
            self._runs = ([start], [end])
        else:
            self._runs = (starts[:i] + [start] + starts[j:], ends[:i] + [end] + ends[j:])


def holes(io: FileIO, size: int, first: int, end: int, known: KnownData | None = None) -> int:
    """The blocks of [first, end) wholly in a hole of file ``io`` (``size`` bytes): their
    content is zeros. 0 for a block device, or where the file system cannot tell.
    ``known``: ranges seen holding data (asked first, and told what lseek finds)."""
    if io.is_block:
        return 0
    start, stop = first << BLOCK_SHIFT, min(end << BLOCK_SHIFT, size)
    if known is not None and known.covers(start, stop):
        return 0
    data, offset = 0, start
    while offset < stop:
        found = io.data_at(offset)
        if found is None:
            break
        lo, hi = found
        if known is not None:
            known.add(lo, hi)
        if lo >= stop:
            break
        data |= span_bits((lo >> BLOCK_SHIFT) - first,
                          ((min(hi, stop) + BLOCK_SIZE - 1) >> BLOCK_SHIFT) - first)
        offset = hi
    return span_bits(0, end - first) & ~data


def data_runs(io: FileIO, size: int, first: int, end: int,
              known: KnownData | None = None) -> list[tuple[int, int]]:
    """Runs [lo, hi) of the blocks of [first, end) that may hold data: all but holes."""
    found = holes(io, size, first, end, known)
    if not found:
        return [(first, end)]
    return [(first + a, first + a + n)
            for a, n in bit_runs(span_bits(0, end - first) & ~found)]


def old_zeros(io: FileIO, size: int, lo: int, hi: int, read: bool,
              known: KnownData | None = None) -> tuple[int, memoryview | None]:
    """The blocks of [lo, hi) whose content is all zeros: the holes, and with ``read``
    (a write-zeroes) also the blocks read as zeros; then the content read, else None."""
    zeros = holes(io, size, lo, hi, known)
    if not read or zeros == span_bits(0, hi - lo):
        return zeros, None
    data = memoryview(bytearray((hi - lo) << BLOCK_SHIFT))  # past the end: zeroes
    io.pread_into(data, lo << BLOCK_SHIFT)
    for k in range(hi - lo):
        if not zeros >> k & 1 and \
                bytes(data[k << BLOCK_SHIFT:(k + 1) << BLOCK_SHIFT]) == _ZERO_BLOCK:
            zeros |= 1 << k
    return zeros, data


def split_runs(block: int, n: int, zeros: int) -> list[tuple[int, int, int]]:
    """Run [block, block + n) cut at ``zeros`` (bit 0: ``block``): (block, count, 0) for
    the pieces of zeros, (block, count, -1) for those that need data slots."""
    out, pos = [], 0
    for a, length in bit_runs(zeros & span_bits(0, n)):
        if a > pos:
            out.append((block + pos, a - pos, -1))
        out.append((block + a, length, 0))
        pos = a + length
    if pos < n:
        out.append((block + pos, n - pos, -1))
    return out
