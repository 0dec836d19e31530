"""An image knows what it holds (INTERFACE.md §8): --full and --stamp stamp it with the
chain's uuid and the snapshot's seq_id, update-img re-stamps it, and refuses (EINVAL,
image and stamp untouched) an image stamped for another chain or another snapshot."""

from __future__ import annotations

import errno
import json
import os

import nbd
import pytest

from snapengine import source, updateimg
from snapengine.stamp import SnapshotId, clear_stamp, read_stamp, write_stamp
from tests.harness import daemon, digest, export_bytes, run, sparse_file, update_img

pytestmark = pytest.mark.e2e

MiB = 1 << 20
SIZE = 16 * MiB
STAMP = "user.snapengine.stamp"


def stamp_of(path) -> dict | None:
    try:
        return json.loads(os.getxattr(path, STAMP))
    except OSError as e:
        assert e.errno == errno.ENODATA
        return None


def write(d, *offsets: int) -> None:
    h = nbd.NBD()
    h.connect_uri(d.uri("disk0"))
    for offset in offsets:
        h.pwrite(os.urandom(8192), offset)
    h.flush()
    h.shutdown()


def next_snapshot(d, cow) -> None:
    """Incremental, some writes, then the next snapshot point in ``cow``."""
    d.elioctl("transition-to-incremental", "0")
    write(d, 0, 5 * MiB + 4096, SIZE - 8192)
    d.elioctl("transition-to-snapshot", str(cow), "0")


@pytest.fixture
def d(tmp_path):
    disk = sparse_file(str(tmp_path / "disk0.img"), SIZE)
    with daemon(str(tmp_path / "run"), [(disk, "disk0")]) as dm:
        write(dm, 0, MiB, 9 * MiB)  # data here and there, holes elsewhere
        dm.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow1"), "0")
        yield dm


def test_full_then_update_brings_image_and_stamp_to_snapshot_2(d, tmp_path):
    image = tmp_path / "image"
    r = update_img(d, "--full", "0", image)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"copying complete: {SIZE // 4096} blocks copied, 0 errors\n"
    assert r.stderr == ""
    uuid = d.info(0)["uuid"]
    assert stamp_of(image) == {"uuid": uuid, "seq_id": 1}
    assert image.read_bytes() == export_bytes(d, "elastio-snap0")
    assert os.stat(image).st_blocks * 512 <= 6 * 64 * 1024  # holes stayed holes

    next_snapshot(d, tmp_path / "cow2")
    r = update_img(d, "0", tmp_path / "cow1", image)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert image.read_bytes() == export_bytes(d, "elastio-snap0")
    assert stamp_of(image) == {"uuid": uuid, "seq_id": 2}


def test_image_of_another_chain_is_refused_untouched(d, tmp_path):
    """The finding: after destroy + setup-snapshot, the old chain's image was 'updated'
    with the new chain's COW file, exit 0, 0 errors, and garbage."""
    image = tmp_path / "stale.img"
    assert update_img(d, "--full", "0", image).returncode == 0
    old = stamp_of(image)
    d.elioctl("destroy", "0")
    write(d, 2 * MiB, 3 * MiB)  # untracked: chain A's image misses these
    d.elioctl("setup-snapshot", "disk0", str(tmp_path / "b1"), "0")
    assert d.info(0)["uuid"] != old["uuid"]
    next_snapshot(d, tmp_path / "b2")
    before = digest(image)
    r = update_img(d, "0", tmp_path / "b1", image)
    assert r.returncode == errno.EINVAL, (r.stdout, r.stderr)
    assert "another backup chain" in r.stderr and r.stderr.count("\n") == 1
    assert "copying complete" not in r.stdout
    assert digest(image) == before and stamp_of(image) == old


def test_stamp_with_another_seq_id_is_refused(d, tmp_path):
    """The image holds snapshot 1; cow2 (seq 2) brings snapshot 2 to snapshot 3, so
    applying it would skip cow1's changes."""
    image = tmp_path / "image"
    assert update_img(d, "--full", "0", image).returncode == 0
    next_snapshot(d, tmp_path / "cow2")
    next_snapshot(d, tmp_path / "cow3")
    before, stamp = digest(image), stamp_of(image)
    r = update_img(d, "0", tmp_path / "cow2", image)
    assert r.returncode == errno.EINVAL, (r.stdout, r.stderr)
    assert "holds snapshot 1" in r.stderr and r.stderr.count("\n") == 1
    assert "copying complete" not in r.stdout
    assert digest(image) == before and stamp_of(image) == stamp


def test_unstamped_image_is_taken_with_one_warning_and_stamped(d, tmp_path):
    image = tmp_path / "image"
    run(["nbdcopy", d.uri("elastio-snap0"), str(image)])
    assert stamp_of(image) is None
    next_snapshot(d, tmp_path / "cow2")
    r = update_img(d, "0", tmp_path / "cow1", image)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("\n") == 1 and "warning" in r.stderr and "--stamp" in r.stderr
    assert image.read_bytes() == export_bytes(d, "elastio-snap0")
    assert stamp_of(image) == {"uuid": d.info(0)["uuid"], "seq_id": 2}


def test_stamp_an_nbdcopy_image_then_update(d, tmp_path):
    image = tmp_path / "image"
    run(["nbdcopy", d.uri("elastio-snap0"), str(image)])
    r = update_img(d, "--stamp", "0", image)
    assert r.returncode == 0, r.stderr
    assert stamp_of(image) == {"uuid": d.info(0)["uuid"], "seq_id": 1}
    next_snapshot(d, tmp_path / "cow2")
    r = update_img(d, "0", tmp_path / "cow1", image)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert image.read_bytes() == export_bytes(d, "elastio-snap0")
    assert stamp_of(image)["seq_id"] == 2


def test_wrong_number_of_arguments(d, tmp_path):
    for args in (["--full", "0"], ["--stamp", "0", "a", "b"], ["0", tmp_path / "cow1"]):
        r = update_img(d, *args)
        assert r.returncode == errno.EINVAL and "wrong number of arguments" in r.stderr


def test_full_overwrites_an_existing_image_of_the_right_size_only(d, tmp_path):
    image = tmp_path / "image"
    image.write_bytes(os.urandom(SIZE - 4096))
    r = update_img(d, "--full", "0", image)
    assert r.returncode == errno.EINVAL and "sizes differ" in r.stderr
    assert stamp_of(image) is None
    image.write_bytes(os.urandom(SIZE))
    assert update_img(d, "--full", "0", image).returncode == 0
    assert image.read_bytes() == export_bytes(d, "elastio-snap0")
    assert os.stat(image).st_blocks * 512 <= 6 * 64 * 1024


def test_sidecar_where_xattrs_are_not_supported(tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
    for name in ("getxattr", "setxattr", "removexattr"):
        monkeypatch.setattr(os, name, refuse)
    image = tmp_path / "image"
    image.write_bytes(b"x" * 4096)
    assert read_stamp(str(image)) is None
    fd = os.open(image, os.O_RDONLY)
    try:
        write_stamp(str(image), fd, SnapshotId("ab" * 16, 7))
        sidecar = tmp_path / "image.snapengine-stamp"
        assert json.loads(sidecar.read_text()) == {"uuid": "ab" * 16, "seq_id": 7}
        assert read_stamp(str(image)) == SnapshotId("ab" * 16, 7)
        assert sorted(os.listdir(tmp_path)) == ["image", "image.snapengine-stamp"]
        clear_stamp(str(image), fd)
        assert read_stamp(str(image)) is None
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", ["update", "full"])
def test_a_snapshot_changed_between_connections_is_refused_untouched(d, tmp_path, monkeypatch,
                                                                     capsys, mode):
    """The race: update-img's first connection reads snapshot 2; before its second one
    opens, transition-to-incremental + transition-to-snapshot make snapshot 3. The second
    connection's description says seq_id 3: EAGAIN before anything is written (--full:
    the image is not even created), and every connection is closed."""
    image = tmp_path / "image"
    assert update_img(d, "--full", "0", image).returncode == 0
    next_snapshot(d, tmp_path / "cow2")
    before, old_stamp = digest(image), stamp_of(image)
    real, opened, closed = source.nbd_connection, [], []

    def racing(uri, run_dir, minor):
        if len(opened) == 1:  # between the first connection and the next
            next_snapshot(d, tmp_path / "cow3")
        conn = real(uri, run_dir, minor)
        opened.append(conn.identity)
        close = conn.close
        conn.close = lambda: (closed.append(conn.identity), close())
        return conn
    monkeypatch.setattr(source, "nbd_connection", racing)
    target = image if mode == "update" else tmp_path / "new.img"
    args = ["0", tmp_path / "cow1", image] if mode == "update" else ["--full", "0", target]
    capsys.readouterr()
    assert updateimg.main(["--run-dir", d.run_dir, *map(str, args)]) == errno.EAGAIN
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1, out
    assert out.err.startswith("update-img: Resource temporarily unavailable: the snapshot "
                              "changed while update-img was opening it"), out.err
    assert "seq_id 2" in out.err and "seq_id 3" in out.err and "run it again" in out.err
    assert [i.seq_id for i in opened] == [2, 3] and closed == opened[::-1]
    assert digest(image) == before and stamp_of(image) == old_stamp
    assert not (tmp_path / "new.img").exists()
    if mode == "full":  # run again: the copy is of the snapshot now served
        monkeypatch.undo()
        assert update_img(d, *args).returncode == 0
        assert target.read_bytes() == export_bytes(d, "elastio-snap0")
        assert stamp_of(target)["seq_id"] == 3
