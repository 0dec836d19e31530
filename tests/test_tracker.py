"""The trackers in process: the engine's failure paths (the -f limit, corrupt saved data,
the cache bound) and change marking in both modes."""

from __future__ import annotations

import errno
import os

import pytest

from snapengine import changes
from snapengine.cowfile import INDEX_OFFSET, CowFile, Header
from snapengine.engine import Engine
from snapengine.entry import AHEAD, MARK
from snapengine.errors import SnapError
from snapengine.fileio import FileIO
from snapengine.index import MIN_CACHE_PAGES, PAGE_COST
from snapengine.snapshot import SnapshotTracker
from snapengine.tracker import IncrementalTracker

MiB = 1 << 20


@pytest.fixture
def engine(tmp_path):
    origin = tmp_path / "disk.img"
    with open(origin, "wb") as f:
        f.write(os.urandom(8 * MiB))
    with Engine(str(tmp_path), [(str(origin), "disk")]) as e:
        yield e


def read(export, offset, length):
    buf = bytearray(length)
    export.pread(buf, offset)
    return bytes(buf)


def test_fallocate_limit_fails_the_snapshot_not_the_origin_nor_its_list(engine, tmp_path):
    h = engine.open_export("disk", False)
    before = read(h, 0, 8 * MiB)
    engine.setup_snapshot("disk", str(tmp_path / "cow"), 0, fallocate_mb=1)
    snap = engine.open_export("elastio-snap0", True)
    new = os.urandom(3 * MiB)
    h.pwrite(new, 0, False)  # 3 MiB of first touches against a 1 MiB limit
    info = engine.info(0)
    assert info["error"] == -errno.EFBIG and info["state"] == 3 and info["tracking"] is True
    assert read(h, 0, 3 * MiB) == new  # nothing written to the origin is lost
    assert read(h, 3 * MiB, 5 * MiB) == before[3 * MiB:]
    with pytest.raises(SnapError) as e:
        read(snap, 0, 4096)
    assert e.value.errno == errno.EIO
    h.pwrite(b"z" * 4096, 7 * MiB, False)  # later writes go straight through, marked
    assert read(h, 7 * MiB, 4096) == b"z" * 4096
    info = engine.info(0)
    assert info["nr_changed_blocks"] == 3 * MiB // 4096 + 1
    assert info["cow_size_current"] < MiB  # the saved data was given back at once
    header = CowFile.open(str(tmp_path / "cow"), writable=False).header
    assert header.error == -errno.EFBIG and header.kept  # recorded in the file too
    engine.transition_to_incremental(0)  # the list was kept: the chain goes on
    info = engine.info(0)
    assert info["state"] == 2 and "error" not in info and "tracking" not in info
    h.pwrite(b"y" * 4096, 6 * MiB, False)
    engine.transition_to_snapshot(str(tmp_path / "cow2"), 0)
    h.close()
    closed = changes.read_closed(str(tmp_path / "cow"))
    assert list(closed.byte_extents()) == [(0, 3 * MiB), (6 * MiB, 4096), (7 * MiB, 4096)]
    engine.destroy(0)
    assert not os.path.exists(tmp_path / "cow2")


def test_flipped_byte_in_saved_data_reads_as_eio(engine, tmp_path):
    h = engine.open_export("disk", False)
    old = read(h, 0, 64 * 1024)
    engine.setup_snapshot("disk", str(tmp_path / "cow"), 0)
    snap = engine.open_export("elastio-snap0", True)
    h.pwrite(b"n" * 8192, 4096, False)
    assert read(snap, 0, 64 * 1024) == old
    with CowFile.open(str(tmp_path / "cow"), writable=False) as cow:
        slot = cow.io.pread(8, INDEX_OFFSET + 2 * 16)[0]  # block 2's entry (a small slot)
        at = cow.slot_offset(slot)
    with open(tmp_path / "cow", "r+b") as f:
        f.seek(at + 100)  # block 2's saved data
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(SnapError) as e:
        read(snap, 8192, 4096)
    assert e.value.errno == errno.EIO and "checksum" in str(e.value)
    assert engine.info(0)["error"] == -errno.EIO
    h.pwrite(b"m" * 4096, 0, False)
    assert read(h, 0, 4096) == b"m" * 4096


def test_cache_stays_within_its_bound(tmp_path):
    origin = tmp_path / "big.img"
    with open(origin, "wb") as f:
        f.truncate(2048 * MiB)  # sparse: 2048 index pages, twice the cache floor
    with Engine(str(tmp_path), [(str(origin), "big")]) as engine:
        engine.setup_snapshot("big", str(tmp_path / "cow"), 0, cache_mb=1)
        tracker = engine.minors[0].tracker
        h = engine.open_export("big", False)
        bound = max(MiB, MIN_CACHE_PAGES * PAGE_COST)
        for offset in range(0, 2048 * MiB, MiB):  # one new index page per write
            h.pwrite(b"x", offset, False)
            assert tracker.cache_bytes <= bound
        assert tracker.index.loads == 2048 and tracker.cache_bytes == bound
        snap = engine.open_export("elastio-snap0", True)
        assert read(snap, 0, 1) == b"\0"  # evicted pages come back from disk
        engine.reconfigure(0, 2)
        assert engine.info(0)["max_cache"] == 2 * MiB
        assert engine.info(0)["nr_changed_blocks"] == 2048
        h.close()


def test_both_modes_mark_ahead_entries_changed(tmp_path):
    """One mark_changed for both modes: snapshot mode clears AHEAD; after the transition,
    AHEAD entries left from the snapshot phase are cleared and new blocks get a MARK."""
    path = tmp_path / "origin"
    path.write_bytes(os.urandom(MiB))
    origin = FileIO.open(str(path), os.O_RDWR)
    cow = CowFile.create(str(tmp_path / "cow"), Header(MiB, bytes(16), 1, MiB))
    try:
        snap = SnapshotTracker(cow, origin, MiB)
        snap.before_write(0, 1)  # saves blocks 0-15; 1-15 AHEAD
        snap.before_write(3, 4)  # AHEAD: cleared, no copy
        assert snap.nr_changed == 2 and snap.nr_slots == 16
        snap.mark_incremental(clean=False)
        cow.release_data()
        incr = IncrementalTracker(cow, origin, MiB)
        incr.before_write(5, 7)  # AHEAD from the snapshot phase
        incr.before_write(100, 101)  # no entry: a MARK
        incr.before_write(3, 4)  # changed already: nothing
        assert incr.nr_changed == 5
        incr.checkpoint(clean=True)
        slots = [cow.io.pread(8, INDEX_OFFSET + 16 * b) for b in (1, 3, 5, 100)]
        slots = [int.from_bytes(s, "little") for s in slots]
        assert slots == [AHEAD | 2, 4, 6, MARK]
        assert list(changes.changed_blocks(cow)) == [0, 3, 5, 6, 100]
    finally:
        cow.close()
        origin.close()
