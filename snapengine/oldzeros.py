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

from .entry import bit_runs, span_bits
from .fileio import FileIO
from .units import BLOCK_SHIFT, BLOCK_SIZE

_ZERO_BLOCK = bytes(BLOCK_SIZE)


def holes(io: FileIO, size: int, first: int, end: int) -> int:
    """The blocks of [first, end) wholly in a hole of file ``io`` (``size`` bytes): their
    content is zeros. 0 for a block device, or where the file system cannot tell."""
    if io.is_block:
        return 0
    start, stop = first << BLOCK_SHIFT, min(end << BLOCK_SHIFT, size)
    data = 0
    for offset, length in io.data_extents(start, stop):
        data |= span_bits((offset >> BLOCK_SHIFT) - first,
                          ((offset + length + BLOCK_SIZE - 1) >> BLOCK_SHIFT) - first)
    return span_bits(0, end - first) & ~data


def data_runs(io: FileIO, size: int, first: int, end: int) -> list[tuple[int, int]]:
    """Runs [lo, hi) of the blocks of [first, end) that may hold data: all but holes."""
    found = holes(io, size, first, end)
    if not found:
        return [(first, end)]
    return [(first + a, first + a + n)
            for a, n in bit_runs(span_bits(0, end - first) & ~found)]


def old_zeros(io: FileIO, size: int, lo: int, hi: int,
              read: bool) -> tuple[int, memoryview | None]:
    """The blocks of [lo, hi) whose content is all zeros: the holes, and with ``read``
    (a write-zeroes) also the blocks read as zeros; then the content read, else None."""
    zeros = holes(io, size, lo, hi)
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
