"""update-img against the real daemon: every way of naming the snapshot, and every refusal
(exit EINVAL, image untouched)."""

from __future__ import annotations

import errno
import os
import shutil

import nbd
import pytest

from snapengine.cowfile import FLAG_CLEAN, CowFile
from support import daemon, digest, export_bytes, run, sparse_file, update_img

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
