"""reload-snapshot / reload-incremental after the registry is gone, and restarts that find
a bad COW file: unverified until the origin's first client, then active or failed with
the reason; the origin is served either way; destroy always works (and leaves a file
that failed its checks in place)."""

from __future__ import annotations

import errno
import os
import shutil

import nbd
import pytest

from snapengine.cowfile import FLAG_CLEAN, INDEX_OFFSET, CowFile
from tests import harness
from tests.harness import Daemon, daemon, sparse_file

pytestmark = pytest.mark.e2e

MiB = 1 << 20
SIZE = 8 * MiB


def connect(d: Daemon, name: str = "disk0") -> nbd.NBD:
    return harness.connect(d.uri(name))


@pytest.fixture(scope="module")
def closed(tmp_path_factory):
    """A COW file of each mode, closed cleanly, with the origin they belong to and the
    snapshot's image: {"snapshot": path, "incremental": path, "origin": path, ...}."""
    base = tmp_path_factory.mktemp("reload")
    origin = sparse_file(str(base / "disk.img"), SIZE)
    with daemon(str(base / "run"), [(origin, "disk0")]) as d:
        h = connect(d)
        h.pwrite(os.urandom(SIZE), 0)
        h.flush()
        d.elioctl("setup-snapshot", "disk0", str(base / "incr"), "0")
        h.pwrite(os.urandom(3 * 4096), 4096)
        d.elioctl("transition-to-incremental", "0")
        h.pwrite(os.urandom(4096), 6 * MiB)
        image = connect(d).pread(SIZE, 0)
        d.elioctl("transition-to-snapshot", str(base / "snap"), "0")
        h.pwrite(os.urandom(8192), 0)  # saved into snap
        h.shutdown()
    # the daemon stopped cleanly: both files are closed; keep copies to start from
    return {"base": base, "origin": origin, "image": image,
            "snapshot": str(base / "snap"), "incremental": str(base / "incr")}


def fresh(closed, tmp_path, mode: str) -> tuple[str, str]:
    """Copies of the origin and of the ``mode`` COW file in tmp_path."""
    origin = str(tmp_path / "disk.img")
    shutil.copy(closed["origin"], origin)
    cow = str(tmp_path / "cow")
    shutil.copy(closed[mode], cow)
    return origin, cow


@pytest.mark.parametrize("mode", ["snapshot", "incremental"])
def test_reload_is_unverified_until_the_first_client(closed, tmp_path, mode):
    origin, cow = fresh(closed, tmp_path, mode)
    with daemon(str(tmp_path / "run"), [(origin, "disk0")]) as d:
        d.elioctl(f"reload-{mode}", "disk0", cow, "7")
        info = d.info(7)
        assert info["state"] == (5 if mode == "snapshot" else 4) and "error" not in info
        h = connect(d)
        info = d.info(7)
        assert info["state"] == (3 if mode == "snapshot" else 2), info
        assert "error" not in info and info["seq_id"] == (2 if mode == "snapshot" else 1)
        if mode == "snapshot":
            assert connect(d, "elastio-snap7").pread(SIZE, 0) == closed["image"]
        h.pwrite(b"x" * 4096, 5 * MiB)
        h.shutdown()
        assert d.info(7)["state"] == (1 if mode == "snapshot" else 0)
        d.elioctl("destroy", "7")


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def first_entry_offset(cow: str) -> int:
    """Offset of the first changed block's index entry."""
    with CowFile.open(cow, writable=False) as c:
        for offset, length in c.index_extents():
            raw = c.io.pread(length, offset)
            for i in range(0, len(raw), 16):
                if raw[i:i + 16] != bytes(16):
                    return offset + i
    raise AssertionError("no entry")


def spoil(case: str, cow: str, origin: str) -> None:
    if case == "missing":
        os.unlink(cow)
    elif case == "bad-magic":
        flip(cow, 0)
    elif case == "header-byte":
        flip(cow, 60)
    elif case == "index-slot-byte":
        flip(cow, first_entry_offset(cow) + 1)
    elif case == "other-origin-size":
        os.truncate(origin, SIZE + 4096)
    elif case == "unclean":
        with CowFile.open(cow) as c:
            c.write_header(flags=c.header.flags & ~FLAG_CLEAN)
    elif case == "count-mismatch":
        with open(cow, "r+b") as f:
            f.seek(first_entry_offset(cow))
            f.write(bytes(16))  # an entry lost: the index no longer agrees with the header


CASES = ["missing", "bad-magic", "header-byte", "index-slot-byte", "other-origin-size",
         "unclean", "count-mismatch", "wrong-mode"]


@pytest.mark.parametrize("case", CASES)
def test_reload_of_a_bad_cow_file_fails_with_a_reason(closed, tmp_path, case):
    origin, cow = fresh(closed, tmp_path, "snapshot")
    spoil(case, cow, origin)
    command = "reload-incremental" if case == "wrong-mode" else "reload-snapshot"
    with daemon(str(tmp_path / "run"), [(origin, "disk0")]) as d:
        d.elioctl(command, "disk0", cow, "3")
        unverified = 4 if case == "wrong-mode" else 5
        assert d.info(3)["state"] == unverified
        h = connect(d)  # the device comes online: verification fails
        info = d.info(3)
        assert info["state"] == unverified and info["error"] < 0, info
        assert "minor 3" in d.log() and "origin is served untracked" in d.log()
        h.pwrite(b"still served" + bytes(500), 0)  # the origin works as usual
        assert h.pread(512, 0).startswith(b"still served")
        if unverified == 5:  # a failed snapshot opens; every read is EIO
            s = connect(d, "elastio-snap3")
            with pytest.raises(nbd.Error) as e:
                s.pread(4096, 0)
            assert e.value.errnum == errno.EIO
            s.shutdown()
        else:  # incremental mode: no snapshot export at all
            with pytest.raises(nbd.Error):
                connect(d, "elastio-snap3")
        h.shutdown()
        r = d.elioctl("destroy", "3")
        assert d.info()["devices"] == []
        if case != "missing":  # it failed its checks: never unlinked
            assert os.path.exists(cow) and "left in place" in r.stderr


def test_flipped_checksum_in_the_index_fails_the_read_not_silently(closed, tmp_path):
    origin, cow = fresh(closed, tmp_path, "snapshot")
    entry = first_entry_offset(cow)
    flip(cow, entry + 8)  # the block checksum: the entry still looks valid
    with daemon(str(tmp_path / "run"), [(origin, "disk0")]) as d:
        d.elioctl("reload-snapshot", "disk0", cow, "3")
        h = connect(d)
        snap = connect(d, "elastio-snap3")
        block = (entry - INDEX_OFFSET) // 16
        with pytest.raises(nbd.Error) as e:
            snap.pread(4096, block * 4096)
        assert e.value.errnum == errno.EIO
        assert d.info(3)["error"] == -errno.EIO
        h.shutdown()
        d.elioctl("destroy", "3")


def test_restart_finds_a_cow_file_of_another_chain(closed, tmp_path):
    """The registry says which uuid the file must have: a swapped file is refused."""
    origin, cow = fresh(closed, tmp_path, "snapshot")
    run = str(tmp_path / "run")
    with daemon(run, [(origin, "disk0")]) as d:
        d.elioctl("reload-snapshot", "disk0", cow, "1")
        connect(d).shutdown()  # verified: the registry now records its uuid
    with CowFile.open(cow) as c:  # same file, another chain
        c.write_header(uuid=os.urandom(16))
    with daemon(run, [(origin, "disk0")]) as d:
        info = d.info(1)
        assert info["error"] == -errno.EINVAL and "uuid" in d.log()
        d.elioctl("destroy", "1")
