"""update-img against the real daemon: every way of naming the snapshot, and every refusal
(exit EINVAL, image untouched)."""

from __future__ import annotations

import errno
import json
import os
import shutil

import nbd
import pytest

from snapengine import copier, source, updateimg, zeromap
from snapengine.cowfile import FLAG_CLEAN, CowFile
from snapengine.errors import SnapError
from snapengine.stamp import SnapshotId
from tests.harness import daemon, digest, export_bytes, run, sparse_file, update_img

pytestmark = pytest.mark.e2e

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Minor 0 on disk0: snapshots seq 1 (cow1), 2 (cow2), 3 (cow3, live); minor 1 on
    disk1: another chain, cowA (seq 1) closed. A full image of snapshot 2 in image2."""
    base = tmp_path_factory.mktemp("update-img")
    disks = [sparse_file(str(base / f"disk{i}.img"), SIZE) for i in range(2)]
    with daemon(str(base / "run"), [(disks[0], "disk0"), (disks[1], "disk1")]) as d:
        h = nbd.NBD()
        h.connect_uri(d.uri("disk0"))
        h.pwrite(os.urandom(SIZE), 0)
        d.elioctl("setup-snapshot", "disk0", str(base / "cow1"), "0")
        d.elioctl("transition-to-incremental", "0")
        for offset in (0, 5 * MiB + 4096, SIZE - 8192):
            h.pwrite(os.urandom(8192), offset)
        d.elioctl("transition-to-snapshot", str(base / "cow2"), "0")
        run(["nbdcopy", d.uri("elastio-snap0"), str(base / "image2")])
        d.elioctl("transition-to-incremental", "0")
        h.pwrite(os.urandom(3 * MiB), MiB + 512)
        h.flush()
        d.elioctl("transition-to-snapshot", str(base / "cow3"), "0")
        h.shutdown()
        d.elioctl("setup-snapshot", "disk1", str(base / "cowA"), "1")
        d.elioctl("transition-to-incremental", "1")
        d.elioctl("transition-to-snapshot", str(base / "cowB"), "1")
        d.base = base
        yield d


@pytest.fixture
def image(chain, tmp_path):
    """A fresh copy of the full backup of snapshot 2."""
    path = tmp_path / "image"
    shutil.copy(chain.base / "image2", path)
    return path


@pytest.mark.parametrize("form", ["minor", "export", "uri", "local"])
def test_update_brings_the_image_to_the_snapshot(chain, image, tmp_path, form):
    snapshot = {"minor": "0", "export": "elastio-snap0", "uri": chain.uri("elastio-snap0")}
    args = [snapshot.get(form)]
    if form == "local":
        local = tmp_path / "snapshot-copy"
        run(["nbdcopy", chain.uri("elastio-snap0"), str(local)])
        args = ["--minor", "0", local]
    r = update_img(chain, *args, chain.base / "cow2", image)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"copying complete: {CowFile.open(str(chain.base / 'cow2'), writable=False).header.nr_changed_blocks} blocks changed, 0 errors\n"
    assert image.read_bytes() == export_bytes(chain, "elastio-snap0")


def corrupted_copy(src, dst, **changes):
    shutil.copy(src, dst)
    cow = CowFile.open(str(dst))
    cow.write_header(**changes)
    cow.close()
    return dst


@pytest.mark.parametrize("case", ["other-chain", "wrong-position", "dirty", "truncated",
                                  "in-use", "image-size", "not-a-cow-file"])
def test_refusals_leave_the_image_untouched(chain, image, tmp_path, case):
    base = chain.base
    cow = base / "cow2"
    if case == "other-chain":
        cow = base / "cowA"
    elif case == "wrong-position":
        cow = base / "cow1"
    elif case == "dirty":
        h = CowFile.open(str(cow), writable=False).header
        cow = corrupted_copy(cow, tmp_path / "dirty", flags=h.flags & ~FLAG_CLEAN)
    elif case == "truncated":
        shutil.copy(cow, tmp_path / "truncated")
        cow = tmp_path / "truncated"
        os.truncate(cow, 4096 + 16 * 1000)  # cuts off index entries of changed blocks
    elif case == "in-use":
        cow = base / "cow3"  # the live snapshot's own file: open, so not clean
    elif case == "image-size":
        os.truncate(image, SIZE - 4096)
    elif case == "not-a-cow-file":
        cow = tmp_path / "junk"
        cow.write_bytes(os.urandom(8192))
    before = digest(image)
    r = update_img(chain, "0", cow, image)
    assert r.returncode == errno.EINVAL, (r.stdout, r.stderr)
    assert r.stderr.startswith("update-img: ") and r.stderr.count("\n") == 1
    assert "copying complete" not in r.stdout
    assert digest(image) == before


def test_missing_files_and_unknown_snapshots(chain, image, tmp_path):
    r = update_img(chain, "0", tmp_path / "nope", image)
    assert r.returncode == errno.ENOENT
    r = update_img(chain, "0", chain.base / "cow2", tmp_path / "no-image")
    assert r.returncode == errno.ENOENT
    r = update_img(chain, "7", chain.base / "cow2", image)  # no such snapshot export
    assert r.returncode == errno.ENOENT
    r = update_img(chain, image, chain.base / "cow2", image)  # a local file without --minor
    assert r.returncode == errno.EINVAL and "--minor" in r.stderr


# -- which snapshot each connection reads --------------------------------------------------

def description(d, export: str) -> str:
    h = nbd.NBD()
    h.set_full_info(True)
    h.connect_uri(d.uri(export))
    try:
        return h.get_export_description()
    finally:
        h.shutdown()


def test_exports_describe_themselves_in_json(chain):
    """What update-img reads first: the snapshot's identity, as a JSON object."""
    for minor, seq_id in ((0, 3), (1, 2)):
        assert json.loads(description(chain, f"elastio-snap{minor}")) == {
            "snapengine": "snapshot", "minor": minor, "uuid": chain.info(minor)["uuid"],
            "seq_id": seq_id}
    assert json.loads(description(chain, "disk0")) == {
        "snapengine": "origin", "path": str(chain.base / "disk0.img")}


def test_an_origin_is_not_a_snapshot(chain, image):
    before = digest(image)
    r = update_img(chain, chain.uri("disk0"), chain.base / "cow2", image)
    assert r.returncode == errno.EINVAL and "is the origin" in r.stderr, r.stderr
    assert digest(image) == before


@pytest.mark.parametrize("said", [None, "a proxy's own words", '{"name": "elastio-snap0"}'],
                         ids=["absent", "free-text", "other-json"])
def test_without_our_description_the_daemon_is_asked_on_every_connection(
        chain, image, monkeypatch, capsys, said):
    asked = []
    ask = source.minor_identity
    monkeypatch.setattr(source, "export_description", lambda h: said)
    monkeypatch.setattr(source, "minor_identity",
                        lambda run_dir, minor: asked.append(minor) or ask(run_dir, minor))
    args = ["--run-dir", chain.run_dir, chain.uri("elastio-snap0"), chain.base / "cow2", image]
    assert updateimg.main(list(map(str, args))) == 0, capsys.readouterr().err
    assert asked == [0] * updateimg.WORKERS  # minor 0: from the export's name
    assert image.read_bytes() == export_bytes(chain, "elastio-snap0")


class FakeConnection:
    def __init__(self, identity: SnapshotId, size: int = SIZE) -> None:
        self.identity, self.size, self.closed = identity, size, False

    def read(self, length: int, offset: int) -> bytes:
        raise AssertionError("no connection may be read before all are checked")

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("second", [SnapshotId("ab" * 16, 3), SnapshotId("cd" * 16, 2)],
                         ids=["next-snapshot", "new-chain"])
def test_a_connection_to_another_snapshot_is_refused(second):
    """The boundary itself: Snapshot.readers checks each connection as it opens, before
    anyone reads; the refused one and all before it are closed."""
    first = SnapshotId("ab" * 16, 2)
    made = [FakeConnection(first), FakeConnection(first), FakeConnection(second)]
    queue = list(made)
    with pytest.raises(SnapError) as e:
        with source.Snapshot("fake", lambda: queue.pop(0)) as snap:
            snap.readers(4)
    assert e.value.errno == errno.EAGAIN and "run it again" in str(e.value)
    assert str(first) in str(e.value) and str(second) in str(e.value)
    assert [c.closed for c in made] == [True, True, True] and len(queue) == 0


def test_connections_to_the_same_snapshot_give_one_reader_each():
    same = SnapshotId("ab" * 16, 2)
    made = [FakeConnection(same) for _ in range(4)]
    queue = list(made)
    with source.Snapshot("fake", lambda: queue.pop(0)) as snap:
        assert snap.readers(4) == [c.read for c in made]
        assert (snap.size, snap.identity) == (SIZE, same)
    assert all(c.closed for c in made)


UUID = "0123456789abcdef" * 2


@pytest.mark.parametrize("text, found", [
    (json.dumps({"snapengine": "snapshot", "minor": 4, "uuid": UUID, "seq_id": 2}),
     SnapshotId(UUID, 2)),
    (None, None),
    ("", None),
    ("snapengine snapshot: minor 4, uuid " + UUID + ", seq_id 2", None),  # prose: not parsed
    ('{"snapengine"', None),
    ('["snapengine", "snapshot"]', None),
    ('{"export": "elastio-snap4"}', None),
], ids=["ours", "absent", "empty", "prose", "truncated", "list", "other-json"])
def test_description_parsing(text, found):
    assert source.described_identity(text, "uri") == found


@pytest.mark.parametrize("doc, code", [
    ({"snapengine": "origin", "path": "/srv/disk0.img"}, errno.EINVAL),
    ({"snapengine": "snapshot", "minor": 4, "failed": "index checksum"}, errno.EIO),
    ({"snapengine": "snapshot", "minor": 4, "uuid": UUID[:-1], "seq_id": 2}, errno.EINVAL),
    ({"snapengine": "snapshot", "minor": 4, "uuid": UUID, "seq_id": "2"}, errno.EINVAL),
    ({"snapengine": "snapshot", "minor": 4, "uuid": UUID, "seq_id": True}, errno.EINVAL),
    ({"snapengine": "snapshot", "minor": 4, "uuid": UUID}, errno.EINVAL),
    ({"snapengine": "dump"}, errno.EINVAL),
], ids=["origin", "failed", "short-uuid", "string-seq", "bool-seq", "no-seq", "other-kind"])
def test_description_refusals(doc, code):
    with pytest.raises(SnapError) as e:
        source.described_identity(json.dumps(doc), "uri")
    assert e.value.errno == code and "uri" in str(e.value)


# -- where the snapshot reads as zeros (block status) --------------------------------------

KiB = 1 << 10
TRIMMED = (MiB, 256 * KiB)  # data in snapshot 1, trimmed after it: a hole in snapshot 2
ZEROED = (2 * MiB, 128 * KiB)  # data in snapshot 1, rewritten, then write-zeroes (punch)
ZEROED_KEEP = (5 * MiB, 64 * KiB)  # data in snapshot 1, write-zeroes without punching
#   (ZERO_RANGE: a hole or data to SEEK_DATA, as the file system has it: not checked)
INTO_HOLE = (10 * MiB, 64 * KiB)  # a hole in snapshot 1, data in snapshot 2
OVER_DATA = (4 * MiB + 4 * KiB, 8 * KiB)  # data in both, changed
PUNCHED = (TRIMMED, ZEROED)  # holes in the origin: the snapshot's block status says zero


@pytest.fixture(scope="module")
def holes(tmp_path_factory):
    """Minor 0 on a thin origin (8 MiB of data, then holes): a full image of snapshot 1
    (``image1``, from ``update-img --full``), then in incremental mode a trim, a rewrite
    then write-zeroes, a write-zeroes that keeps the space, a write into a hole and one
    over data; snapshot 2 is live, cow1 holds the changes."""
    base = tmp_path_factory.mktemp("update-img-holes")
    disk = sparse_file(str(base / "disk.img"), SIZE)
    with daemon(str(base / "run"), [(disk, "disk")]) as d:
        h = nbd.NBD()
        h.connect_uri(d.uri("disk"))
        try:
            h.pwrite(os.urandom(8 * MiB), 0)
            h.flush()
            d.elioctl("setup-snapshot", "disk", str(base / "cow1"), "0")
            r = update_img(d, "--full", "0", base / "image1")
            assert r.returncode == 0, r.stderr
            d.elioctl("transition-to-incremental", "0")
            h.trim(TRIMMED[1], TRIMMED[0])
            h.pwrite(os.urandom(ZEROED[1]), ZEROED[0])
            h.zero(ZEROED[1], ZEROED[0])  # without NO_HOLE: the server may punch
            h.zero(ZEROED_KEEP[1], ZEROED_KEEP[0], nbd.CMD_FLAG_NO_HOLE)
            h.pwrite(os.urandom(INTO_HOLE[1]), INTO_HOLE[0])
            h.pwrite(os.urandom(OVER_DATA[1]), OVER_DATA[0])
            h.flush()
            d.elioctl("transition-to-snapshot", str(base / "cow2"), "0")
        finally:
            h.shutdown()
        d.base = base
        yield d


@pytest.fixture
def image1(holes, tmp_path):
    """A fresh copy of the full image of snapshot 1 (its stamp xattr too)."""
    return shutil.copy2(holes.base / "image1", tmp_path / "image")


def data_ranges(path) -> list[tuple[int, int]]:
    """(offset, end) of the file's data, by SEEK_DATA / SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    out, pos = [], 0
    try:
        size = os.fstat(fd).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    finally:
        os.close(fd)
    return out


def overlaps(ranges, offset: int, length: int) -> bool:
    return any(start < offset + length and offset < end for start, end in ranges)


def test_changed_blocks_that_read_as_zeros_are_zeroed_in_the_image(holes, image1):
    """The trimmed and zeroed blocks held data in the old image: afterwards the image
    reads as the snapshot (byte for byte) and is a hole where the snapshot's block status
    said hole (punched, not written); the blocks of data are data."""
    old = image1.read_bytes()
    for offset, length in PUNCHED + (ZEROED_KEEP,):
        assert old[offset:offset + length].count(0) != length  # the zeroing shows
    r = update_img(holes, "0", holes.base / "cow1", image1)
    assert r.returncode == 0, r.stderr
    changed = CowFile.open(str(holes.base / "cow1"), writable=False).header.nr_changed_blocks
    assert r.stdout == f"copying complete: {changed} blocks changed, 0 errors\n"
    assert image1.read_bytes() == export_bytes(holes, "elastio-snap0")
    allocated = data_ranges(image1)
    for offset, length in PUNCHED:
        assert not overlaps(allocated, offset, length), (offset, allocated)
    for offset, length in (INTO_HOLE, OVER_DATA):
        assert overlaps(allocated, offset, length), (offset, allocated)


def snapshot_zeros(d) -> list[tuple[int, int]]:
    """(offset, length) of the extents elastio-snap0's block status says read as zeros."""
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(d.uri("elastio-snap0"))
    out = []

    def extent(metacontext, offset, entries, err):
        for length, flags in zip(entries[0::2], entries[1::2]):
            if flags & nbd.STATE_ZERO:
                out.append((offset, length))
            offset += length
        return 0
    try:
        h.block_status(SIZE, 0, extent)
    finally:
        h.shutdown()
    return out


def test_the_zero_extents_are_not_read(holes, image1, monkeypatch, capsys):
    """In process, every read of every connection recorded: none touches a range the
    snapshot's block status says reads as zeros; the changed data is read."""
    zeros = snapshot_zeros(holes)
    as_ranges = [(offset, offset + length) for offset, length in zeros]
    for offset, length in PUNCHED:
        assert any(s <= offset and offset + length <= e for s, e in as_ranges), zeros
    reads: list[tuple[int, int]] = []
    real = source.nbd_connection

    def recording(uri, run_dir, minor):
        conn = real(uri, run_dir, minor)
        read = conn.read
        conn.read = lambda length, offset: reads.append((offset, offset + length)) or \
            read(length, offset)
        return conn
    monkeypatch.setattr(source, "nbd_connection", recording)
    args = ["--run-dir", holes.run_dir, "0", holes.base / "cow1", image1]
    assert updateimg.main(list(map(str, args))) == 0, capsys.readouterr().err
    assert image1.read_bytes() == export_bytes(holes, "elastio-snap0")
    for offset, length in zeros:
        assert not overlaps(reads, offset, length), (offset, reads)
    for offset, length in (INTO_HOLE, OVER_DATA):
        assert overlaps(reads, offset, length), (offset, reads)
    # --full: the holes of the snapshot are neither read nor written
    reads.clear()
    full = image1.parent / "full"
    assert updateimg.main(["--run-dir", holes.run_dir, "--full", "0", str(full)]) == 0
    assert full.read_bytes() == export_bytes(holes, "elastio-snap0")
    assert sum(end - start for start, end in reads) < 9 * MiB  # 8 MiB of data, + INTO_HOLE
    for offset, length in zeros:
        assert not overlaps(reads, offset, length), (offset, reads)
    assert not overlaps(data_ranges(full), 12 * MiB, 4 * MiB)


class FakeStatus:
    """Block status answers from a list of (offset, length, zero), at most ``most`` per
    request; ``fail``: every request fails (EIO)."""

    def __init__(self, extents, most: int = 1000, fail: bool = False) -> None:
        self.extents, self.most, self.fail, self.asked = extents, most, fail, []

    def zeros(self, length: int, offset: int):
        """As a server answers: from ``offset`` (the first extent cut there)."""
        self.asked.append((offset, length))
        if self.fail:
            raise SnapError(errno.EIO, "the snapshot has failed")
        out = [e for e in self.extents if e[0] + e[1] > offset][:self.most]
        if out and out[0][0] < offset:
            start, n, zero = out[0]
            out[0] = (offset, start + n - offset, zero)
        return out


B = 4096


@pytest.mark.parametrize("extents, most, wanted", [
    ([(0, 8 * B, False), (8 * B, 8 * B, True)], 1000,
     [(0, 8 * B, False), (8 * B, 8 * B, True)]),
    # a zero extent not on block boundaries: the blocks it covers in part are data
    ([(0, 3 * B + 100, False), (3 * B + 100, 9 * B - 100, True), (12 * B, 4 * B, False)], 1,
     [(0, 4 * B, False), (4 * B, 8 * B, True), (12 * B, 4 * B, False)]),
    # answers one extent at a time: asked again from where each stopped
    ([(i * B, B, bool(i % 2)) for i in range(16)], 1,
     [(i * B, B, bool(i % 2)) for i in range(16)]),
], ids=["aligned", "unaligned", "short-answers"])
def test_zero_map_splits_at_block_boundaries(extents, most, wanted):
    zeros = zeromap.ZeroMap(FakeStatus(extents, most), 16 * B)
    assert list(zeros.split(0, 16 * B)) == wanted


def test_zero_map_asks_ahead_once_and_falls_back_to_data():
    status = FakeStatus([(0, 64 * B, False), (64 * B, 64 * B, True)])
    zeros = zeromap.ZeroMap(status, 128 * B)
    pieces = [p for offset in (0, 10 * B, 70 * B, 100 * B) for p in zeros.split(offset, B)]
    assert pieces == [(0, B, False), (10 * B, B, False), (70 * B, B, True), (100 * B, B, True)]
    assert status.asked == [(0, 128 * B)]  # one request answered all four
    failing = FakeStatus([], fail=True)
    zeros = zeromap.ZeroMap(failing, 128 * B)
    assert list(zeros.split(0, 128 * B)) == [(0, 128 * B, False)]
    assert list(zeros.split(0, B)) == [(0, B, False)] and len(failing.asked) == 1
    assert list(zeromap.ZeroMap(None, 8 * B).split(0, 8 * B)) == [(0, 8 * B, False)]
    # the end of the snapshot, unaligned: a zero extent up to it is zeros to the end
    zeros = zeromap.ZeroMap(FakeStatus([(0, 2 * B + 10, True)]), 2 * B + 10)
    assert list(zeros.split(0, 2 * B + 10)) == [(0, 2 * B + 10, True)]
    # pieces() cuts data at CHUNK, zeros at ZERO_PIECE, and counts each block once
    big = copier.CHUNK * 3
    zeros = zeromap.ZeroMap(FakeStatus([(0, big, False), (big, big, True)]), 2 * big)
    work = list(copier.pieces(iter([(0, 2 * big)]), zeros))
    assert work == [(0, copier.CHUNK, False), (copier.CHUNK, copier.CHUNK, False),
                    (2 * copier.CHUNK, copier.CHUNK, False), (big, big, True)]
