"""Is a directory on a file system carried by one of our own origins?

A COW file must never live on a file system whose blocks travel through this daemon:
every COW write would then re-enter the daemon (through the kernel, ext4's journal,
the loop device and nbdfuse) while the daemon is itself waiting for that write:
deadlock, then data loss. ``carrying_origin`` finds such stacks by following the
device of the directory down through /sys and /proc. It only reads; it never raises.

What it sees (each hop is followed recursively, at most ``MAX_DEPTH`` deep, each
device once):

* a partition: its parent disk;
* device mapper (LVM, dm-crypt, ...), md RAID, bcache: every device in
  ``/sys/block/X/slaves``;
* a loop device whose backing file is an origin image (same path, or same st_dev and
  st_ino; the backing file's identity comes from LOOP_GET_STATUS64 when /dev/loopN
  can be opened, so a renamed or deleted path still matches), or whose backing file is
  an origin block device;
* a loop device whose backing file is a file on another file system: that file system
  is walked in turn. So an image file kept inside a file system that sits on an origin,
  loop-mounted again, is found;
* a loop device over a file in a FUSE mount served by an ``nbdfuse`` process (found in
  /proc/*/cmdline by its mount point) whose server is ``nbd+unix:///NAME?socket=S`` or
  ``--unix S`` (export ""), with S our NBD socket and NAME one of our export names;
* an NBD device (/dev/nbdN) whose ``/sys/block/nbdN/pid`` process is ``nbd-client
  -unix S -N NAME`` (or any client that has an ``nbd+unix://`` URI on its command
  line, e.g. ``qemu-nbd -c``), S and NAME as above;
* the origin block device itself (a file system mounted straight from an origin that
  is a block device);
* overlayfs: its upper directory; btrfs: every device of the file system.

What it cannot see (and so answers None for):

* NBD reached over TCP, e.g. ``nbdfuse ... nbd://host:10809/disk0`` through the
  daemon's ``--tcp`` relay, or vsock, ``--fd``, or a ``--command``/``[ ... ]``
  subprocess server (it cannot tell that the far end is this daemon);
* an nbd device whose client has exited (netlink set-up without a resident
  nbd-client) or whose client was configured from /etc/nbdtab without the socket and
  name on its command line;
* anything network-shaped: NFS/CIFS/sshfs/9p re-exports of a file system that sits on
  an origin, iSCSI/NVMe-oF targets backed by an origin;
* ZFS pools, ext4 external journals, XFS log/realtime devices, and other devices a
  file system uses that /sys does not list as slaves;
* processes in other mount or PID namespaces (containers) than the one reading /proc.

A branch it cannot read (permissions, a vanished process, a stale pid) counts as
"not ours" for that branch only.
"""

from __future__ import annotations

import array
import fcntl
import os
import stat
import struct
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["carrying_origin"]

MAX_DEPTH = 16
LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32s2Q")  # struct loop_info64, 232 bytes


def carrying_origin(cow_dir: str, origin_paths: list[str], export_names: list[str],
                    nbd_socket: str, *, sys_root: str = "/sys", proc_root: str = "/proc",
                    dev_root: str = "/dev") -> str | None:
    """A description of how the file system holding ``cow_dir`` sits on one of our
    origins (e.g. "origin disk0 through /dev/loop3 → /mnt/x/disk (nbdfuse)"), or None
    when it does not, as far as /sys and /proc tell."""
    try:
        return _Walker(origin_paths, export_names, nbd_socket, sys_root, proc_root,
                       dev_root).run(cow_dir)
    except Exception:  # noqa: BLE001 - a helper for a safety check must never raise
        return None


def _stat(path: str) -> os.stat_result:
    """os.stat, one place for the tests to stand in for."""
    return os.stat(path)


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20).decode("utf-8", "surrogateescape")
    except (OSError, ValueError):
        return None


def _unescape(s: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and len(s[i + 1:i + 4]) == 3 and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _canon(path: str) -> str:
    """realpath of the parent, plus the last component: never looks inside ``path``
    itself (which may be a FUSE mount or a file in one)."""
    path = os.path.normpath(path)
    head, tail = os.path.split(path)
    try:
        return os.path.join(os.path.realpath(head), tail) if tail else path
    except (OSError, ValueError):
        return path


def _same_file(a: str, b: str) -> bool:
    if os.path.normpath(a) == os.path.normpath(b) or _canon(a) == _canon(b):
        return True
    try:
        sa, sb = _stat(a), _stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _unix_target(uri: str) -> tuple[str, str] | None:
    """(socket, export name) of an nbd+unix:// or nbds+unix:// URI, else None."""
    try:
        u = urlsplit(uri)
    except ValueError:
        return None
    if u.scheme.lower() not in ("nbd+unix", "nbds+unix"):
        return None
    sockets = parse_qs(u.query).get("socket")
    if not sockets:
        return None
    return sockets[0], unquote(u.path[1:] if u.path.startswith("/") else u.path)


class _Walker:
    def __init__(self, origin_paths, export_names, nbd_socket, sys_root, proc_root,
                 dev_root) -> None:
        self.sys, self.proc, self.dev = sys_root, proc_root, dev_root
        self.exports = set(export_names)
        self.nbd_socket = nbd_socket
        self.origin_files: list[tuple[str, tuple[int, int] | None]] = []
        self.origin_rdevs: dict[int, str] = {}
        for p in origin_paths:
            try:
                st = _stat(p)
            except (OSError, ValueError):
                self.origin_files.append((p, None))
                continue
            if stat.S_ISBLK(st.st_mode):
                self.origin_rdevs[st.st_rdev] = p
            else:
                self.origin_files.append((p, (st.st_dev, st.st_ino)))
        self.visited: set = set()
        self._mountinfo: list[dict] | None = None
        self._procs: list[tuple[str, list[str]]] | None = None

    # -- entry ---------------------------------------------------------------------

    def run(self, cow_dir: str) -> str | None:
        try:
            st = _stat(cow_dir)
        except (OSError, ValueError):
            return None
        try:
            path = os.path.realpath(cow_dir)
        except (OSError, ValueError):
            path = cow_dir
        return self.fs_dev(st.st_dev, path, [], 0)

    # -- a file system, by the st_dev of a file on it ---------------------------------

    def fs_dev(self, dev: int, path: str | None, chain: list[str], depth: int) -> str | None:
        if depth > MAX_DEPTH or ("fs", dev) in self.visited:
            return None
        self.visited.add(("fs", dev))
        mounts = self.mounts_of(dev, path)
        for m in mounts:
            fstype = m["fstype"]
            if fstype == "fuse" or (fstype.startswith("fuse.") and fstype != "fuseblk"):
                hit = self.fuse(m, path, chain, depth)
                if hit:
                    return hit
            elif fstype == "overlay":
                hit = self.overlay(m, chain, depth)
                if hit:
                    return hit
            elif fstype == "btrfs":
                hit = self.btrfs(m, chain, depth)
                if hit:
                    return hit
        if os.major(dev) != 0:
            return self.block(f"{os.major(dev)}:{os.minor(dev)}", chain, depth + 1)
        return None

    def mounts_of(self, dev: int, path: str | None) -> list[dict]:
        mi = self.mountinfo()
        key = f"{os.major(dev)}:{os.minor(dev)}"
        found = [m for m in mi if m["dev"] == key]
        if found or not path:
            return found
        # not listed by st_dev (e.g. a btrfs subvolume that is not mounted by itself):
        # the mount with the longest mount point above the path
        best = None
        for m in mi:
            mp = m["mountpoint"]
            if path == mp or path.startswith(mp.rstrip("/") + "/"):
                if best is None or len(mp) >= len(best["mountpoint"]):
                    best = m
        return [best] if best else []

    def mountinfo(self) -> list[dict]:
        if self._mountinfo is None:
            self._mountinfo = []
            for line in (_read(os.path.join(self.proc, "self", "mountinfo")) or "").splitlines():
                fields = line.split()
                try:
                    sep = fields.index("-")
                    self._mountinfo.append({
                        "dev": fields[2], "mountpoint": _unescape(fields[4]),
                        "fstype": fields[sep + 1], "source": _unescape(fields[sep + 2]),
                        "super": fields[sep + 3] if len(fields) > sep + 3 else ""})
                except (ValueError, IndexError):
                    continue
        return self._mountinfo

    def overlay(self, m: dict, chain: list[str], depth: int) -> str | None:
        for opt in m["super"].split(","):
            if opt.startswith("upperdir="):
                upper = _unescape(opt[len("upperdir="):])
                try:
                    st = _stat(upper)
                except (OSError, ValueError):
                    return None
                return self.fs_dev(st.st_dev, upper, chain + [f"{m['mountpoint']} (overlay)"],
                                   depth + 1)
        return None

    def btrfs(self, m: dict, chain: list[str], depth: int) -> str | None:
        try:
            src = _stat(m["source"]).st_rdev
        except (OSError, ValueError):
            src = None
        devs = []
        root = os.path.join(self.sys, "fs", "btrfs")
        try:
            fsids = os.listdir(root)
        except OSError:
            fsids = []
        for fsid in fsids:
            ddir = os.path.join(root, fsid, "devices")
            try:
                names = os.listdir(ddir)
            except OSError:
                continue
            here = [(_read(os.path.join(ddir, n, "dev")) or "").strip() for n in names]
            if src is not None and f"{os.major(src)}:{os.minor(src)}" in here:
                devs = [d for d in here if d]
                break
        if not devs and src is not None:
            devs = [f"{os.major(src)}:{os.minor(src)}"]
        for d in devs:
            hit = self.block(d, chain, depth + 1)
            if hit:
                return hit
        return None

    # -- a block device, by "MAJ:MIN" ----------------------------------------------------

    def block(self, majmin: str, chain: list[str], depth: int) -> str | None:
        if depth > MAX_DEPTH or ("blk", majmin) in self.visited:
            return None
        self.visited.add(("blk", majmin))
        try:
            sysdir = os.path.realpath(os.path.join(self.sys, "dev", "block", majmin))
        except (OSError, ValueError):
            return None
        if not os.path.isdir(sysdir):
            return None
        name = os.path.basename(sysdir)
        chain = chain + [f"/dev/{name}"]
        try:
            maj, mino = (int(x) for x in majmin.split(":"))
            origin = self.origin_rdevs.get(os.makedev(maj, mino))
        except ValueError:
            origin = None
        if origin:
            return f"origin {origin} through {' → '.join(chain)} (the origin device itself)"
        if os.path.exists(os.path.join(sysdir, "partition")):
            parent = (_read(os.path.join(os.path.dirname(sysdir), "dev")) or "").strip()
            return self.block(parent, chain, depth + 1) if parent else None
        slaves = os.path.join(sysdir, "slaves")
        try:
            names = sorted(os.listdir(slaves))
        except OSError:
            names = []
        for s in names:
            d = (_read(os.path.join(slaves, s, "dev")) or "").strip()
            hit = self.block(d, chain, depth + 1) if d else None
            if hit:
                return hit
        if os.path.isdir(os.path.join(sysdir, "loop")):
            return self.loop(name, sysdir, chain, depth)
        if name.startswith("nbd") and os.path.exists(os.path.join(sysdir, "pid")):
            return self.nbd(sysdir, chain)
        return None

    def loop(self, name: str, sysdir: str, chain: list[str], depth: int) -> str | None:
        backing = (_read(os.path.join(sysdir, "loop", "backing_file")) or "").rstrip("\n")
        if not backing:
            return None
        deleted = backing.endswith(" (deleted)")
        path = backing[:-len(" (deleted)")] if deleted else backing
        ident = self.loop_status(name)  # (dev, ino, rdev) of the backing file
        if ident is None and not deleted:
            try:
                st = _stat(path)
                ident = (st.st_dev, st.st_ino, st.st_rdev if stat.S_ISBLK(st.st_mode) else 0)
            except (OSError, ValueError):
                ident = None
        for opath, oid in self.origin_files:
            if (oid is not None and ident is not None and oid == ident[:2]) or \
                    (not deleted and _same_file(path, opath)):
                return (f"origin image {opath} through {' → '.join(chain)} "
                        f"(a loop device on the origin image)")
        if ident is None:
            return None
        dev, _ino, rdev = ident
        if rdev:  # a loop over a block device
            return self.block(f"{os.major(rdev)}:{os.minor(rdev)}", chain, depth + 1)
        return self.fs_dev(dev, None if deleted else path, chain + [path], depth + 1)

    def loop_status(self, name: str) -> tuple[int, int, int] | None:
        try:
            fd = os.open(os.path.join(self.dev, name), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            buf = array.array("B", bytes(_LOOP_INFO64.size))
            fcntl.ioctl(fd, LOOP_GET_STATUS64, buf, True)
            info = _LOOP_INFO64.unpack(buf.tobytes())
            return info[0], info[1], info[2]
        except OSError:
            return None
        finally:
            os.close(fd)

    # -- the NBD ends: nbdfuse and nbd-client -----------------------------------------

    def fuse(self, m: dict, path: str | None, chain: list[str], depth: int) -> str | None:
        mp = m["mountpoint"]
        for pid, argv in self.processes():
            if not argv or "nbdfuse" not in os.path.basename(argv[0]):
                continue
            try:
                cwd = os.readlink(os.path.join(self.proc, pid, "cwd"))
            except OSError:
                cwd = "/"
            if not any(self.names_mount(os.path.join(cwd, a), mp) for a in argv[1:]):
                continue
            what = self.ours(argv, cwd)
            if what is not None:
                hops = chain[:-1] if path and chain and chain[-1] == path else chain
                return f"origin {what} through {' → '.join(hops + [path or mp])} (nbdfuse)"
        return None

    @staticmethod
    def names_mount(arg: str, mp: str) -> bool:
        """nbdfuse MOUNTPOINT, MOUNTPOINT/FILENAME, or a naked MOUNTPOINT file."""
        a = os.path.normpath(arg)
        if a == mp or os.path.dirname(a) == mp:
            return True
        return _canon(os.path.dirname(a)) == mp or _canon(a) == mp

    def nbd(self, sysdir: str, chain: list[str]) -> str | None:
        pid = (_read(os.path.join(sysdir, "pid")) or "").strip()
        if not pid.isdecimal():
            return None
        argv = self.cmdline(pid)
        if not argv:
            return None
        try:
            cwd = os.readlink(os.path.join(self.proc, pid, "cwd"))
        except OSError:
            cwd = "/"
        what = self.ours(argv, cwd)
        if what is not None:
            return f"origin {what} through {' → '.join(chain)} " \
                   f"({os.path.basename(argv[0])} pid {pid})"
        return None

    def ours(self, argv: list[str], cwd: str) -> str | None:
        """The export name if this client's command line points at our socket and
        one of our exports."""
        targets: list[tuple[str, str]] = []
        sock = name = None
        i = 1
        while i < len(argv):
            a = argv[i]
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if a in ("-unix", "--unix", "-u") and nxt is not None:
                sock = nxt
                i += 1
            elif a.startswith("--unix="):
                sock = a[len("--unix="):]
            elif a in ("-N", "-name", "--name") and nxt is not None:
                name = nxt
                i += 1
            elif a.startswith("--name="):
                name = a[len("--name="):]
            elif a.startswith("-N") and len(a) > 2 and not a.startswith("--"):
                name = a[2:]
            else:
                t = _unix_target(a)
                if t:
                    targets.append(t)
            i += 1
        if sock is not None:
            targets.append((sock, name or ""))
        for s, n in targets:
            if n in self.exports and _same_file(os.path.join(cwd, s), self.nbd_socket):
                return n or '"" (the default export)'
        return None

    def cmdline(self, pid: str) -> list[str]:
        raw = _read(os.path.join(self.proc, pid, "cmdline")) or ""
        return [a for a in raw.split("\0") if a] if raw else []

    def processes(self) -> list[tuple[str, list[str]]]:
        if self._procs is None:
            self._procs = []
            try:
                pids = [p for p in os.listdir(self.proc) if p.isdecimal()]
            except OSError:
                pids = []
            for pid in sorted(pids, key=int):
                argv = self.cmdline(pid)
                if argv:
                    self._procs.append((pid, argv))
        return self._procs
