"""Sizes and unit conversions shared by every module."""

from __future__ import annotations

BLOCK_SIZE = 4096  # bytes per tracked block (the unit of COW copies and change marks)
BLOCK_SHIFT = 12  # log2(BLOCK_SIZE)
MiB = 1 << 20
MB = MiB  # elioctl's -c and -f are "MB" in the kernel tool's sense: 2**20 bytes


def blocks_spanning(offset: int, length: int) -> tuple[int, int]:
    """First block and one past the last block touched by [offset, offset+length)."""
    return offset >> BLOCK_SHIFT, (offset + length + BLOCK_SIZE - 1) >> BLOCK_SHIFT


def nr_blocks(size: int) -> int:
    """Number of blocks needed to cover ``size`` bytes (the last may be partial)."""
    return (size + BLOCK_SIZE - 1) >> BLOCK_SHIFT


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment
