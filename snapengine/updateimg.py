"""update-img: bring a backup image up to a new snapshot by copying only the blocks that
changed, as listed in the previous snapshot's (closed) COW file.

    update-img [--run-dir DIR] [--minor N] <snapshot> <cow file> <image file>

Everything is checked before the image is touched: the COW file is a clean, unfailed
snapengine COW file whose index matches its header; it belongs to the same backup chain
as the snapshot (uuid) and is the one just before it (seq_id = snapshot's - 1); the
image, the COW file's origin and the snapshot have the same size. Any mismatch: exit
EINVAL, image untouched.
"""

from __future__ import annotations

import argparse
import errno
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
from .minor import EXPORT_PREFIX
from .units import BLOCK_SIZE, MiB

CHUNK = 4 * MiB  # largest single read: extents are coalesced up to this, and split at it
WORKERS = 4  # reads in flight (one NBD connection each)
PROGRESS_EVERY = 0.2  # seconds between progress updates on a terminal
DESCRIPTION_RE = re.compile(r"uuid ([0-9a-f]{32}), seq_id (\d+)")


@dataclass
class Snapshot:
    """Where to read the new snapshot from, and who it says it is."""

    size: int
    uuid: str
    seq_id: int
    opener: Callable[[], Callable[[int, int], bytes]]  # per worker: (length, offset) -> data
    name: str


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SnapError(errno.EINVAL, f"{message} (see 'update-img --help')")


def build_parser() -> Parser:
    p = Parser(prog="update-img", description=__doc__.split("\n\n")[0].strip(),
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""\
<snapshot> is a minor number (4), an export name (elastio-snap4), an NBD URI
(nbd+unix:///elastio-snap4?socket=/run/elastio-snap/nbd.sock, nbd://host/elastio-snap4),
or a local file or block device holding the snapshot (then give --minor, so its uuid and
seq_id can be asked of the daemon). Prints 'copying complete: N blocks changed, E errors'
and exits 0 only if every block was copied and the image was synced.""")
    p.add_argument("--run-dir", default=os.environ.get("ELIO_RUN_DIR", DEFAULT_RUN_DIR),
                   help="the daemon's run directory (default %(default)s)")
    p.add_argument("--minor", type=int, help="the snapshot's minor, when <snapshot> is a "
                   "local device or a URI that does not name elastio-snapN")
    p.add_argument("snapshot", metavar="<snapshot>")
    p.add_argument("cow_file", metavar="<cow file>")
    p.add_argument("image", metavar="<image file>")
    return p


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

    def __init__(self, snap: Snapshot, image_fd: int, total: int) -> None:
        self.snap = snap
        self.image_fd = image_fd
        self.total = total
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
                os.pwrite(self.image_fd, data, offset)
                with self._lock:
                    self.done += blocks
            except Exception as e:
                with self._lock:
                    self.failed += blocks
                self._note_error(f"blocks at {offset} (+{length} bytes): {e}")

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


def update(args: argparse.Namespace) -> int:
    changed = changes.read_closed(args.cow_file)
    snap = open_snapshot(args.snapshot, args.run_dir, args.minor)
    try:
        image_fd = os.open(args.image, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapError(e.errno or errno.EIO, f"cannot open image {args.image}: {e.strerror}")
    try:
        check(changed, snap, os.lseek(image_fd, 0, os.SEEK_END))
        copier = Copier(snap, image_fd, changed.header.nr_changed_blocks)
        copier.run(chunks(changed.byte_extents()), progress_printer(sys.stderr))
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        try:
            os.fsync(image_fd)
        except OSError as e:
            copier.failed = copier.failed or copier.done
            copier.first_error = copier.first_error or f"fsync of {args.image}: {e}"
    finally:
        os.close(image_fd)
    print(f"copying complete: {copier.done} blocks changed, {copier.failed} errors")
    if copier.failed:
        print(f"update-img: {copier.first_error}", file=sys.stderr)
        return errno.EIO
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return update(build_parser().parse_args(argv))
    except SnapError as e:
        print(f"update-img: {e}", file=sys.stderr)
        return e.errno or errno.EIO
    except KeyboardInterrupt:
        return errno.EINTR


if __name__ == "__main__":
    sys.exit(main())
