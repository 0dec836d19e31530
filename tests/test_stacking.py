"""snapengine.stacking: is a COW directory on a file system carried by our own origins?

The unit tests build a fake /sys, /proc and /dev in tmp_path and stand in for os.stat
on the few paths whose device numbers the fake stack needs; the e2e test walks the
real stack (ext4 on a loop device on nbdfuse on the daemon).
"""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pytest

from snapengine import stacking
from snapengine.stacking import carrying_origin
from tests.harness import attached, daemon, mounted, run, sparse_file

MiB = 1 << 20
COW_FS = os.makedev(259, 1)     # the file system holding the COW dir ...
FUSE_FS = os.makedev(0, 77)     # ... and an anonymous device: the nbdfuse mount


class Fake:
    """A fake sysfs / procfs / devfs under a directory, and fake stat results."""

    def __init__(self, root, monkeypatch) -> None:
        self.sys, self.proc, self.dev = root / "sys", root / "proc", root / "dev"
        for d in (self.sys / "dev" / "block", self.sys / "devices" / "virtual" / "block",
                  self.proc / "self", self.dev):  # /dev without nodes: stat, not ioctl
            d.mkdir(parents=True, exist_ok=True)
        self.mounts: list[str] = []
        self.stats: dict[str, SimpleNamespace] = {}
        self.mount("254:0", "/", "ext4", "/dev/vda")
        real = stacking._stat
        monkeypatch.setattr(stacking, "_stat",
                            lambda p: self.stats.get(os.path.normpath(str(p))) or real(p))

    def fake_stat(self, path, dev: int, ino: int = 2, mode: int = stat.S_IFREG | 0o644,
                  rdev: int = 0) -> None:
        self.stats[os.path.normpath(str(path))] = SimpleNamespace(
            st_dev=dev, st_ino=ino, st_mode=mode, st_rdev=rdev)

    def disk(self, name: str, majmin: str, parent=None):
        """A block device's sysfs dir (a partition of ``parent``'s dir if given)."""
        d = (parent / name) if parent else (self.sys / "devices" / "virtual" / "block" / name)
        d.mkdir(parents=True)
        (d / "dev").write_text(majmin + "\n")
        if parent:
            (d / "partition").write_text("1\n")
        os.symlink(os.path.relpath(d, self.sys / "dev" / "block"),
                   self.sys / "dev" / "block" / majmin)
        return d

    def loop(self, name: str, majmin: str, backing: str):
        d = self.disk(name, majmin)
        (d / "loop").mkdir()
        (d / "loop" / "backing_file").write_text(backing + "\n")
        return d

    def slave(self, holder, slave) -> None:
        (holder / "slaves").mkdir(exist_ok=True)
        os.symlink(os.path.relpath(slave, holder / "slaves"), holder / "slaves" / slave.name)

    def mount(self, majmin: str, mountpoint: str, fstype: str, source: str = "none") -> None:
        n = len(self.mounts) + 100
        self.mounts.append(f"{n} 1 {majmin} / {mountpoint.replace(' ', chr(92) + '040')} "
                           f"rw,relatime - {fstype} {source} rw")
        (self.proc / "self" / "mountinfo").write_text("\n".join(self.mounts) + "\n")

    def process(self, pid: int, *argv: str, cwd: str | None = None) -> None:
        d = self.proc / str(pid)
        d.mkdir()
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        if cwd:
            os.symlink(cwd, d / "cwd")

    def check(self, cow_dir, origins, exports, sock):
        return carrying_origin(str(cow_dir), [str(o) for o in origins], exports, str(sock),
                               sys_root=str(self.sys), proc_root=str(self.proc),
                               dev_root=str(self.dev))


def mm(dev: int) -> str:
    return f"{os.major(dev)}:{os.minor(dev)}"


@pytest.fixture
def w(tmp_path, monkeypatch):
    """Real paths for the origin image, the daemon's socket, the COW dir and the
    nbdfuse file; fake device numbers for the COW dir and the nbdfuse file."""
    fake = Fake(tmp_path / "fake", monkeypatch)
    ns = SimpleNamespace(
        fake=fake, origin=sparse_file(str(tmp_path / "disk.img"), MiB),
        sock=tmp_path / "run" / "nbd.sock", cow=tmp_path / "srv" / "data",
        mnt=tmp_path / "mnt" / "x")
    ns.sock.parent.mkdir()
    ns.sock.write_text("")  # stands for the socket: compared by path
    ns.cow.mkdir(parents=True)
    ns.mnt.mkdir(parents=True)
    ns.disk = str(ns.mnt / "disk")
    fake.fake_stat(ns.cow, COW_FS, ino=11, mode=stat.S_IFDIR | 0o755)
    fake.fake_stat(ns.disk, FUSE_FS, ino=1)
    fake.mount(mm(COW_FS), str(tmp_path / "srv"), "ext4", "/dev/loop3p1")
    fake.mount(mm(FUSE_FS), str(ns.mnt), "fuse.nbdfuse", "nbdfuse")
    return ns


def partition_on_loop_on_nbdfuse(w):
    loop3 = w.fake.loop("loop3", "7:3", w.disk)
    w.fake.disk("loop3p1", mm(COW_FS), parent=loop3)


def test_partition_on_loop_on_nbdfuse_with_our_socket_is_a_hit(w):
    partition_on_loop_on_nbdfuse(w)
    w.fake.process(4242, "/usr/bin/nbdfuse", w.disk, f"nbd+unix:///disk0?socket={w.sock}")
    hit = w.fake.check(w.cow, [w.origin], ["disk0"], w.sock)
    assert hit == f"origin disk0 through /dev/loop3p1 → /dev/loop3 → {w.disk} (nbdfuse)"


def test_nbdfuse_with_relative_paths_and_unix_option(w):
    """``nbdfuse x --unix nbd.sock`` run from the right cwds: export "" is ours if named."""
    partition_on_loop_on_nbdfuse(w)
    w.fake.process(4242, "nbdfuse", "-r", "x", "--unix", "../run/nbd.sock",
                   cwd=str(w.mnt.parent))
    assert w.fake.check(w.cow, [w.origin], ["disk0"], w.sock) is None  # "" not ours
    assert w.fake.check(w.cow, [w.origin], ["disk0", ""], w.sock) is not None


def test_nbdfuse_on_another_socket_is_a_miss(w, tmp_path):
    partition_on_loop_on_nbdfuse(w)
    other = tmp_path / "other.sock"
    other.write_text("")
    w.fake.process(4242, "nbdfuse", w.disk, f"nbd+unix:///disk0?socket={other}")
    w.fake.process(4243, "nbdfuse", str(tmp_path / "elsewhere"),
                   f"nbd+unix:///disk0?socket={w.sock}")  # ours, but another mount
    assert w.fake.check(w.cow, [w.origin], ["disk0"], w.sock) is None


def test_nbdfuse_on_our_socket_with_another_export_is_a_miss(w):
    partition_on_loop_on_nbdfuse(w)
    w.fake.process(4242, "nbdfuse", w.disk, f"nbd+unix:///disk9?socket={w.sock}")
    assert w.fake.check(w.cow, [w.origin], ["disk0"], w.sock) is None


def test_nbdfuse_over_tcp_is_not_seen(w):
    """The documented blind spot: a TCP URI (the --tcp relay) cannot be told ours."""
    partition_on_loop_on_nbdfuse(w)
    w.fake.process(4242, "nbdfuse", w.disk, "nbd://localhost:10809/disk0")
    assert w.fake.check(w.cow, [w.origin], ["disk0"], w.sock) is None


def test_lvm_dm_slaves_to_loop_on_nbdfuse_is_a_hit(w):
    dm = w.fake.disk("dm-0", mm(COW_FS))
    w.fake.slave(dm, w.fake.disk("vda", "254:0"))  # a plain disk first: a miss branch
    w.fake.slave(dm, w.fake.loop("loop5", "7:5", w.disk))
    w.fake.process(99, "nbdfuse", str(w.mnt), f"nbd+unix:///disk0?socket={w.sock}")
    hit = w.fake.check(w.cow, [w.origin], ["disk0"], w.sock)
    assert hit == f"origin disk0 through /dev/dm-0 → /dev/loop5 → {w.disk} (nbdfuse)"


def test_md_on_partitions_of_a_loop_on_the_origin_image_is_a_hit(w):
    md = w.fake.disk("md0", mm(COW_FS))
    loop1 = w.fake.loop("loop1", "7:1", w.origin)
    w.fake.slave(md, w.fake.disk("loop1p1", "259:7", parent=loop1))
    hit = w.fake.check(w.cow, [w.origin], ["disk0"], w.sock)
    assert hit == (f"origin image {w.origin} through /dev/md0 → /dev/loop1p1 → /dev/loop1 "
                   f"(a loop device on the origin image)")


def test_loop_on_the_origin_image_by_inode_after_a_rename(w, tmp_path):
    os.link(w.origin, tmp_path / "renamed.img")
    w.fake.loop("loop2", mm(COW_FS), str(tmp_path / "renamed.img"))
    assert "origin image" in w.fake.check(w.cow, [w.origin], ["disk0"], w.sock)


def test_image_file_inside_a_carried_fs_loop_mounted_again_is_a_hit(w, tmp_path):
    """COW fs on loop7 whose image lives on an ext4 that sits on loop3 over nbdfuse."""
    inner = tmp_path / "carried" / "fs.img"
    inner.parent.mkdir()
    inner.write_text("")
    carried = os.makedev(7, 3)
    w.fake.fake_stat(inner, carried, ino=12)
    w.fake.mount(mm(carried), str(inner.parent), "ext4", "/dev/loop3")
    w.fake.loop("loop7", mm(COW_FS), str(inner))
    w.fake.loop("loop3", "7:3", w.disk)
    w.fake.process(4242, "nbdfuse", w.disk, f"nbd+unix:///disk0?socket={w.sock}")
    hit = w.fake.check(w.cow, [w.origin], ["disk0"], w.sock)
    assert hit == (f"origin disk0 through /dev/loop7 → {inner} → /dev/loop3 → {w.disk} "
                   f"(nbdfuse)")


def test_nbd_device_with_our_nbd_client_is_a_hit(w):
    nbd0 = w.fake.disk("nbd0", mm(COW_FS))
    (nbd0 / "pid").write_text("777\n")
    w.fake.process(777, "nbd-client", "-unix", str(w.sock), "-N", "disk0", "/dev/nbd0")
    hit = w.fake.check(w.cow, [w.origin], ["disk0"], w.sock)
    assert hit == "origin disk0 through /dev/nbd0 (nbd-client pid 777)"


def test_nbd_device_partition_with_other_client_is_a_miss(w, tmp_path):
    nbd0 = w.fake.disk("nbd0", "43:0")
    w.fake.disk("nbd0p1", mm(COW_FS), parent=nbd0)
    (nbd0 / "pid").write_text("777\n")
    w.fake.process(777, "nbd-client", "-unix", str(tmp_path / "x.sock"), "-N", "disk0",
                   "/dev/nbd0")
    assert w.fake.check(w.cow, [w.origin], ["disk0"], w.sock) is None
    # a stale pid (no such process): not ours, no exception
    (nbd0 / "pid").write_text("778\n")
    assert w.fake.check(w.cow, [w.origin], ["disk0"], w.sock) is None


def test_fs_straight_on_an_origin_block_device_is_a_hit(w, tmp_path):
    dev = tmp_path / "sdb"
    dev.write_text("")
    w.fake.fake_stat(dev, os.makedev(0, 6), ino=99, mode=stat.S_IFBLK | 0o660, rdev=COW_FS)
    w.fake.disk("sdb", mm(COW_FS))
    assert "the origin device itself" in w.fake.check(w.cow, [dev], ["disk0"], w.sock)


def test_plain_disk_is_a_miss(w):
    vda = w.fake.disk("vda", "254:0")
    w.fake.disk("vda1", mm(COW_FS), parent=vda)
    w.fake.process(4242, "nbdfuse", w.disk, f"nbd+unix:///disk0?socket={w.sock}")
    assert w.fake.check(w.cow, [w.origin], ["disk0"], w.sock) is None


def test_cycles_and_garbage_never_raise(w):
    a = w.fake.disk("dm-1", mm(COW_FS))
    b = w.fake.disk("dm-2", "252:2")
    w.fake.slave(a, b)
    w.fake.slave(b, a)  # a cycle
    (w.fake.proc / "self" / "mountinfo").write_text("garbage\n\0\n1 2 3\n")
    assert w.fake.check(w.cow, [w.origin], ["disk0"], w.sock) is None
    assert carrying_origin("/no/such/dir", [], [], "/no/sock") is None


def test_the_real_machine_tmp_is_not_carried(tmp_path):
    assert carrying_origin(str(tmp_path), [str(tmp_path / "none.img")], ["disk0"],
                           str(tmp_path / "nbd.sock")) is None


@pytest.mark.e2e
def test_ext4_on_loop_on_nbdfuse_on_the_daemon_is_found(tmp_path):
    origin = sparse_file(str(tmp_path / "disk.img"), 64 * MiB)
    with daemon(str(tmp_path / "run"), [(origin, "disk0")]) as d:
        with attached(d.uri("disk0"), str(tmp_path / "fuse")) as dev:
            run(["mkfs.ext4", "-q", "-F", dev])
            with mounted(dev, str(tmp_path / "fs")) as fs:
                os.mkdir(os.path.join(fs, "cowdir"))
                for where in (fs, os.path.join(fs, "cowdir")):
                    hit = carrying_origin(where, [origin], ["disk0"], d.nbd_socket)
                    assert hit is not None and "disk0" in hit and "nbdfuse" in hit, hit
                    assert os.path.basename(dev) in hit
                # another export name, or another socket: not ours
                assert carrying_origin(fs, [origin], ["disk1"], d.nbd_socket) is None
                assert carrying_origin(fs, [], ["disk0"], str(tmp_path / "x.sock")) is None
                assert carrying_origin(str(tmp_path), [origin], ["disk0"],
                                       d.nbd_socket) is None
