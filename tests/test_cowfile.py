"""The COW file format: header round trip, every check, and the committed v1 sample."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from snapengine import changes
from snapengine.cowfile import (FLAG_CLEAN, FLAG_INCREMENTAL, HEADER, INDEX_OFFSET, MAGIC,
                                PAGE_SIZE, CowFile, Header, data_offset_for)
from snapengine.errors import SnapError
from snapengine.index import IndexPage

DATA = os.path.join(os.path.dirname(__file__), "data")
UUID = bytes(range(16))


def make(path, origin_size=10 << 20, **kw) -> CowFile:
    return CowFile.create(str(path), Header(origin_size, UUID, 1, 4 << 20, **kw))


def test_header_round_trip(tmp_path):
    cow = make(tmp_path / "c", flags=FLAG_CLEAN, nr_changed_blocks=3, nr_slots=2)
    cow.close()
    again = CowFile.open(str(tmp_path / "c"))
    assert again.header == cow.header
    assert again.header.data_offset == data_offset_for(10 << 20) == 1 << 20
    again.close()


def test_create_never_overwrites(tmp_path):
    path = tmp_path / "c"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        make(path)
    assert path.read_bytes() == b"precious"


@pytest.mark.parametrize("offset, expected", [
    pytest.param(0, errno.EINVAL, id="magic"),
    pytest.param(8, errno.EINVAL, id="version"),
    pytest.param(12, errno.EUCLEAN, id="flags"),
    pytest.param(40, errno.EUCLEAN, id="uuid"),
    pytest.param(130, errno.EUCLEAN, id="checksum"),
    pytest.param(2000, errno.EUCLEAN, id="padding"),
])
def test_flipped_header_byte_is_refused(tmp_path, offset, expected):
    path = tmp_path / "c"
    make(path).close()
    raw = bytearray(path.read_bytes())
    raw += bytes(max(0, offset + 1 - len(raw)))
    raw[offset] ^= 0x40
    path.write_bytes(raw)
    with pytest.raises(SnapError) as e:
        CowFile.open(str(path))
    assert e.value.errno == expected
    assert str(path) in str(e.value)


def test_unknown_version_is_named(tmp_path):
    path = tmp_path / "c"
    make(path).close()
    raw = bytearray(path.read_bytes())
    raw[8] = 7
    path.write_bytes(raw)
    with pytest.raises(SnapError, match="version 7 is not supported"):
        CowFile.open(str(path))


def test_not_a_cow_file(tmp_path):
    path = tmp_path / "c"
    path.write_bytes(b"hello" * 1000)
    with pytest.raises(SnapError, match="not a snapengine COW file"):
        CowFile.open(str(path))


@pytest.mark.parametrize("slot, csum", [
    pytest.param(5, 0, id="slot-without-checksum"),
    pytest.param(0, 9, id="checksum-without-slot"),
    pytest.param(99, 9, id="slot-beyond-nr-slots"),
    pytest.param(0xFFFF_FFFF_FFFF_FFFF, 9, id="mark-with-wrong-checksum"),
])
def test_corrupt_entries_are_refused(slot, csum):
    raw = bytearray(PAGE_SIZE)
    raw[16:32] = slot.to_bytes(8, "little") + csum.to_bytes(8, "little")
    with pytest.raises(SnapError) as e:
        IndexPage.parse(3, bytes(raw), 10, 0, "cow")
    assert e.value.errno == errno.EUCLEAN
    assert "block 769" in str(e.value)


def test_sample_v1_file_reads_as_recorded(tmp_path):
    """tests/data/v1-incremental.cow was written by format version 1: if this fails,
    the layout changed and the version must be bumped."""
    sample = str(tmp_path / "sample.cow")
    shutil.copy(os.path.join(DATA, "v1-incremental.cow"), sample)
    cow = CowFile.open(sample, writable=False)
    h = cow.header
    assert (h.version, h.seq_id, h.origin_size, h.flags) == (1, 1, (8 << 20) + 1000,
                                                               FLAG_CLEAN | FLAG_INCREMENTAL)
    assert h.uuid.hex() == "00112233445566778899aabbccddeeff"
    assert changes.verify_index(cow).extents.tolist() == [0, 4, 256, 3, 2048, 1]
    assert h.nr_changed_blocks == 8
    assert HEADER.size == 136 and INDEX_OFFSET == 4096 and MAGIC == b"SNAPECOW"
