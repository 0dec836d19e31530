"""update-img: bring a backup image up to a new snapshot by copying only the blocks that
changed, as listed in the (closed) COW files of the snapshots since the image's.

    update-img [--run-dir DIR] [--minor N] <snapshot> <cow file> [<cow file>...] <image file>
    update-img [--run-dir DIR] [--minor N] --full <snapshot> <image file>
    update-img [--run-dir DIR] [--minor N] --stamp <snapshot> <image file>

Everything is checked before the image is opened for writing: each COW file is a clean,
unfailed snapengine COW file whose index matches its header; together, oldest first, they
form an unbroken piece of one backup chain (same uuid, consecutive seq_ids, one origin
size) that ends just before the snapshot (the last seq_id = the snapshot's - 1, same
uuid); the image, the COW files' origin and the snapshot have the same size; the image's
stamp (the chain uuid and seq_id it holds) is the first COW file's. Any mismatch: exit
EINVAL naming the file, image untouched. The union of the files' changed blocks is copied,
each block once. Every connection to the snapshot reads the snapshot the first one found
(source.py), else EAGAIN, image untouched. --full copies the whole snapshot (holes kept),
--stamp marks an image made by another tool as holding the snapshot; every success
(re)stamps the image.

Where the snapshot reads as zeros (NBD block status, base:allocation, when the server
offers it), nothing is read: the image is punched there (zeros written where it cannot
be punched; a block device is zeroed), or, for --full into a new sparse file, left a
hole. A block only partly in such an extent is read. Without block status every block
is read, as before.
"""

from __future__ import annotations

import argparse
import errno
import os
import queue
import sys
import threading
import time
from typing import Callable, Iterator, NoReturn

from . import changes
from .cli import error_line
from .arguments import EXPORT_PREFIX
from .errors import SnapError
from .fileio import FileIO
from .rundir import DEFAULT_RUN_DIR, RUN_DIR_ENV, RunDir, default_run_dir
from .source import Reader, Snapshot, open_snapshot
from .stamp import STAMP_SIDECAR, STAMP_XATTR, SnapshotId, clear_stamp, read_stamp, write_stamp
from .units import BLOCK_SIZE, MiB
from .zeromap import Piece, ZeroMap, zero_map

CHUNK = 4 * MiB  # largest single read: extents are coalesced up to this, and split at it
HOLE_GRAIN = 64 * 1024  # --full leaves all-zero pieces of this size unwritten (holes)
WORKERS = 4  # reads in flight (one NBD connection each)
PROGRESS_EVERY = 0.2  # seconds between progress updates on a terminal
ZERO_PIECE = 1 << 30  # largest piece of zeros zeroed (and counted) at once


USAGE = """
  update-img [--run-dir DIR] [--minor N] <snapshot> <cow file> [<cow file>...] <image file>
  update-img [--run-dir DIR] [--minor N] --full <snapshot> <image file>
  update-img [--run-dir DIR] [--minor N] --stamp <snapshot> <image file>"""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SnapError(errno.EINVAL, f"{message} (see 'update-img --help')")


EPILOG = f"""\
<snapshot> is a minor number (4), an export name ({EXPORT_PREFIX}4), an NBD URI
({RunDir(DEFAULT_RUN_DIR).nbd_uri(f"{EXPORT_PREFIX}4")}, nbd://host/{EXPORT_PREFIX}4),
or a local file or block device holding the snapshot (then give --minor, so its uuid and
seq_id can be asked of the daemon). Every connection it reads through ({WORKERS}) is
checked, before anything is written, to serve the snapshot the first one found (the
export's description says which, else the daemon is asked); if a transition changed the
snapshot meanwhile, update-img exits EAGAIN, image untouched: run it again.

Several COW files are given oldest first: those of the snapshots from the image's up to
the one just before <snapshot> (an image of snapshot 1, <snapshot> at seq_id 4: the COW
files with seq_ids 1, 2 and 3). They must be one chain's, with consecutive seq_ids, each
closed clean and not failed; a gap, a repeat, the wrong order, another chain's file or a
dirty one is refused (EINVAL, the file named, image untouched). The blocks changed in any
of them are copied once.

Where the snapshot's NBD block status says a range reads as zeros, it is not read: the
image is punched (or zeroed) there, and --full leaves it a hole.

Prints 'copying complete: N blocks changed, E errors' (N: blocks changed in any of the
COW files; --full: 'N blocks copied') and exits 0 only if every block was copied and the
image was synced; then the image is stamped (xattr {STAMP_XATTR}, or
<image>{STAMP_SIDECAR} where xattrs are not supported) with the chain's uuid and the
snapshot's seq_id. An image stamped otherwise than the first COW file's uuid and seq_id
is refused (EINVAL, untouched)."""


def build_parser() -> Parser:
    p = Parser(prog="update-img", usage=USAGE, description=__doc__.split("\n\n")[0].strip(),
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--run-dir", default=default_run_dir(),
                   help=f"the daemon's run directory (env {RUN_DIR_ENV}, default %(default)s)")
    p.add_argument("--minor", type=int, help="the snapshot's minor, when <snapshot> is a "
                   f"local device or a URI that does not name {EXPORT_PREFIX}N")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="copy the whole snapshot into "
                      "<image file> (created if missing) and stamp it")
    mode.add_argument("--stamp", action="store_true", help="stamp <image file>, made by "
                      "another tool (nbdcopy, dd), as holding <snapshot>")
    p.add_argument("snapshot", metavar="<snapshot>")
    p.add_argument("files", nargs="*", metavar="<cow file> [<cow file>...] <image file>",
                   help="the COW files oldest first, then the image; <image file> alone "
                   "with --full or --stamp")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    whole = args.full or args.stamp
    if (len(args.files) != 1) if whole else (len(args.files) < 2):
        usage = (f"--{'full' if args.full else 'stamp'} <snapshot> <image file>" if whole
                 else "<snapshot> <cow file> [<cow file>...] <image file>")
        raise SnapError(errno.EINVAL, f"wrong number of arguments: expected {usage} "
                        "(see 'update-img --help')")
    args.cow_files, args.image = args.files[:-1], args.files[-1]
    return args


# -- checks ---------------------------------------------------------------------------

def read_chain(paths: list[str]) -> list[changes.ChangeList]:
    """Each COW file's change list (each proven whole by changes.read_closed), checked to
    follow the one before it; EINVAL naming the first file out of place."""
    chain = [changes.read_closed(path) for path in paths]
    for before, after in zip(chain, chain[1:]):
        check_link(before, after, chain[0])
    return chain


def check_link(before: changes.ChangeList, after: changes.ChangeList,
               first: changes.ChangeList) -> None:
    """``after`` is the COW file right after ``before`` in ``first``'s chain."""
    b, a, path = before.header, after.header, after.path
    if a.uuid != first.header.uuid:
        raise SnapError(errno.EINVAL, f"{path} is of another backup chain: uuid "
                        f"{a.uuid.hex()}, {first.path}'s is {first.header.uuid.hex()}")
    if a.seq_id == b.seq_id:
        raise SnapError(errno.EINVAL, f"{path} has seq_id {a.seq_id}, as {before.path} "
                        "before it has: a COW file is given twice")
    if a.seq_id < b.seq_id:
        raise SnapError(errno.EINVAL, f"{path} has seq_id {a.seq_id}, older than "
                        f"{before.path} before it (seq_id {b.seq_id}): give the COW files "
                        "oldest first")
    if a.seq_id != b.seq_id + 1:
        missing = (f"file with seq_id {b.seq_id + 1} is" if a.seq_id == b.seq_id + 2 else
                   f"files with seq_ids {b.seq_id + 1} to {a.seq_id - 1} are")
        raise SnapError(errno.EINVAL, f"{path} has seq_id {a.seq_id}, but {before.path} "
                        f"before it has {b.seq_id}: the COW {missing} missing between them")
    if a.origin_size != first.header.origin_size:
        raise SnapError(errno.EINVAL, f"sizes differ: {path}'s origin is {a.origin_size} "
                        f"bytes, {first.path}'s {first.header.origin_size}")


def check(chain: list[changes.ChangeList], snap: Snapshot, image_size: int) -> None:
    """The chain (checked by read_chain) ends just before the snapshot, and all sizes
    agree; EINVAL naming the first mismatch."""
    first, last, snap_id = chain[0], chain[-1], snap.identity
    h, path = last.header, last.path
    if h.uuid.hex() != snap_id.uuid:
        raise SnapError(errno.EINVAL, f"{path} is of another backup chain: uuid "
                        f"{h.uuid.hex()}, the snapshot's is {snap_id.uuid}")
    if h.seq_id != snap_id.seq_id - 1:
        raise SnapError(errno.EINVAL, f"{path} has seq_id {h.seq_id}; the snapshot has "
                        f"seq_id {snap_id.seq_id}, so the last COW file must be the one "
                        f"with seq_id {snap_id.seq_id - 1}")
    if not first.header.origin_size == snap.size == image_size:
        raise SnapError(errno.EINVAL, f"sizes differ: image {image_size}, snapshot "
                        f"{snap.size}, COW files' origin {first.header.origin_size} bytes")


# -- the stamp ---------------------------------------------------------------------------

def check_stamp(image: str, changed: changes.ChangeList) -> None:
    """The image holds the snapshot the (first) COW file starts from; EINVAL if not. An
    unstamped image is taken on trust, with one warning line."""
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


def pieces(extents: Iterator[tuple[int, int]], zeros: ZeroMap) -> Iterator[Piece]:
    """Changed byte extents as work: data in chunks of CHUNK, zeros of ZERO_PIECE."""
    for offset, length in extents:
        for start, n, zero in zeros.split(offset, length):
            for o, m in chunks(iter([(start, n)]), ZERO_PIECE if zero else CHUNK):
                yield o, m, zero


# -- copying ---------------------------------------------------------------------------

def chunks(extents: Iterator[tuple[int, int]], size: int = CHUNK) -> Iterator[tuple[int, int]]:
    """Changed byte extents, coalesced when adjacent and split at ``size``."""
    for offset, length in extents:
        while length:
            n = min(length, size)
            yield offset, n
            offset += n
            length -= n


class Copier:
    """Copies pieces with one thread per reader (one connection each, already checked to
    be the snapshot's): a piece of data is read and written, a piece of zeros is zeroed
    in the image, not read; counts blocks copied and failed."""

    def __init__(self, readers: list[Reader], image_fd: int, total: int,
                 keep_holes: bool = False, image_path: str = "the image") -> None:
        self.readers = readers
        self.image_fd = image_fd
        self.image = FileIO(image_fd, image_path)  # zeroes ranges (the caller closes the fd)
        self.total = total
        self.keep_holes = keep_holes  # all-zero pieces are not written (the image is sparse)
        self.done = 0
        self.failed = 0
        self.first_error = ""
        self._lock = threading.Lock()
        self._queue: queue.Queue[Piece | None] = queue.Queue(maxsize=len(readers) * 4)

    def run(self, work: Iterator[Piece], progress: Callable[[int, int], None]) -> None:
        threads = [threading.Thread(target=self._worker, args=(read,), daemon=True)
                   for read in self.readers]
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

    def _worker(self, read: Reader) -> None:
        while (item := self._queue.get()) is not None:
            offset, length, zero = item
            blocks = (length + BLOCK_SIZE - 1) // BLOCK_SIZE
            try:
                if zero:
                    self._zero(offset, length)
                else:
                    self._write(read(length, offset), offset)
                with self._lock:
                    self.done += blocks
            except Exception as e:
                with self._lock:
                    self.failed += blocks
                self._note_error(f"blocks at {offset} (+{length} bytes): {e}")

    def _zero(self, offset: int, length: int) -> None:
        """The snapshot reads as zeros here: so must the image. A new sparse image does."""
        if not self.keep_holes:
            self.image.zero(offset, length, may_trim=True)  # punch, or write zeros

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


def copy_and_stamp(copier: Copier, work: Iterator[Piece], image: str, fd: int,
                   stamp: SnapshotId, what: str) -> int:
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


def image_size_of(path: str) -> int:
    """The image's size, read through a read-only descriptor (nothing is written yet)."""
    fd = open_image(path, os.O_RDONLY)
    try:
        return image_size(fd)
    finally:
        os.close(fd)


def update(args: argparse.Namespace) -> int:
    """Check the chain, the snapshot, the image and its stamp, then copy the union of the
    chain's changed blocks once."""
    chain = read_chain(args.cow_files)
    extents = changes.union(changed.scan for changed in chain)
    origin_size = chain[0].header.origin_size
    with open_snapshot(args.snapshot, RunDir(args.run_dir), args.minor) as snap:
        check(chain, snap, image_size_of(args.image))
        check_stamp(args.image, chain[0])
        fd = open_image(args.image)  # every check passed: only now opened for writing
        try:
            copier = Copier(snap.readers(WORKERS), fd, changes.nr_extent_blocks(extents),
                            image_path=args.image)
            with zero_map(snap) as zeros:
                return copy_and_stamp(copier, pieces(changes.byte_extents(extents, origin_size),
                                                     zeros),
                                      args.image, fd, snap.identity, "changed")
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
    with open_snapshot(args.snapshot, RunDir(args.run_dir), args.minor) as snap:
        readers = snap.readers(WORKERS)  # all checked before the image is emptied
        fd = open_full_image(args.image, snap.size)
        try:
            # holes can be skipped only where the image reads as zeros already: a regular file
            copier = Copier(readers, fd, (snap.size + BLOCK_SIZE - 1) // BLOCK_SIZE,
                            keep_holes=os.path.isfile(args.image), image_path=args.image)
            with zero_map(snap) as zeros:
                return copy_and_stamp(copier, pieces(iter([(0, snap.size)]), zeros),
                                      args.image, fd, snap.identity, "copied")
        finally:
            os.close(fd)


def run_stamp(args: argparse.Namespace) -> int:
    with open_snapshot(args.snapshot, RunDir(args.run_dir), args.minor) as snap:
        return stamp_image(args.image, snap.size, snap.identity)


def stamp_image(image: str, size: int, identity: SnapshotId) -> int:
    fd = open_image(image, os.O_RDONLY)
    try:
        if image_size(fd) != size:
            raise SnapError(errno.EINVAL, f"sizes differ: image {image_size(fd)}, snapshot "
                            f"{size} bytes")
        os.fsync(fd)
        write_stamp(image, fd, identity)
    except OSError as e:
        if isinstance(e, SnapError):
            raise
        raise SnapError(e.errno or errno.EIO, f"cannot stamp {image}: {e.strerror}")
    finally:
        os.close(fd)
    print(f"stamped {image}: {identity}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
        return (run_full if args.full else run_stamp if args.stamp else update)(args)
    except OSError as e:  # SnapError, or a file it cannot read (EACCES): one line
        print(f"update-img: {error_line(e)}", file=sys.stderr)
        return e.errno or errno.EIO
    except KeyboardInterrupt:
        return errno.EINTR


if __name__ == "__main__":
    sys.exit(main())
