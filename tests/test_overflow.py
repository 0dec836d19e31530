"""A COW store that never breaks the backup chain (INTERFACE §8), through the real daemon.

* ext4 on the origin (nbdfuse + loop): a snapshot with a small ``-f``, ``expand-cow-file``,
  more changes than the old limit: the snapshot still reads as it was taken;
* auto-expand in steps with a reserve, the COW file on a small tmpfs: the reserve stops
  the growth, the snapshot fails cleanly (EFBIG, ``tracking`` true), the saved data is
  given back to the tmpfs, and the file system on the origin is whole;
* the chain through an overflow: full backup of snapshot 1, snapshot 2 overflows,
  transition-to-incremental, snapshot 3, ``update-img snap3 cow1 cow2 image`` gives
  snapshot 3 exactly, and ``e2fsck -fn`` finds the image clean;
* a kept list through a clean restart (exact) and a kill -9 (a superset);
* in process: a failure that loses the list (EIO on the index) forbids the transition.

In-place rewrites of files consume COW data (their old blocks are saved); new files on a
sparse origin do not (holes are saved as zeros), so the tests rewrite.
"""

from __future__ import annotations

import errno
import os
import random

import nbd
import pytest

from snapengine import changes
from snapengine.engine import Engine
from tests.harness import (
    MKFS_EXT4,
    attached,
    daemon,
    digest,
    export_digest,
    frozen,
    mounted,
    run,
    shutdown_quietly,
    sparse_file,
    tmpfs,
)
from tests.harness.faults import FaultPlan

MiB = 1 << 20
BLOCK = 4096
ORIGIN = 128 * MiB


# ---- helpers ----------------------------------------------------------------------------

def write_files(top: str, names: list[str], size: int, rng: random.Random) -> None:
    for name in names:
        with open(os.path.join(top, name), "wb") as f:
            f.write(rng.randbytes(size))
    os.sync()


def rewrite(top: str, names: list[str], rng: random.Random) -> dict[str, str]:
    """Overwrite each file in place (its old blocks must be saved); return their digests."""
    out = {}
    for name in names:
        path = os.path.join(top, name)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.write(rng.randbytes(size))
            f.flush()
            os.fsync(f.fileno())
        out[name] = digest(path)
    return out


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def store(tmp_path):
    """A 40 MiB tmpfs for COW files."""
    with tmpfs(str(tmp_path / "store"), "40m") as path:
        yield path


@pytest.fixture
def ext4(tmp_path):
    """A daemon on a 128 MiB sparse origin holding a fresh ext4, attached and mounted at
    ``fs``; yields (daemon, mountpoint). Everything is detached afterwards."""
    disk = sparse_file(str(tmp_path / "disk0.img"), ORIGIN)
    with daemon(str(tmp_path / "run"), [(disk, "disk0")]) as d:
        with attached(d.uri("disk0"), str(tmp_path / "mnt")) as dev:
            run(MKFS_EXT4 + [dev])
            with mounted(dev, str(tmp_path / "fs")) as fs:
                d.dev = dev
                yield d, fs


def take(d, fs: str, *args: str) -> None:
    """An elioctl snapshot command at a clean point of the file system."""
    with frozen(fs):
        d.elioctl(*args)


# ---- expand-cow-file --------------------------------------------------------------------

@pytest.mark.e2e
def test_expand_keeps_a_snapshot_that_would_overflow(ext4, tmp_path):
    d, fs = ext4
    rng = random.Random(1)
    names = [f"f{i}" for i in range(6)]
    write_files(fs, names, 2 * MiB, rng)
    take(d, fs, "setup-snapshot", "-f", "4", "disk0", str(tmp_path / "cow1"), "0")
    want = export_digest(d.uri("elastio-snap0"))
    d.elioctl("expand-cow-file", "16", "0")  # before: 4 MiB, the rewrite needs ~12
    assert d.info(0)["fallocate"] == 20 * MiB
    rewrite(fs, names, rng)
    info = d.info(0)
    assert "error" not in info, info
    assert info["cow_size_current"] > 8 * MiB  # the saved data is there
    assert export_digest(d.uri("elastio-snap0")) == want
    assert "raised from 4194304 to 20971520 bytes" in d.log()


@pytest.mark.e2e
def test_expand_refusals(ext4, tmp_path):
    d, fs = ext4
    cow = str(tmp_path / "cow1")
    take(d, fs, "setup-snapshot", "-f", "4", "disk0", cow, "0")
    free = free_bytes(str(tmp_path)) // MiB
    r = d.elioctl("expand-cow-file", str(free + 1024), "0", check=False)
    assert r.returncode == errno.ENOSPC and "free" in r.stderr, r.stderr
    for bad in ("0", "-3", "x"):
        r = d.elioctl("expand-cow-file", bad, "0", check=False)
        assert r.returncode == errno.EINVAL, (bad, r.stderr)
    assert d.info(0)["fallocate"] == 4 * MiB  # nothing changed
    d.elioctl("transition-to-incremental", "0")
    r = d.elioctl("expand-cow-file", "8", "0", check=False)
    assert r.returncode == errno.EINVAL and "incremental" in r.stderr, r.stderr


# ---- auto-expand, stopped by the reserve ------------------------------------------------

@pytest.mark.e2e
def test_auto_expand_until_the_reserve_then_a_clean_overflow(ext4, store):
    d, fs = ext4
    rng = random.Random(2)
    names = [f"f{i}" for i in range(12)]
    write_files(fs, names, 2 * MiB, rng)
    cow = os.path.join(store, "cow1")
    take(d, fs, "setup-snapshot", "-f", "2", "disk0", cow, "0")
    d.elioctl("reconfigure-auto-expand", "-r", "16", "4", "0")  # +4 MB while 16 MB stay free
    assert d.info(0)["auto_expand"] == {"step_size_mib": 4, "reserved_space_mib": 16}
    empty = free_bytes(store)
    want = rewrite(fs, names, rng)  # 24 MiB of old data: more than the tmpfs allows
    info = d.info(0)
    assert info["error"] == -errno.EFBIG and info["tracking"] is True and info["state"] == 3
    assert "reserved" in info["error_text"], info
    limit = info["fallocate"]
    assert limit > 2 * MiB and (limit - 2 * MiB) % (4 * MiB) == 0, limit  # whole steps
    assert "auto-expand" in d.log() and "its change list is kept" in d.log()
    # the saved data went back to the file system; the list still counts every block
    assert info["cow_size_current"] < 2 * MiB and free_bytes(store) > empty - 2 * MiB
    assert info["nr_changed_blocks"] >= len(names) * 2 * MiB // BLOCK
    with pytest.raises(nbd.Error) as e:
        h = nbd.NBD()
        h.connect_uri(d.uri("elastio-snap0"))
        h.pread(BLOCK, 0)
    assert e.value.errnum == errno.EIO
    # the origin lost nothing: the file system is clean and holds what was written
    run(["umount", fs])
    run(["e2fsck", "-fn", d.dev])
    with mounted(d.dev, fs):
        assert {n: digest(os.path.join(fs, n)) for n in names} == want


# ---- the chain goes on through an overflow ----------------------------------------------

@pytest.mark.e2e
def test_the_chain_through_an_overflow(ext4, tmp_path):
    d, fs = ext4
    rng = random.Random(3)
    cow = [str(tmp_path / f"cow{i}") for i in range(4)]
    image = str(tmp_path / "image")
    names = [f"f{i}" for i in range(4)]
    write_files(fs, names, 2 * MiB, rng)
    take(d, fs, "setup-snapshot", "disk0", cow[1], "0")
    d.update_img("--full", "0", image)  # the full backup of snapshot 1
    d.elioctl("transition-to-incremental", "0")
    write_files(fs, ["g0", "g1"], MiB, rng)
    take(d, fs, "transition-to-snapshot", "-f", "1", cow[2], "0")
    rewrite(fs, names, rng)  # 8 MiB of old data into a 1 MiB store: snapshot 2 overflows
    info = d.info(0)
    assert info["error"] == -errno.EFBIG and info["tracking"] is True, info
    d.elioctl("transition-to-incremental", "0")
    assert "error" not in d.info(0) and d.info(0)["state"] == 2
    write_files(fs, ["h0"], MiB, rng)
    rewrite(fs, ["g1"], rng)
    take(d, fs, "transition-to-snapshot", cow[3], "0")
    r = d.update_img("0", cow[1], cow[2], image)
    assert "0 errors" in r.stdout, r.stdout
    assert digest(image) == export_digest(d.uri("elastio-snap0"))
    run(["e2fsck", "-fn", image])


# ---- a kept list through a restart and a kill -9 ----------------------------------------

def overflow(d, cow: str, rng: random.Random, size: int) -> nbd.NBD:
    """Data on disk0, a 1 MiB snapshot, 2 MiB rewritten: the snapshot overflows."""
    h = nbd.NBD()
    h.connect_uri(d.uri("disk0"))
    h.pwrite(rng.randbytes(size), 0)
    h.flush()
    d.elioctl("setup-snapshot", "-f", "1", "disk0", cow, "0")
    h.pwrite(rng.randbytes(2 * MiB), 0)
    h.flush()
    return h


@pytest.mark.e2e
def test_a_kept_list_survives_a_restart_and_a_kill9(tmp_path):
    size = 16 * MiB
    disk = sparse_file(str(tmp_path / "disk0.img"), size)
    rng = random.Random(4)
    cow1, cow2 = str(tmp_path / "cow1"), str(tmp_path / "cow2")
    d = daemon(str(tmp_path / "run"), [(disk, "disk0")])
    with d as d:
        h = overflow(d, cow1, rng, size)
        h.pwrite(rng.randbytes(BLOCK), 8 * MiB)  # after the overflow: counted too
        h.shutdown()
        before = d.info(0)
        assert before["error"] == -errno.EFBIG and before["tracking"] is True
        assert before["nr_changed_blocks"] == 2 * MiB // BLOCK + 1
        d.stop()
        d.start()
        after = d.info(0)
        assert after["state"] == 1 and after["error"] == -errno.EFBIG and after["tracking"]
        assert after["nr_changed_blocks"] == before["nr_changed_blocks"]
        assert "change list is kept" in d.log()
        h = nbd.NBD()
        h.connect_uri(d.uri("disk0"))
        h.pwrite(rng.randbytes(BLOCK), 12 * MiB)
        h.flush()
        d.kill9()  # dirty: the write intents make it a superset
        shutdown_quietly(h)
        d.start()
        info = d.info(0)
        assert info["error"] == -errno.EFBIG and info["tracking"] is True
        assert info["nr_changed_blocks"] >= before["nr_changed_blocks"] + 1
        d.elioctl("transition-to-incremental", "0")
        d.elioctl("transition-to-snapshot", cow2, "0")
        listed = changes.read_closed(cow1)
        blocks = {b for o, n in listed.byte_extents() for b in range(o // BLOCK, (o + n) // BLOCK)}
        written = set(range(2 * MiB // BLOCK)) | {8 * MiB // BLOCK, 12 * MiB // BLOCK}
        assert written <= blocks


# ---- a failure that loses the list ------------------------------------------------------

def test_a_lost_list_forbids_the_transition(tmp_path, caplog):
    origin = sparse_file(str(tmp_path / "disk.img"), 8 * MiB)
    with open(origin, "r+b") as f:
        f.write(os.urandom(4 * MiB))
    plan = FaultPlan(str(tmp_path / "cow1"), seed=1)
    with Engine(str(tmp_path / "run"), [(origin, "disk")], opener=plan.opener) as engine:
        h = engine.open_export("disk", False)
        engine.setup_snapshot("disk", str(tmp_path / "cow1"), 0, fallocate_mb=1)
        h.pwrite(os.urandom(2 * MiB), 0, False)  # overflow: the list is kept
        assert engine.info(0)["tracking"] is True
        plan.inject("pwrite", errno.EIO, times=None)  # then the index cannot be written:
        h.close()  # the last client leaves, the list's pages cannot be flushed
        info = engine.info(0)
        assert info["error"] == -errno.EFBIG and info["tracking"] is False, info
        assert "change list was lost" in info["error_text"]
        with pytest.raises(OSError) as e:
            engine.transition_to_incremental(0)
        assert e.value.errno == errno.EINVAL and "lost too" in str(e.value)
        assert "tracking failed" in caplog.text
