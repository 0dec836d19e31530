"""The COW file, version 2: header, index, saved data. Layout only; no policy.

Design notes
------------
A COW file belongs to one origin and one point in time (the snapshot point). It
records, for every 4096-byte block of the origin, whether the block has changed
since that point and, while in snapshot mode, a copy of the block's old content.

Layout (docs/cow-format.md is the contract, byte by byte)::

    0            HEADER_AREA (4096)   header, then zero padding
    INDEX_OFFSET index: one 16-byte entry per origin block, dense, sparse on disk
    data_offset  saved blocks ("slots"), 4096 bytes each, appended in copy order

The index is dense so that finding a block's entry is arithmetic (no search, no
tree to rebalance, no O(origin) set-up: an untouched index page is a hole that
reads as zeroes). An entry is ``(slot, checksum)`` (ENTRY); the slot field is a
slot number (SLOT_MASK), the AHEAD flag, or the MARK value. What an entry means
(saved, changed, ahead), how it is checked and how it changes is entry.py's, the
only module that interprets one.

Every entry validates itself, and together with the per-block data checksum this
turns any single flipped byte in the index or the data into a detected error.
Checksums are xxh3-64, seeded with the chain's uuid and the block number (data,
marks) or a role constant (header), so data saved for another block, or by another
backup chain, never verifies.

Why each write is safe is the business of tracker.py and transitions.py; this module only
promises that a header write is one pwrite of less than one sector followed by
fsync, so it is never torn.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import uuid as uuidlib
from array import array
from dataclasses import dataclass, field, replace
from itertools import repeat
from typing import Iterable

import xxhash

from .errors import SnapError
from .fileio import FileIO, fsync_dir
from .units import BLOCK_SHIFT, BLOCK_SIZE, MiB, align_up, nr_blocks

MAGIC = b"SNAPECOW"  # ASCII "SNAPECOW": identifies a snapengine COW file
VERSION = 2  # written by this build: version 1 + entries saved as zeros (ZERO, ZERO_AHEAD)
VERSIONS = (1, 2)  # read by this build; other versions are refused

# header flags
FLAG_CLEAN = 1 << 0  # index and header complete and synced; no writer since
FLAG_INCREMENTAL = 1 << 1  # index only: the data area has been released
FLAG_FAILED = 1 << 2  # the snapshot failed; ``error`` says why
FLAG_DURABLE = 1 << 3  # saved data and entries were synced before each origin overwrite
FLAG_KEPT = 1 << 4  # with FLAG_FAILED: the COW store overflowed, the data area was
# released, the index is still a whole change list (as in an incremental file)
FLAGS_KNOWN = FLAG_CLEAN | FLAG_INCREMENTAL | FLAG_FAILED | FLAG_DURABLE | FLAG_KEPT

# 136-byte header at offset 0; the rest of the first 4096 bytes must be zero.
HEADER = struct.Struct(
    "<8s"  # 0   magic
    "I"  # 8   version
    "I"  # 12  flags
    "I"  # 16  block_size, always 4096
    "I"  # 20  header_size: bytes covered by the checksum + 8
    "Q"  # 24  origin_size in bytes
    "16s"  # 32  uuid: same for every COW file of one backup chain
    "Q"  # 48  seq_id: position in the chain, 1 for the first snapshot
    "Q"  # 56  nr_changed_blocks
    "Q"  # 64  fallocate: hard limit on saved data, bytes
    "Q"  # 72  index_offset
    "Q"  # 80  data_offset
    "Q"  # 88  nr_slots: saved blocks in the data area
    "i"  # 96  error: negative errno once failed, else 0
    "I"  # 100 reserved, zero
    "16s"  # 104 boot_id of the boot that last opened the file for writing
    "Q"  # 120 generation: +1 on every header write
    "Q"  # 128 checksum: xxh3-64 of bytes 0..127, seed SEED_HEADER
)
assert HEADER.size == 136
HEADER_AREA = 4096  # bytes reserved for the header
INDEX_OFFSET = HEADER_AREA
DATA_ALIGNMENT = MiB  # data area starts on a 1 MiB boundary

ENTRY = struct.Struct("<QQ")  # slot, checksum
assert ENTRY.size == 16
ENTRY_SIZE = ENTRY.size
PAGE_BLOCKS = 256  # entries per index page: one page covers 1 MiB of origin
PAGE_SIZE = PAGE_BLOCKS * ENTRY_SIZE  # 4096 bytes
# The slot field's bits (their meaning: entry.py, which re-exports them for everyone)
MARK = 0xFFFF_FFFF_FFFF_FFFF  # slot value of a change recorded without data
AHEAD = 1 << 62  # slot flag: saved ahead with its cluster, not changed (yet)
SLOT_MASK = AHEAD - 1  # the slot number in a slot field
ZERO = MARK - 1  # version 2: old content all zeros (no data slot), changed
ZERO_AHEAD = MARK - 2  # version 2: old content all zeros, not changed (yet)
INTENT_SHIFT = 26  # log2 of the origin bytes one write-intent bit covers
INTENT_REGION = 1 << INTENT_SHIFT  # 64 MiB: a power cut can add at most this per dirty bit

SEED_HEADER = 0x5345_4843_4F57_4844  # role of the header checksum
SEED_MARK = 0x5345_4D41_524B_3031  # role of mark checksums
SEED_ZERO = 0x5345_5A45_524F_3032  # role of the checksums of entries saved as zeros
SEED_BITS = (1 << 62) - 1  # mask of the uuid part of block checksum seeds

_xxh3 = xxhash.xxh3_64_intdigest
_U64 = struct.Struct("<Q")

_zero_tail = bytes(HEADER_AREA - HEADER.size)


def boot_id() -> bytes:
    """This boot's id: a COW file marked dirty under another boot lost its page cache."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return uuidlib.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return bytes(16)


def intent_offset_for(origin_size: int) -> int:
    """The write-intent bitmap follows the index."""
    return INDEX_OFFSET + align_up(nr_blocks(origin_size) * ENTRY_SIZE, PAGE_SIZE)


def intent_bytes_for(origin_size: int) -> int:
    """One bit per INTENT_REGION bytes of origin, rounded up to whole pages."""
    regions = (origin_size + INTENT_REGION - 1) >> INTENT_SHIFT
    return align_up((regions + 7) // 8, PAGE_SIZE)


def data_offset_for(origin_size: int) -> int:
    end = intent_offset_for(origin_size) + intent_bytes_for(origin_size)
    return align_up(end, DATA_ALIGNMENT)


def uuid_seed(uuid: bytes) -> int:
    """The file's checksum seed: the uuid's first 8 bytes, little-endian, low 62 bits
    (so seed + block number never leaves 64 bits)."""
    return int.from_bytes(uuid[:8], "little") & SEED_BITS


def _nonzero(sums: array) -> array:
    """0 means "no entry" in the index, so a checksum that happens to be 0 is stored as 1."""
    return array("Q", [c or 1 for c in sums]) if 0 in sums else sums


def block_checksums(data: memoryview, block: int, seed: int) -> array:
    """Checksums of the consecutive blocks in ``data`` (a whole number of blocks),
    the first being ``block``: xxh3-64 of each block, seeded with seed + block number.
    One C-level pass: no Python loop per block."""
    n = len(data) >> BLOCK_SHIFT
    if n == 1:
        return array("Q", (_xxh3(data, seed + block) or 1,))
    starts = range(0, n << BLOCK_SHIFT, BLOCK_SIZE)
    blocks = map(data.__getitem__, map(slice, starts, range(BLOCK_SIZE, (n + 1) << BLOCK_SHIFT,
                                                            BLOCK_SIZE)))
    return _nonzero(array("Q", map(_xxh3, blocks, range(seed + block, seed + block + n))))


def block_checksums_at(data: memoryview, indexes: list[int], block: int, seed: int) -> array:
    """Checksums of the blocks at ``indexes`` (block numbers relative to ``block``) of
    ``data``, as block_checksums computes them."""
    starts = [i << BLOCK_SHIFT for i in indexes]
    blocks = map(data.__getitem__, map(slice, starts, [s + BLOCK_SIZE for s in starts]))
    return _nonzero(array("Q", map(_xxh3, blocks, [seed + block + i for i in indexes])))


def mark_checksum(block: int, seed: int) -> int:
    return _xxh3(_U64.pack(block), seed ^ SEED_MARK) or 1


def mark_checksums(blocks: Iterable[int], seed: int) -> array:
    """Checksums of the change marks of ``blocks``: xxh3-64 of the block number (u64 LE),
    seeded with seed ^ SEED_MARK."""
    return _nonzero(array("Q", map(_xxh3, map(_U64.pack, blocks), repeat(seed ^ SEED_MARK))))


def zero_checksums(blocks: Iterable[int], seed: int) -> array:
    """Checksums of the entries of ``blocks`` saved as zeros: as marks, seeded with
    seed ^ SEED_ZERO."""
    return _nonzero(array("Q", map(_xxh3, map(_U64.pack, blocks), repeat(seed ^ SEED_ZERO))))


@dataclass
class Header:
    origin_size: int
    uuid: bytes
    seq_id: int
    fallocate: int
    flags: int = 0
    nr_changed_blocks: int = 0
    nr_slots: int = 0
    error: int = 0
    boot_id: bytes = field(default=bytes(16))
    generation: int = 0
    version: int = VERSION
    data_offset: int = 0

    def __post_init__(self) -> None:
        if not self.data_offset:
            self.data_offset = data_offset_for(self.origin_size)

    @property
    def clean(self) -> bool:
        return bool(self.flags & FLAG_CLEAN)

    @property
    def incremental(self) -> bool:
        return bool(self.flags & FLAG_INCREMENTAL)

    @property
    def kept(self) -> bool:
        """Failed by an overflow, the change list kept (FLAG_KEPT)."""
        return bool(self.flags & FLAG_FAILED and self.flags & FLAG_KEPT)

    @property
    def index_only(self) -> bool:
        """The data area is gone; the index is only a change list."""
        return self.incremental or self.kept

    @property
    def durable(self) -> bool:
        return bool(self.flags & FLAG_DURABLE)

    @property
    def seed(self) -> int:
        return uuid_seed(self.uuid)

    def pack(self) -> bytes:
        body = HEADER.pack(
            MAGIC, self.version, self.flags, BLOCK_SIZE, HEADER.size, self.origin_size,
            self.uuid, self.seq_id, self.nr_changed_blocks, self.fallocate, INDEX_OFFSET,
            self.data_offset, self.nr_slots, self.error, 0, self.boot_id, self.generation, 0,
        )[:-8]
        return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body, SEED_HEADER))

    @classmethod
    def unpack(cls, raw: bytes, path: str) -> "Header":
        """Parse and check a header area; raise SnapError naming the bad field."""
        if len(raw) < HEADER.size:
            raise SnapError(errno.EINVAL, f"{path}: too short for a COW header ({len(raw)} bytes)")
        (magic, version, flags, block_size, header_size, origin_size, uuid, seq_id, nr_changed,
         fallocate, index_offset, data_offset, nr_slots, error, reserved, boot, generation,
         checksum) = HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise SnapError(errno.EINVAL, f"{path}: not a snapengine COW file "
                            f"(magic {magic!r}, expected {MAGIC!r})")
        if version not in VERSIONS:
            raise SnapError(errno.EINVAL, f"{path}: COW format version {version} is not "
                            f"supported (this build reads versions "
                            f"{', '.join(map(str, VERSIONS))})")
        actual = xxhash.xxh3_64_intdigest(raw[:HEADER.size - 8], SEED_HEADER)
        if actual != checksum:
            raise SnapError(errno.EUCLEAN, f"{path}: header checksum mismatch at offset "
                            f"{HEADER.size - 8}: stored {checksum:#018x}, computed {actual:#018x}")
        header = cls(origin_size, uuid, seq_id, fallocate, flags, nr_changed, nr_slots, error,
                     boot, generation, version, data_offset)
        header._check(raw, path, block_size, header_size, index_offset, reserved)
        return header

    def _check(self, raw: bytes, path: str, block_size: int, header_size: int,
               index_offset: int, reserved: int) -> None:
        problems = []
        if block_size != BLOCK_SIZE:
            problems.append(f"block size {block_size}, expected {BLOCK_SIZE}")
        if header_size != HEADER.size or index_offset != INDEX_OFFSET or reserved:
            problems.append(f"header size {header_size} / index offset {index_offset} "
                            f"/ reserved {reserved} are not those of version {self.version}")
        if self.flags & ~FLAGS_KNOWN:
            problems.append(f"unknown flags {self.flags & ~FLAGS_KNOWN:#x}")
        if self.data_offset != data_offset_for(self.origin_size):
            problems.append(f"data offset {self.data_offset} does not match origin size "
                            f"{self.origin_size}")
        if self.nr_changed_blocks > nr_blocks(self.origin_size):
            problems.append(f"{self.nr_changed_blocks} changed blocks in a "
                            f"{nr_blocks(self.origin_size)}-block origin")
        if self.nr_slots * BLOCK_SIZE > max(self.fallocate, 0) or self.seq_id == 0:
            problems.append(f"{self.nr_slots} slots exceed the limit of {self.fallocate} bytes "
                            f"or seq_id {self.seq_id} is 0")
        if raw[HEADER.size:HEADER_AREA].strip(b"\0"):
            problems.append("bytes after the header are not zero")
        if problems:
            raise SnapError(errno.EUCLEAN, f"{path}: corrupt header: {'; '.join(problems)}")


class CowFile:
    """One open COW file. Positional I/O only, safe from many threads at once;
    header writes are serialized by the caller (the engine's state changes)."""

    def __init__(self, io: FileIO, header: Header) -> None:
        self.io = io
        self.path = io.path
        self.header = header
        self._header_lock = threading.Lock()

    @classmethod
    def create(cls, path: str, header: Header, opener=FileIO.open) -> "CowFile":
        """Create a new COW file; never replaces an existing one (EEXIST)."""
        io = opener(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        try:
            cow = cls(io, header)
            cow.write_header()
            fsync_dir(path)
            return cow
        except BaseException:
            io.close()
            os.unlink(path)
            raise

    @classmethod
    def open(cls, path: str, opener=FileIO.open, writable: bool = True) -> "CowFile":
        io = opener(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            raw = io.pread(HEADER_AREA, 0)
            return cls(io, Header.unpack(raw, path))
        except BaseException:
            io.close()
            raise

    def write_header(self, **changes) -> None:
        """Apply ``changes`` to the header and make it durable (one sector, then fsync)."""
        with self._header_lock:
            header = replace(self.header, **changes)
            header.generation += 1
            self.io.pwrite(header.pack(), 0)
            self.io.fsync()
            self.header = header

    # -- index ----------------------------------------------------------------------
    def read_page(self, page: int) -> bytes:
        raw = self.io.pread(PAGE_SIZE, INDEX_OFFSET + page * PAGE_SIZE)
        return raw if len(raw) == PAGE_SIZE else raw + bytes(PAGE_SIZE - len(raw))

    def write_page(self, page: int, data: bytes) -> None:
        self.io.pwrite(data, INDEX_OFFSET + page * PAGE_SIZE)

    def write_entries(self, block: int, entries) -> None:
        """Write consecutive index entries (an array of u64) starting at ``block``."""
        self.io.pwrite(memoryview(entries).cast("B"), INDEX_OFFSET + block * ENTRY_SIZE)

    def index_extents(self):
        """(offset, length) of the index ranges that may hold entries (holes skipped)."""
        end = INDEX_OFFSET + nr_blocks(self.header.origin_size) * ENTRY_SIZE
        return self.io.data_extents(INDEX_OFFSET, end)

    # -- write intents ------------------------------------------------------------------
    @property
    def intent_offset(self) -> int:
        return intent_offset_for(self.header.origin_size)

    def write_intent_byte(self, index: int, value: int, durable: bool = False) -> None:
        """``durable``: with RWF_DSYNC, which syncs that page only (and flushes the
        disk's cache), not every dirty page of the file as an fdatasync does."""
        if durable:
            self.io.pwrite_dsync(bytes((value,)), self.intent_offset + index)
        else:
            self.io.pwrite(bytes((value,)), self.intent_offset + index)

    def read_intents(self) -> set[int]:
        """Regions whose bit is set in the write-intent bitmap."""
        raw = self.io.pread(intent_bytes_for(self.header.origin_size), self.intent_offset)
        regions: set[int] = set()
        for i in (i for i, byte in enumerate(raw) if byte):
            regions.update(i * 8 + bit for bit in range(8) if raw[i] >> bit & 1)
        return regions

    def clear_intents(self, indexes) -> None:
        for index in indexes:
            self.write_intent_byte(index, 0)

    # -- data -----------------------------------------------------------------------
    def slot_offset(self, slot: int) -> int:
        return self.header.data_offset + (slot - 1) * BLOCK_SIZE

    def write_data(self, slot: int, buf) -> None:
        self.io.pwrite(buf, self.slot_offset(slot))

    def release_data(self) -> None:
        """Drop every saved block (transition to incremental): the file shrinks."""
        self.io.truncate(self.header.data_offset)

    def sync(self) -> None:
        self.io.fsync()

    def close(self) -> None:
        self.io.close()

    def __enter__(self) -> "CowFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
