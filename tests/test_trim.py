"""Trims and write-zeroes during a snapshot must not fill the COW file (issue "fstrim must
not fill the COW store"), through the real daemon.

Snapshot mode: a trim is dropped (the origin keeps its old bytes, nothing is saved or
marked); a write-zeroes is applied, and only the blocks that held data are copied (a
hole, or a block of zeros, is recorded as saved as zeros). Incremental mode: both are
applied, and the blocks that held data are listed by ``changed-blocks``. In every case
the snapshot reads back exactly the origin at its snapshot point and ``info`` shows no
``error``.

* ext4 over nbdfuse + loop: ``fstrim`` after a delete, and a delete on a file system
  mounted ``-o discard`` (the loop device's discard counter proves the trims were sent);
* libnbd against a 64 MiB origin of alternating 4 MiB runs of random data and holes:
  trims over the whole origin, write-zeroes over data and over holes, and both in
  incremental mode followed by ``changed-blocks``.

"COW allocated" is ``st_blocks * 512`` of the COW file: its data is written through.
"""

from __future__ import annotations

import hashlib
import os
import random
import re

import nbd
import pytest

from tests.harness import (
    MKFS_EXT4,
    attached,
    connected,
    daemon,
    digest,
    export_digest,
    frozen,
    mounted,
    read_all,
    require,
    run,
    sparse_file,
    wait_for,
)

pytestmark = pytest.mark.e2e

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 4096  # bytes: snapengine's tracking unit, and the ext4 block size used here
SECTOR = 512  # bytes: the unit of st_blocks and of /sys/block/*/stat
MINOR = 3

EXT4_SIZE = 256 * MiB  # origin of the ext4 tests
EXT4_COW_MB = 16  # setup-snapshot -f
EXT4_COW_LIMIT = 4 * MiB  # COW allocated after the delete, the 1 MiB rewrite and the trims
OLD_SIZE = 4 * MiB  # old.bin: deleted after the snapshot
KEEP_SIZE = 4 * MiB  # keep.bin: 1 MiB of it rewritten in place after the snapshot
REWRITE_SIZE = 1 * MiB
SMALL_FILES = 8  # small files of SMALL_SIZE, so that the file system holds ~10 MiB
SMALL_SIZE = 256 * KiB
DISCARD_SECTORS_FIELD = 13  # /sys/block/loopN/stat: sectors discarded (completed)

NBD_SIZE = 64 * MiB  # origin of the libnbd tests
RUN = 4 * MiB  # alternating runs: data (even runs), hole (odd runs)
TRIM_PIECE = 64 * MiB  # bytes per trim request over the whole origin
TRIM_COW_LIMIT = 1 * MiB  # COW allocated after trimming the whole origin
HOLE_ZERO_GROWTH = 256 * KiB  # COW growth allowed for zeroing RUN bytes of holes
ZERO_COW_MB = 32  # setup-snapshot -f of the write-zeroes test: room for both ranges' data


# ---- helpers ----------------------------------------------------------------------------

def cow_allocated(path: str) -> int:
    return os.stat(path).st_blocks * SECTOR


def data_run(i: int) -> tuple[int, int]:
    """(offset, length) of the i-th data run of the libnbd origin."""
    return 2 * i * RUN, RUN


def hole_run(i: int) -> tuple[int, int]:
    return (2 * i + 1) * RUN, RUN


def half_data_origin(path: str, seed: int) -> bytes:
    """A sparse NBD_SIZE file: random data in the even RUN-sized runs, holes in the odd
    ones. Returns its content."""
    rng = random.Random(seed)
    content = bytearray(NBD_SIZE)
    sparse_file(path, NBD_SIZE)
    with open(path, "r+b") as f:
        for i in range(NBD_SIZE // (2 * RUN)):
            offset, length = data_run(i)
            content[offset:offset + length] = rng.randbytes(length)
            f.seek(offset)
            f.write(content[offset:offset + length])
    return bytes(content)


def first_difference(actual: bytes, expected: bytes) -> str:
    if len(actual) != len(expected):
        return f"size {len(actual)}, expected {len(expected)}"
    for offset in range(0, len(expected), BLOCK):
        if actual[offset:offset + BLOCK] != expected[offset:offset + BLOCK]:
            return f"first different block at offset {offset}"
    return "identical"


def assert_export_equals(uri: str, expected: bytes, what: str) -> None:
    actual = read_all(uri)
    assert actual == expected, f"{what}: {first_difference(actual, expected)}"


def file_range(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def covered(extents: list[tuple[int, int]], offset: int, length: int) -> bool:
    """Every byte of [offset, offset + length) lies in one of ``extents``."""
    end = offset
    for start, n in sorted(extents):
        if start <= end < start + n:
            end = start + n
    return end >= offset + length


def overlaps(extents: list[tuple[int, int]], offset: int, length: int) -> bool:
    return any(start < offset + length and offset < start + n for start, n in extents)


def changed_extents(d, cow: str) -> list[tuple[int, int]]:
    """``elioctl changed-blocks COW``: its OFFSET LENGTH lines."""
    lines = d.elioctl("changed-blocks", cow).stdout.split("\n")
    return [tuple(map(int, line.split())) for line in lines if line.strip()]


def healthy(d, what: str) -> dict:
    info = d.info(MINOR)
    assert "error" not in info, f"{what}: snapshot failed: {info}"
    return info


# ---- ext4 over nbdfuse + loop --------------------------------------------------------------

FILEFRAG_SIZE = re.compile(r"\((\d+) blocks? of (\d+) bytes\)")
FILEFRAG_EXTENT = re.compile(r"^\s*\d+:\s*(\d+)\.\.\s*(\d+):\s*(\d+)\.\.\s*(\d+):\s*(\d+):(.*)$")
FILEFRAG_BAD_FLAGS = ("unknown", "delalloc", "unwritten", "inline", "encoded")


def physical_extents(path: str) -> list[tuple[int, int]]:
    """(device offset, length) in bytes of every extent of ``path``, in file order
    (``filefrag -e``, after a sync: nothing delayed or unwritten)."""
    out = run(["filefrag", "-e", path]).stdout
    unit = int(FILEFRAG_SIZE.search(out).group(2))
    extents = []
    for line in out.splitlines():
        m = FILEFRAG_EXTENT.match(line)
        if m is None:
            continue
        assert not any(flag in m.group(6) for flag in FILEFRAG_BAD_FLAGS), line
        extents.append((int(m.group(1)), int(m.group(3)) * unit, int(m.group(5)) * unit))
    extents.sort()
    assert sum(n for _, _, n in extents) >= os.path.getsize(path), out
    return [(offset, n) for _, offset, n in extents]


def read_extents(uri: str, extents: list[tuple[int, int]], size: int) -> bytes:
    with connected(uri) as h:
        return b"".join(h.pread(n, offset) for offset, n in extents)[:size]


def discarded_bytes(device: str) -> int:
    """Bytes the loop device has discarded (completed requests) since it was set up."""
    with open(f"/sys/block/{os.path.basename(device)}/stat") as f:
        return int(f.read().split()[DISCARD_SECTORS_FIELD]) * SECTOR


def populate(fs: str, rng: random.Random) -> bytes:
    """old.bin, keep.bin and SMALL_FILES small files (~10 MiB); returns old.bin's content."""
    old = rng.randbytes(OLD_SIZE)
    files = {"old.bin": old, "keep.bin": rng.randbytes(KEEP_SIZE)}
    files.update({f"small{i}": rng.randbytes(SMALL_SIZE) for i in range(SMALL_FILES)})
    for name, data in files.items():
        with open(os.path.join(fs, name), "wb") as f:
            f.write(data)
    run(["sync"])
    return old


@pytest.mark.parametrize("how", ["fstrim", "mount-o-discard"])
def test_trims_from_ext4_cost_no_cow_space(tmp_path, how):
    require("mkfs.ext4", "fsfreeze", "fstrim", "filefrag")
    origin = sparse_file(str(tmp_path / "disk.img"), EXT4_SIZE)
    cow = str(tmp_path / "cow")
    rng = random.Random(20261203)
    with daemon(str(tmp_path / "run"), [(origin, "disk0")]) as d:
        snap_uri = d.uri(f"elastio-snap{MINOR}")
        with attached(d.uri("disk0"), str(tmp_path / "fuse")) as dev:
            run(MKFS_EXT4 + [dev])
            options = "discard" if how == "mount-o-discard" else ""
            with mounted(dev, str(tmp_path / "fs"), options) as fs:
                old_path = os.path.join(fs, "old.bin")
                old = populate(fs, rng)
                old_extents = physical_extents(old_path)
                with frozen(fs):
                    d.elioctl("setup-snapshot", "-f", str(EXT4_COW_MB), "disk0", cow, MINOR)
                    frozen_digest = digest(origin)  # nothing writes the origin while frozen
                assert read_extents(snap_uri, old_extents, OLD_SIZE) == old, \
                    f"old.bin's extents {old_extents} (filefrag) do not hold its content"

                discarded = discarded_bytes(dev)
                os.unlink(old_path)
                with open(os.path.join(fs, "keep.bin"), "r+b") as f:  # in place
                    f.write(rng.randbytes(REWRITE_SIZE))
                run(["sync"])  # commits the delete (-o discard: its trims follow)
                if how == "fstrim":
                    out = run(["fstrim", "-v", fs]).stdout
                    assert discarded_bytes(dev) - discarded >= OLD_SIZE, out
                else:
                    wait_for(lambda: discarded_bytes(dev) - discarded >= OLD_SIZE,
                             what=f"{dev} to discard old.bin's {OLD_SIZE} bytes")
                run(["sync"])

                allocated = cow_allocated(cow)
                assert allocated < EXT4_COW_LIMIT, (
                    f"{how}: COW file allocated {allocated} bytes "
                    f"({allocated / MiB:.2f} MiB), limit {EXT4_COW_LIMIT / MiB:.0f} MiB; "
                    f"trimmed {(discarded_bytes(dev) - discarded) / MiB:.1f} MiB; "
                    f"info {d.info(MINOR)}")
                assert healthy(d, how)["state"] == 3
                assert read_extents(snap_uri, old_extents, OLD_SIZE) == old, \
                    "old.bin is not in the snapshot any more"
                assert read_extents(d.uri("disk0"), old_extents, OLD_SIZE) == old, \
                    "a trim during the snapshot was applied to the origin"
                assert export_digest(snap_uri) == frozen_digest, \
                    "the snapshot differs from the origin at the snapshot point"
        healthy(d, f"{how}, detached")
        d.elioctl("destroy", MINOR)


# ---- libnbd: trims and write-zeroes, snapshot mode -----------------------------------------

def test_trims_during_a_snapshot_are_dropped(tmp_path):
    origin = str(tmp_path / "disk.img")
    content = half_data_origin(origin, seed=20261204)
    cow = str(tmp_path / "cow")
    with daemon(str(tmp_path / "run"), [(origin, "disk0")]) as d:
        d.elioctl("setup-snapshot", "disk0", cow, MINOR)
        changed_before = d.info(MINOR)["nr_changed_blocks"]
        with connected(d.uri("disk0")) as h:
            assert h.can_trim()
            for offset in range(0, NBD_SIZE, TRIM_PIECE):
                h.trim(min(TRIM_PIECE, NBD_SIZE - offset), offset)
            h.flush()
        allocated = cow_allocated(cow)
        assert allocated < TRIM_COW_LIMIT, (
            f"COW file allocated {allocated} bytes ({allocated / KiB:.0f} KiB) after "
            f"trimming the whole origin, limit {TRIM_COW_LIMIT // KiB} KiB; "
            f"info {d.info(MINOR)}")
        info = healthy(d, "trim")
        assert info["nr_changed_blocks"] == changed_before, info
        assert_export_equals(d.uri(f"elastio-snap{MINOR}"), content, "snapshot")
        assert_export_equals(d.uri("disk0"), content, "origin (trims must be dropped)")
        d.elioctl("destroy", MINOR)
    for i in range(NBD_SIZE // (2 * RUN)):  # and on disk
        offset, length = data_run(i)
        assert file_range(origin, offset, length) == content[offset:offset + length], \
            f"origin file changed at its data run {offset}"


@pytest.mark.parametrize("flags", [0, nbd.CMD_FLAG_NO_HOLE], ids=["may-trim", "no-hole"])
def test_write_zeroes_copy_only_data(tmp_path, flags):
    origin = str(tmp_path / "disk.img")
    content = half_data_origin(origin, seed=20261205)
    cow = str(tmp_path / "cow")
    data_offset, data_length = data_run(2)
    hole_offset, hole_length = hole_run(5)
    with daemon(str(tmp_path / "run"), [(origin, "disk0")]) as d:
        snap_uri = d.uri(f"elastio-snap{MINOR}")
        d.elioctl("setup-snapshot", "-f", str(ZERO_COW_MB), "disk0", cow, MINOR)
        with connected(d.uri("disk0")) as h:
            start = cow_allocated(cow)
            h.zero(data_length, data_offset, flags)
            h.flush()
            over_data = cow_allocated(cow)
            h.zero(hole_length, hole_offset, flags)
            h.flush()
            over_holes = cow_allocated(cow)
            assert h.pread(data_length, data_offset) == bytes(data_length)
            assert h.pread(hole_length, hole_offset) == bytes(hole_length)
        assert over_data - start >= data_length, (
            f"zeroing {data_length} bytes of data grew the COW file by {over_data - start} "
            f"bytes: the old data was not saved")
        assert over_holes - over_data < HOLE_ZERO_GROWTH, (
            f"zeroing {hole_length} bytes of holes grew the COW file by "
            f"{over_holes - over_data} bytes ({(over_holes - over_data) / KiB:.0f} KiB), "
            f"limit {HOLE_ZERO_GROWTH // KiB} KiB")
        healthy(d, "zero")
        with connected(snap_uri) as s:
            assert s.pread(data_length, data_offset) == \
                content[data_offset:data_offset + data_length]
        assert_export_equals(snap_uri, content, "snapshot")
        now = bytearray(content)
        now[data_offset:data_offset + data_length] = bytes(data_length)
        assert_export_equals(d.uri("disk0"), bytes(now), "origin")
        d.elioctl("destroy", MINOR)


# ---- libnbd: incremental mode ----------------------------------------------------------------

def test_incremental_trims_and_zeroes_of_data_are_changes(tmp_path):
    origin = str(tmp_path / "disk.img")
    content = half_data_origin(origin, seed=20261206)
    old_cow, new_cow = str(tmp_path / "cow1"), str(tmp_path / "cow2")
    trimmed, zeroed, hole, untouched = data_run(2), data_run(4), hole_run(5), data_run(6)
    with daemon(str(tmp_path / "run"), [(origin, "disk0")]) as d:
        d.elioctl("setup-snapshot", "disk0", old_cow, MINOR)
        d.elioctl("transition-to-incremental", MINOR)
        with connected(d.uri("disk0")) as h:
            h.trim(trimmed[1], trimmed[0])
            h.trim(hole[1], hole[0])
            h.zero(zeroed[1], zeroed[0])
            h.flush()
            for offset, length in (trimmed, zeroed):  # applied, to a file: zeros
                assert h.pread(length, offset) == bytes(length), f"{offset} not applied"
        healthy(d, "incremental")
        d.elioctl("transition-to-snapshot", new_cow, MINOR)
        healthy(d, "after transition-to-snapshot")
        listed = changed_extents(d, old_cow)
        assert covered(listed, *trimmed), f"trimmed data {trimmed} not listed: {listed}"
        assert covered(listed, *zeroed), f"zeroed data {zeroed} not listed: {listed}"
        assert not overlaps(listed, *untouched), \
            f"untouched data {untouched} listed as changed: {listed}"
        now = bytearray(content)
        for offset, length in (trimmed, zeroed):
            now[offset:offset + length] = bytes(length)
        assert_export_equals(d.uri(f"elastio-snap{MINOR}"), bytes(now), "new snapshot")
        d.elioctl("destroy", MINOR)
    assert hashlib.sha256(bytes(now)).hexdigest() == digest(origin)
