"""update-img: bring a backup image up to a new snapshot by copying only the blocks that
changed, as listed in the previous snapshot's (closed) COW file.

    update-img [--run-dir DIR] [--minor N] <snapshot> <cow file> <image file>
    update-img [--run-dir DIR] [--minor N] --full <snapshot> <image file>
    update-img [--run-dir DIR] [--minor N] --stamp <snapshot> <image file>

Everything is checked before the image is touched: the COW file is a clean, unfailed
snapengine COW file whose index matches its header; it belongs to the same backup chain
as the snapshot (uuid) and is the one just before it (seq_id = snapshot's - 1); the
image, the COW file's origin and the snapshot have the same size; the image's stamp (the
chain uuid and seq_id it holds) is the COW file's. Any mismatch: exit EINVAL, image
untouched. --full copies the whole snapshot (holes kept), --stamp marks an image made by
another tool as holding the snapshot; every success (re)stamps the image.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, NoReturn

from . import changes
from .cli import CTL_SOCKET, DEFAULT_RUN_DIR
from .control import request
from .errors import SnapError
from .fileio import atomic_write
from .minor import EXPORT_PREFIX
from .units import BLOCK_SIZE, MiB

CHUNK = 4 * MiB  # largest single read: extents are coalesced up to this, and split at it
HOLE_GRAIN = 64 * 1024  # --full leaves all-zero pieces of this size unwritten (holes)
WORKERS = 4  # reads in flight (one NBD connection each)
PROGRESS_EVERY = 0.2  # seconds between progress updates on a terminal
DESCRIPTION_RE = re.compile(r"uuid ([0-9a-f]{32}), seq_id (\d+)")
STAMP_XATTR = "user.snapengine.stamp"
STAMP_SIDECAR = ".snapengine-stamp"  # <image>.snapengine-stamp where xattrs are refused
NO_XATTR = (errno.ENOTSUP, errno.EPERM)  # EPERM: user.* is refused on device nodes


@dataclass
class Snapshot:
    """Where to read the new snapshot from, and who it says it is."""

    size: int
    uuid: str
    seq_id: int
    opener: Callable[[], Callable[[int, int], bytes]]  # per worker: (length, offset) -> data
    name: str


@dataclass(frozen=True)
class Stamp:
    """What an image holds: snapshot seq_id of the chain uuid."""

    uuid: str
    seq_id: int


USAGE = """
  update-img [--run-dir DIR] [--minor N] <snapshot> <cow file> <image file>
  update-img [--run-dir DIR] [--minor N] --full <snapshot> <image file>
  update-img [--run-dir DIR] [--minor N] --stamp <snapshot> <image file>"""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SnapError(errno.EINVAL, f"{message} (see 'update-img --help')")


def build_parser() -> Parser:
    p = Parser(prog="update-img", usage=USAGE, description=__doc__.split("\n\n")[0].strip(),
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""\
<snapshot> is a minor number (4), an export name (elastio-snap4), an NBD URI
(nbd+unix:///elastio-snap4?socket=/run/elastio-snap/nbd.sock, nbd://host/elastio-snap4),
or a local file or block device holding the snapshot (then give --minor, so its uuid and
seq_id can be asked of the daemon). Prints 'copying complete: N blocks changed, E errors'
(--full: 'N blocks copied') and exits 0 only if every block was copied and the image was
synced; then the image is stamped (xattr user.snapengine.stamp, or <image>.snapengine-stamp
where xattrs are not supported) with the chain's uuid and the snapshot's seq_id. An image
stamped otherwise than the COW file's uuid and seq_id is refused (EINVAL, untouched).""")
    p.add_argument("--run-dir", default=os.environ.get("ELIO_RUN_DIR", DEFAULT_RUN_DIR),
                   help="the daemon's run directory (default %(default)s)")
    p.add_argument("--minor", type=int, help="the snapshot's minor, when <snapshot> is a "
                   "local device or a URI that does not name elastio-snapN")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="copy the whole snapshot into "
                      "<image file> (created if missing) and stamp it")
    mode.add_argument("--stamp", action="store_true", help="stamp <image file>, made by "
                      "another tool (nbdcopy, dd), as holding <snapshot>")
    p.add_argument("snapshot", metavar="<snapshot>")
    p.add_argument("files", nargs="*", metavar="<cow file> <image file>",
                   help="<image file> alone with --full or --stamp")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    whole = args.full or args.stamp
    if len(args.files) != (1 if whole else 2):
        usage = (f"--{'full' if args.full else 'stamp'} <snapshot> <image file>" if whole
                 else "<snapshot> <cow file> <image file>")
        raise SnapError(errno.EINVAL, f"wrong number of arguments: expected {usage} "
                        "(see 'update-img --help')")
    args.cow_file, args.image = ([None] if whole else []) + args.files
    return args


# -- the snapshot --------------------------------------------------------------------

def nbd_reader(uri: str) -> Callable[[], Callable[[int, int], bytes]]:
    def open_one() -> Callable[[int, int], bytes]:
        import nbd
        h = nbd.NBD()
        h.connect_uri(uri)
        return lambda length, offset: h.pread(length, offset)
    return open_one


def file_reader(path: str) -> Callable[[], Callable[[int, int], bytes]]:
    def open_one() -> Callable[[int, int], bytes]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

        def read(length: int, offset: int) -> bytes:
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise OSError(errno.EIO, f"short read from {path} at {offset}")
            return data
        return read
    return open_one


def minor_identity(run_dir: str, minor: int) -> tuple[str, int]:
    info = request(os.path.join(run_dir, CTL_SOCKET), "info", minor=minor)
    if "uuid" not in info or info.get("state") not in (1, 3):
        raise SnapError(errno.EINVAL, f"minor {minor} is not a snapshot (state "
                        f"{info.get('state')})")
    return info["uuid"], info["seq_id"]


def open_snapshot(spec: str, run_dir: str, minor: int | None) -> Snapshot:
    """Resolve <snapshot> to a reader and the snapshot's identity."""
    nbd_sock = os.path.join(run_dir, "nbd.sock")
    if spec.isdecimal():
        spec = f"{EXPORT_PREFIX}{spec}"
    if re.fullmatch(rf"{EXPORT_PREFIX}\d+", spec):
        spec = f"nbd+unix:///{spec}?socket={nbd_sock}"
    if spec.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+vsock://")):
        return _nbd_snapshot(spec, run_dir, minor)
    if not os.path.exists(spec):
        raise SnapError(errno.ENOENT, f"snapshot {spec} does not exist")
    if minor is None:
        raise SnapError(errno.EINVAL, f"{spec} is a local device: give --minor N so its "
                        "uuid and seq_id can be checked")
    uuid, seq_id = minor_identity(run_dir, minor)
    fd = os.open(spec, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    return Snapshot(size, uuid, seq_id, file_reader(spec), spec)


def _nbd_snapshot(uri: str, run_dir: str, minor: int | None) -> Snapshot:
    import nbd
    h = nbd.NBD()
    h.set_full_info(True)
    try:
        h.connect_uri(uri)
        size = h.get_size()
        try:
            description = h.get_export_description()
        except nbd.Error:
            description = ""
        export = h.get_export_name()
    except nbd.Error as e:
        raise SnapError(e.errnum or errno.EIO, f"cannot open snapshot {uri}: {e.string}")
    finally:
        del h  # disconnects
    found = DESCRIPTION_RE.search(description or "")
    if found:
        uuid, seq_id = found.group(1), int(found.group(2))
    else:
        named = re.fullmatch(rf"{EXPORT_PREFIX}(\d+)", export or "")
        if minor is None:
            if named is None:
                raise SnapError(errno.EINVAL, f"{uri} does not say which snapshot it is: "
                                "give --minor")
            minor = int(named.group(1))
        uuid, seq_id = minor_identity(run_dir, minor)
    return Snapshot(size, uuid, seq_id, nbd_reader(uri), uri)


# -- checks ---------------------------------------------------------------------------

def check(changed: changes.ChangeList, snap: Snapshot, image_size: int) -> None:
    """The change list (proven whole by changes.read_closed) is the one just before the
    snapshot, and all sizes agree; EINVAL naming the first mismatch."""
    h, path = changed.header, changed.path
    if h.uuid.hex() != snap.uuid:
        raise SnapError(errno.EINVAL, f"{path} is of another backup chain: uuid "
                        f"{h.uuid.hex()}, the snapshot's is {snap.uuid}")
    if h.seq_id != snap.seq_id - 1:
        raise SnapError(errno.EINVAL, f"{path} has seq_id {h.seq_id}; the snapshot has "
                        f"seq_id {snap.seq_id}, so it needs the COW file with seq_id "
                        f"{snap.seq_id - 1}")
    if not h.origin_size == snap.size == image_size:
        raise SnapError(errno.EINVAL, f"sizes differ: image {image_size}, snapshot "
                        f"{snap.size}, COW file's origin {h.origin_size} bytes")


# -- the stamp ---------------------------------------------------------------------------

def _sidecar(image: str) -> str:
    return image + STAMP_SIDECAR


def read_stamp(image: str) -> Stamp | None:
    """The image's stamp, None if it has none; EINVAL if it cannot be understood."""
    try:
        raw = os.getxattr(image, STAMP_XATTR)
    except OSError as e:
        if e.errno not in (errno.ENODATA, *NO_XATTR):
            raise SnapError(e.errno or errno.EIO, f"cannot read the stamp of {image}: "
                            f"{e.strerror}")
        try:
            with open(_sidecar(image), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
    try:
        doc = json.loads(raw)
        return Stamp(str(doc["uuid"]), int(doc["seq_id"]))
    except (ValueError, TypeError, KeyError) as e:
        raise SnapError(errno.EINVAL, f"{image} has a damaged stamp ({e}): restamp it with "
                        "'update-img --stamp' if you know which snapshot it holds")


def write_stamp(image: str, fd: int, stamp: Stamp) -> None:
    """Stamp the image (fd open on it) durably: the xattr, else the sidecar file."""
    raw = json.dumps({"uuid": stamp.uuid, "seq_id": stamp.seq_id}).encode()
    try:
        os.setxattr(fd, STAMP_XATTR, raw)
        os.fsync(fd)
        return
    except OSError as e:
        if e.errno not in NO_XATTR:
            raise
    atomic_write(_sidecar(image), raw)


def clear_stamp(image: str, fd: int) -> None:
    """Forget what the image held (before it is overwritten)."""
    try:
        os.removexattr(fd, STAMP_XATTR)
    except OSError as e:
        if e.errno not in (errno.ENODATA, *NO_XATTR):
            raise SnapError(e.errno or errno.EIO, f"cannot clear the stamp of {image}: "
                            f"{e.strerror}")
    try:
        os.unlink(_sidecar(image))
    except FileNotFoundError:
        pass


def check_stamp(image: str, changed: changes.ChangeList) -> None:
    """The image holds the snapshot the COW file starts from; EINVAL if not. An unstamped
    image is taken on trust, with one warning line."""
    h = changed.header
    stamp = read_stamp(image)
    if stamp is None:
        print(f"update-img: warning: {image} has no stamp; taking it as snapshot {h.seq_id} "
              f"of chain {h.uuid.hex()} (stamp images with 'update-img --stamp')",
              file=sys.stderr)
    elif stamp.uuid != h.uuid.hex():
        raise SnapError(errno.EINVAL, f"{image} holds a snapshot of another backup chain: "
                        f"uuid {stamp.uuid}, {changed.path}'s is {h.uuid.hex()}")
    elif stamp.seq_id != h.seq_id:
        raise SnapError(errno.EINVAL, f"{image} holds snapshot {stamp.seq_id}, but "
                        f"{changed.path} (seq_id {h.seq_id}) updates snapshot {h.seq_id}")


# -- copying ---------------------------------------------------------------------------

def chunks(extents: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Changed byte extents, coalesced when adjacent and split at CHUNK."""
    for offset, length in extents:
        while length:
            n = min(length, CHUNK)
            yield offset, n
            offset += n
            length -= n


class Copier:
    """Copies chunks with WORKERS readers in flight; counts blocks copied and failed."""

    def __init__(self, snap: Snapshot, image_fd: int, total: int,
                 keep_holes: bool = False) -> None:
        self.snap = snap
        self.image_fd = image_fd
        self.total = total
        self.keep_holes = keep_holes  # all-zero pieces are not written (the image is sparse)
        self.done = 0
        self.failed = 0
        self.first_error = ""
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[int, int] | None] = queue.Queue(maxsize=WORKERS * 4)

    def run(self, work: Iterator[tuple[int, int]], progress: Callable[[int, int], None]) -> None:
        threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(WORKERS)]
        for t in threads:
            t.start()
        for item in work:
            self._queue.put(item)
            progress(self.done, self.total)
        for _ in threads:
            self._queue.put(None)
        for t in threads:
            while t.is_alive():
                t.join(PROGRESS_EVERY)
                progress(self.done, self.total)

    def _worker(self) -> None:
        try:
            read = self.snap.opener()
        except Exception as e:
            read = None
            self._note_error(f"cannot open {self.snap.name}: {e}")
        while (item := self._queue.get()) is not None:
            offset, length = item
            blocks = (length + BLOCK_SIZE - 1) // BLOCK_SIZE
            try:
                if read is None:
                    raise OSError(errno.EIO, "no connection to the snapshot")
                data = read(length, offset)
                self._write(data, offset)
                with self._lock:
                    self.done += blocks
            except Exception as e:
                with self._lock:
                    self.failed += blocks
                self._note_error(f"blocks at {offset} (+{length} bytes): {e}")

    def _write(self, data: bytes, offset: int) -> None:
        if not self.keep_holes:
            os.pwrite(self.image_fd, data, offset)
            return
        for i in range(0, len(data), HOLE_GRAIN):
            piece = data[i:i + HOLE_GRAIN]
            if piece.count(0) != len(piece):
                os.pwrite(self.image_fd, piece, offset + i)

    def _note_error(self, message: str) -> None:
        with self._lock:
            if not self.first_error:
                self.first_error = message


def progress_printer(stream) -> Callable[[int, int], None]:
    if not stream.isatty():
        return lambda done, total: None
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY or done == total:
            last[0] = now
            pct = 100.0 * done / total if total else 100.0
            stream.write(f"\rcopying: {done}/{total} blocks ({pct:5.1f}%)")
            stream.flush()
    return show


def open_image(path: str, flags: int = os.O_WRONLY, mode: int = 0o600) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC, mode)
    except OSError as e:
        raise SnapError(e.errno or errno.EIO, f"cannot open image {path}: {e.strerror}")


def image_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def copy_and_stamp(copier: Copier, work: Iterator[tuple[int, int]], image: str, fd: int,
                   stamp: Stamp, what: str) -> int:
    """Copy, fsync, print the result; stamp the image only if all of it is safe."""
    copier.run(work, progress_printer(sys.stderr))
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    try:
        os.fsync(fd)
    except OSError as e:
        copier.failed = copier.failed or copier.done
        copier.first_error = copier.first_error or f"fsync of {image}: {e}"
    print(f"copying complete: {copier.done} blocks {what}, {copier.failed} errors")
    if copier.failed:
        print(f"update-img: {copier.first_error}", file=sys.stderr)
        return errno.EIO
    try:
        write_stamp(image, fd, stamp)
    except OSError as e:
        raise SnapError(errno.EIO, f"{image} holds snapshot {stamp.seq_id} but could not be "
                        f"stamped ({e}): run 'update-img --stamp'")
    return 0


def update(args: argparse.Namespace) -> int:
    changed = changes.read_closed(args.cow_file)
    snap = open_snapshot(args.snapshot, args.run_dir, args.minor)
    fd = open_image(args.image)
    try:
        check(changed, snap, image_size(fd))
        check_stamp(args.image, changed)
        copier = Copier(snap, fd, changed.header.nr_changed_blocks)
        return copy_and_stamp(copier, chunks(changed.byte_extents()), args.image, fd,
                              Stamp(snap.uuid, snap.seq_id), "changed")
    finally:
        os.close(fd)


def open_full_image(path: str, size: int) -> int:
    """The image for --full, empty and sparse at the snapshot's size: created if missing;
    an existing one must have that size already."""
    try:
        fd = open_image(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except SnapError as e:
        if e.errno != errno.EEXIST:
            raise
        fd = open_image(path)
        try:
            if image_size(fd) != size:
                raise SnapError(errno.EINVAL, f"sizes differ: image {image_size(fd)}, "
                                f"snapshot {size} bytes")
            clear_stamp(path, fd)
        except BaseException:
            os.close(fd)
            raise
    try:
        if os.path.isfile(path):
            os.ftruncate(fd, 0)  # drop the old contents: what is not written is a hole
            os.ftruncate(fd, size)
    except OSError as e:
        os.close(fd)
        raise SnapError(e.errno or errno.EIO, f"cannot size image {path}: {e.strerror}")
    return fd


def run_full(args: argparse.Namespace) -> int:
    snap = open_snapshot(args.snapshot, args.run_dir, args.minor)
    fd = open_full_image(args.image, snap.size)
    try:
        # holes can be skipped only where the image reads as zeros already: a regular file
        copier = Copier(snap, fd, (snap.size + BLOCK_SIZE - 1) // BLOCK_SIZE,
                        keep_holes=os.path.isfile(args.image))
        return copy_and_stamp(copier, chunks(iter([(0, snap.size)])), args.image, fd,
                              Stamp(snap.uuid, snap.seq_id), "copied")
    finally:
        os.close(fd)


def run_stamp(args: argparse.Namespace) -> int:
    snap = open_snapshot(args.snapshot, args.run_dir, args.minor)
    fd = open_image(args.image, os.O_RDONLY)
    try:
        if image_size(fd) != snap.size:
            raise SnapError(errno.EINVAL, f"sizes differ: image {image_size(fd)}, snapshot "
                            f"{snap.size} bytes")
        os.fsync(fd)
        write_stamp(args.image, fd, Stamp(snap.uuid, snap.seq_id))
    except OSError as e:
        if isinstance(e, SnapError):
            raise
        raise SnapError(e.errno or errno.EIO, f"cannot stamp {args.image}: {e.strerror}")
    finally:
        os.close(fd)
    print(f"stamped {args.image}: uuid {snap.uuid}, seq_id {snap.seq_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
        return (run_full if args.full else run_stamp if args.stamp else update)(args)
    except SnapError as e:
        print(f"update-img: {e}", file=sys.stderr)
        return e.errno or errno.EIO
    except KeyboardInterrupt:
        return errno.EINTR


if __name__ == "__main__":
    sys.exit(main())
