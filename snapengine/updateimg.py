"""update-img: bring a backup image up to a new snapshot by copying only the blocks that
changed, as listed in the (closed) COW files of the snapshots since the image's.

    update-img [--run-dir DIR] [--minor N] <snapshot> <cow file> [<cow file>...] <image>
    update-img [--run-dir DIR] [--minor N] --full <snapshot> <image>
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

The image may also be an NBD target (an nbd://, nbds:// or nbd+unix:// URI: qemu-nbd
serving a qcow2 overlay, nbdkit ...; target.py): its size is checked against the
snapshot and a read-only target refused (EROFS) before anything is written; it is
written through one connection with several requests in flight, all-zero data sent as
write-zeroes, and FLUSHed at the end instead of the fsync. It has no stamp: the stamp
check is skipped with a warning.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from contextlib import ExitStack, contextmanager
from typing import Iterator, NoReturn

from . import changes
from .cli import error_line
from .arguments import EXPORT_PREFIX
from .errors import SnapError
from .copier import Copier, pieces, progress_printer
from .rundir import DEFAULT_RUN_DIR, RUN_DIR_ENV, RunDir, default_run_dir
from .source import Snapshot, open_snapshot
from .stamp import STAMP_SIDECAR, STAMP_XATTR, SnapshotId, clear_stamp, read_stamp, write_stamp
from .target import FileTarget, NbdTarget, is_nbd
from .units import BLOCK_SIZE
from .zeromap import Piece, zero_map

WORKERS = 4  # reads in flight (one NBD connection each)


USAGE = """
  update-img [--run-dir DIR] [--minor N] <snapshot> <cow file> [<cow file>...] <image>
  update-img [--run-dir DIR] [--minor N] --full <snapshot> <image>
  update-img [--run-dir DIR] [--minor N] --stamp <snapshot> <image file>

<image> is a file, a block device or an NBD URI (nbd://, nbds://, nbd+unix://)."""


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

<image> may be an NBD URI, a qcow2 overlay served by qemu-nbd for instance (one per
night: docs/backup-cycle.md). Its size must be the snapshot's (EINVAL) and it must be
writable (EROFS), both checked before anything is written; all-zero data is sent as
write-zeroes, and the target is FLUSHed at the end. An NBD target is not stamped (a
warning says which snapshot it is taken to hold); --stamp refuses one (EINVAL).

Prints 'copying complete: N blocks changed, E errors' (N: blocks changed in any of the
COW files; --full: 'N blocks copied') and exits 0 only if every block was copied and the
image was synced; then the image is stamped (xattr {STAMP_XATTR}, or
<image>{STAMP_SIDECAR} where xattrs are not supported) with the chain's uuid and the
snapshot's seq_id. An image stamped otherwise than the first COW file's uuid and seq_id
is refused (EINVAL, untouched)."""


def build_parser() -> Parser:
    p = Parser(prog="update-img", usage=USAGE, description=__doc__.split("\n\n")[0].strip(),
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--run-dir", default=default_run_dir(), metavar="DIR",
                   help=f"the daemon's run directory (env {RUN_DIR_ENV}, default %(default)s)")
    p.add_argument("--minor", type=int, metavar="N", help="the snapshot's minor, when <snapshot> is a "
                   f"local device or a URI that does not name {EXPORT_PREFIX}N")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="copy the whole snapshot into "
                      "<image> (a file created if missing) and stamp it")
    mode.add_argument("--stamp", action="store_true", help="stamp <image file>, made by "
                      "another tool (nbdcopy, dd), as holding <snapshot>")
    p.add_argument("snapshot", metavar="<snapshot>", help="a minor, an export name, an "
                   "NBD URI or a local copy of the snapshot (below)")
    p.add_argument("files", nargs="*", metavar="<cow file> [<cow file>...] <image>",
                   help="the COW files oldest first, then the image (a file, a block "
                   "device or an NBD URI); <image> alone with --full or --stamp")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    whole = args.full or args.stamp
    if (len(args.files) != 1) if whole else (len(args.files) < 2):
        usage = (f"--{'full' if args.full else 'stamp'} <snapshot> <image>" if whole
                 else "<snapshot> <cow file> [<cow file>...] <image>")
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


# -- the image ---------------------------------------------------------------------

def open_image(path: str, flags: int = os.O_WRONLY, mode: int = 0o600) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC, mode)
    except OSError as e:
        raise SnapError(e.errno or errno.EIO, f"cannot open image {path}: {e.strerror}")


def image_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def copy_and_finish(copier: Copier, work: Iterator[Piece], target, identity: SnapshotId,
                    what: str) -> int:
    """Copy, make the target durable (fsync, or FLUSH), print the result; stamp a file
    image only if all of it is safe (an NBD target has nowhere to keep a stamp)."""
    copier.run(work, progress_printer(sys.stderr))
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    try:
        target.finish()
    except SnapError as e:
        copier.failed = copier.failed or copier.done
        copier.first_error = copier.first_error or e.detail
    print(f"copying complete: {copier.done} blocks {what}, {copier.failed} errors")
    if copier.failed:
        print(f"update-img: {copier.first_error}", file=sys.stderr)
        return errno.EIO
    if isinstance(target, NbdTarget):
        print(f"update-img: {target.name} holds snapshot {identity.seq_id} of chain "
              f"{identity.uuid} (NBD targets are not stamped: keep track of which is which)",
              file=sys.stderr)
        return 0
    try:
        write_stamp(target.name, target.fd, identity)
    except OSError as e:
        raise SnapError(errno.EIO, f"{target.name} holds snapshot {identity.seq_id} but could "
                        f"not be stamped ({e}): run 'update-img --stamp'")
    return 0


@contextmanager
def nbd_target(uri: str, size: int) -> Iterator[NbdTarget]:
    """The NBD target at ``uri``, checked (size, writable) before anything is written."""
    target = NbdTarget(uri)
    try:
        if target.size != size:
            raise SnapError(errno.EINVAL, f"sizes differ: target {uri} {target.size}, "
                            f"snapshot {size} bytes")
        target.check_writable()
        target.start()
        yield target
    finally:
        target.close()


@contextmanager
def file_target(path: str, fd: int) -> Iterator[FileTarget]:
    try:
        yield FileTarget(path, fd)
    finally:
        os.close(fd)


def image_size_of(path: str) -> int:
    """The image's size, read through a read-only descriptor (nothing is written yet)."""
    fd = open_image(path, os.O_RDONLY)
    try:
        return image_size(fd)
    finally:
        os.close(fd)


def update(args: argparse.Namespace) -> int:
    """Check the chain, the snapshot, the image (its size, its stamp) and only then open
    it for writing; copy the union of the chain's changed blocks once."""
    chain = read_chain(args.cow_files)
    extents = changes.union(changed.scan for changed in chain)
    origin_size = chain[0].header.origin_size
    with open_snapshot(args.snapshot, RunDir(args.run_dir), args.minor) as snap, \
            ExitStack() as stack:
        if is_nbd(args.image):
            check(chain, snap, snap.size)  # the target's own size: nbd_target
            target = stack.enter_context(nbd_target(args.image, snap.size))
            print(f"update-img: warning: {args.image} is an NBD target, which has no stamp; "
                  f"taking it as snapshot {chain[0].header.seq_id} of chain "
                  f"{chain[0].header.uuid.hex()}", file=sys.stderr)
        else:
            check(chain, snap, image_size_of(args.image))
            check_stamp(args.image, chain[0])
            target = stack.enter_context(file_target(args.image, open_image(args.image)))
        copier = Copier(snap.readers(WORKERS), target, changes.nr_extent_blocks(extents))
        with zero_map(snap) as zeros:
            work = pieces(changes.byte_extents(extents, origin_size), zeros)
            return copy_and_finish(copier, work, target, snap.identity, "changed")


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
    with open_snapshot(args.snapshot, RunDir(args.run_dir), args.minor) as snap, \
            ExitStack() as stack:
        readers = snap.readers(WORKERS)  # all checked before the image is emptied
        if is_nbd(args.image):
            target = stack.enter_context(nbd_target(args.image, snap.size))
            holes = False  # what the target reads is not known: zeros are written too
        else:
            fd = open_full_image(args.image, snap.size)
            target = stack.enter_context(file_target(args.image, fd))
            holes = os.path.isfile(args.image)  # an emptied sparse file reads as zeros
        copier = Copier(readers, target, (snap.size + BLOCK_SIZE - 1) // BLOCK_SIZE,
                        keep_holes=holes)
        with zero_map(snap) as zeros:
            return copy_and_finish(copier, pieces(iter([(0, snap.size)]), zeros), target,
                                   snap.identity, "copied")


def run_stamp(args: argparse.Namespace) -> int:
    if is_nbd(args.image):
        raise SnapError(errno.EINVAL, f"{args.image} is an NBD target: it has nowhere to "
                        "keep a stamp (update-img into it needs none)")
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
