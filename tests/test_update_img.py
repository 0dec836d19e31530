"""update-img against the real daemon: every way of naming the snapshot, and every refusal
(exit EINVAL, image untouched)."""

from __future__ import annotations

import errno
import json
import os
import shutil

import nbd
import pytest

from snapengine import source, updateimg
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
