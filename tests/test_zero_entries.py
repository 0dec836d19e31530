"""Trims and write-zeroes during a snapshot cost no COW space where nothing changes.

In process, over an origin that is half random data and half holes (a sparse file):
a trim during a snapshot is dropped; a write-zeroes saves the data it overwrites and
records holes and zeros as "saved as zeros" (no data slot); a first write into a hole
saves nothing; in incremental mode only the blocks that held data are marked. Version 1
files keep working as before, with no zero entry ever written into them.
"""

from __future__ import annotations

import errno
import os
import random
from array import array

import pytest

from snapengine import changes
from snapengine.cowfile import ZERO, ZERO_AHEAD, CowFile, Header, boot_id
from snapengine.engine import Engine
from snapengine.entry import classify, mark_changed, zero_entries
from snapengine.errors import SnapError
from snapengine.fileio import FileIO
from snapengine.snapshot import SnapshotTracker

MiB = 1 << 20
BLOCK = 4096
SIZE = 8 * MiB
DATA = 4 * MiB  # [0, DATA) random data, [DATA, SIZE) a hole


@pytest.fixture
def rig(tmp_path):
    origin = str(tmp_path / "disk.img")
    content = random.Random(9).randbytes(DATA)
    with open(origin, "wb") as f:
        f.write(content)
        f.truncate(SIZE)
    with Engine(str(tmp_path / "run"), [(origin, "disk")]) as e:
        h = e.open_export("disk", False)
        e.setup_snapshot("disk", str(tmp_path / "cow1"), 0, fallocate_mb=2)
        yield e, h, content + bytes(SIZE - DATA), tmp_path
        h.close()


def read(export, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    export.pread(buf, offset)
    return bytes(buf)


def slots(e: Engine) -> int:
    return e.minors[0].tracker.nr_slots


def test_a_trim_during_a_snapshot_is_dropped(rig):
    e, h, frozen, _ = rig
    h.trim(SIZE, 0, False)
    assert read(h, 0, SIZE) == frozen, "the trim was applied: its blocks would need saving"
    assert slots(e) == 0 and e.info(0)["nr_changed_blocks"] == 0
    assert read(e.open_export("elastio-snap0", True), 0, SIZE) == frozen


def test_write_zeroes_saves_data_and_records_holes_without_slots(rig):
    e, h, frozen, _ = rig
    h.zero(MiB, DATA - MiB // 2, False, False)  # half over data, half over the hole
    assert read(h, DATA - MiB // 2, MiB) == bytes(MiB)
    assert slots(e) == MiB // 2 // BLOCK, "only the data under the zeroes takes slots"
    assert e.info(0)["nr_changed_blocks"] == MiB // 2 // BLOCK, "zeros over zeros changed"
    assert read(e.open_export("elastio-snap0", True), 0, SIZE) == frozen
    h.pwrite(b"x" * BLOCK, DATA + BLOCK, False)  # a block saved as zeros, written now
    assert slots(e) == MiB // 2 // BLOCK and e.info(0)["nr_changed_blocks"] == 129
    assert read(e.open_export("elastio-snap0", True), 0, SIZE) == frozen


def test_a_first_write_into_a_hole_saves_nothing(rig):
    e, h, frozen, _ = rig
    h.pwrite(b"y" * (3 * BLOCK), DATA + 5 * BLOCK, False)
    assert slots(e) == 0 and e.info(0)["nr_changed_blocks"] == 3
    h.pwrite(b"y" * BLOCK, 0, False)  # into data: its 64 KiB cluster is copied
    assert slots(e) == 16
    assert read(e.open_export("elastio-snap0", True), 0, SIZE) == frozen


def test_the_limit_counts_only_data(rig):
    e, h, frozen, _ = rig
    h.zero(SIZE - DATA, DATA, False, False)  # 4 MiB of holes against a 2 MB -f
    h.pwrite(os.urandom(SIZE - DATA), DATA, False)
    assert "error" not in e.info(0), e.info(0)
    assert read(e.open_export("elastio-snap0", True), 0, SIZE) == frozen


def test_incremental_trims_and_zeroes_mark_only_blocks_that_held_data(rig):
    e, h, _, top = rig
    e.transition_to_incremental(0)
    h.trim(2 * BLOCK, 0, False)  # data: changed
    h.zero(2 * BLOCK, 10 * BLOCK, True, False)  # data: changed
    h.trim(4 * BLOCK, DATA + 8 * BLOCK, False)  # a hole: nothing changes
    h.zero(4 * BLOCK, DATA + 16 * BLOCK, False, False)  # a hole
    assert read(h, 0, 2 * BLOCK) == bytes(2 * BLOCK), "an incremental trim is applied"
    e.transition_to_snapshot(str(top / "cow2"), 0)
    with CowFile.open(str(top / "cow1"), writable=False) as cow:
        assert list(changes.changed_blocks(cow)) == [0, 1, 10, 11]


def test_a_version_1_file_gets_no_zero_entry(tmp_path):
    origin = str(tmp_path / "disk.img")
    with open(origin, "wb") as f:
        f.truncate(SIZE)
    path = str(tmp_path / "v1.cow")
    header = Header(SIZE, os.urandom(16), 1, 4 * MiB, boot_id=boot_id(), version=1)
    io = FileIO.open(origin, os.O_RDWR)
    try:
        with CowFile.create(path, header) as cow:
            tracker = SnapshotTracker(cow, io, 1 << 20)
            tracker.before_write(0, 1)  # a hole: saved as data, as version 1 did
            assert tracker.nr_slots == 16
            tracker.checkpoint(clean=True)
        with CowFile.open(path, writable=False) as cow:
            assert cow.header.version == 1
            assert list(changes.changed_blocks(cow)) == [0]
    finally:
        io.close()


def test_zero_entries_check_themselves():
    seed, first = 12345, 512
    entries, changed = zero_entries(first, 4, 1, 3, seed)
    assert list(entries[0::2]) == [ZERO_AHEAD, ZERO, ZERO, ZERO_AHEAD] and changed == 0b0110
    assert classify(entries, first, 0, seed, "f") == (0b1111, 0b0110)
    assert mark_changed(entries, first, 0b1000, 0b1111, seed, False) == 0b1000
    assert entries[6] == ZERO
    bad = array("Q", entries)
    bad[1] ^= 1  # a damaged checksum
    with pytest.raises(SnapError) as e:
        classify(bad, first, 0, seed, "f")
    assert e.value.errno == errno.EUCLEAN
    with pytest.raises(SnapError):  # no zero entry in a version 1 file
        classify(entries, first, 0, seed, "f", zeros=False)
