"""The snapshot update-img reads: its connections, and which snapshot each one reads.

Each connection is bound to the snapshot of its minor when it opened, so two connections
opened with a transition-to-incremental and a transition-to-snapshot between them read two
different snapshots. Every connection is therefore identified on its own, right after it
opens and before its first read, and must be the snapshot the first one was (EAGAIN if not).

A snapshot export says which snapshot it serves in its NBD export description, the JSON
object of ``exports.describe``: ``{"snapengine": "snapshot", "minor": 4, "uuid": "<32 hex>",
"seq_id": 2}``. Where there is no such description (a local device or file, a proxy that
drops it), the daemon is asked for the minor's identity after the connection opened: a
connection to another snapshot would have to have opened after the first answer, and
(uuid, seq_id) never comes back once changed, so an equal answer means the same snapshot.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from typing import Callable

from .arguments import EXPORT_PREFIX
from .client import request
from .errors import SnapError
from .exports import DESCRIBES_ORIGIN, DESCRIBES_SNAPSHOT, DESCRIPTION_KEY
from .rundir import RunDir
from .stamp import SnapshotId

NBD_SCHEMES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+vsock://")
SNAPSHOT_EXPORT = re.compile(rf"{EXPORT_PREFIX}(\d+)")  # elastio-snapN: minor N
UUID_HEX = re.compile(r"[0-9a-f]{32}")
SNAPSHOT_STATES = (1, 3)  # dormant or active snapshot (minor.py)

Reader = Callable[[int, int], bytes]  # (length, offset) -> exactly length bytes


@dataclass
class Connection:
    """One open connection to the snapshot: an NBD handle or a file descriptor."""

    size: int
    identity: SnapshotId  # established after it opened, before any read
    read: Reader
    close: Callable[[], None]


class Snapshot:
    """The snapshot to read, as its first connection found it (``size``, ``identity``).

    ``readers(n)`` opens more connections through ``connect`` and refuses (EAGAIN) one
    that reads another snapshot. Use it as a context manager: every connection it opened,
    refused ones included, is closed at the end.
    """

    def __init__(self, name: str, connect: Callable[[], Connection]) -> None:
        self.name = name
        self._connect = connect
        self._connections = [connect()]
        self.size = self._connections[0].size
        self.identity = self._connections[0].identity

    def readers(self, count: int) -> list[Reader]:
        """``count`` readers, one per connection (the first one's included)."""
        while len(self._connections) < count:
            conn = self._connect()
            self._connections.append(conn)
            if (conn.identity, conn.size) != (self.identity, self.size):
                raise SnapError(errno.EAGAIN, "the snapshot changed while update-img was "
                                f"opening it: {self.name} was {self.identity} ({self.size} "
                                f"bytes), connection {len(self._connections)} reads "
                                f"{conn.identity} ({conn.size} bytes); run it again")
        return [c.read for c in self._connections[:count]]

    def close(self) -> None:
        while self._connections:
            self._connections.pop().close()

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_snapshot(spec: str, run_dir: RunDir, minor: int | None) -> Snapshot:
    """<snapshot> (a minor, an export name, an NBD URI or a local path) with its first
    connection open."""
    if spec.isdecimal():
        spec = f"{EXPORT_PREFIX}{spec}"
    if SNAPSHOT_EXPORT.fullmatch(spec):
        spec = run_dir.nbd_uri(spec)
    if spec.startswith(NBD_SCHEMES):
        return Snapshot(spec, lambda: nbd_connection(spec, run_dir, minor))
    if not os.path.exists(spec):
        raise SnapError(errno.ENOENT, f"snapshot {spec} does not exist")
    if minor is None:
        raise SnapError(errno.EINVAL, f"{spec} is a local device: give --minor N so its "
                        "uuid and seq_id can be checked")
    return Snapshot(spec, lambda: file_connection(spec, run_dir, minor))


def nbd_connection(uri: str, run_dir: RunDir, minor: int | None) -> Connection:
    import nbd
    h = nbd.NBD()
    h.set_full_info(True)  # ask for the export's description
    try:
        h.connect_uri(uri)
        size, export = h.get_size(), h.get_export_name()
        description = export_description(h)
    except nbd.Error as e:
        raise SnapError(e.errnum or errno.EIO, f"cannot open snapshot {uri}: {e.string}")

    def close() -> None:
        try:
            h.shutdown()
        except nbd.Error:
            pass  # the server is gone: nothing to tell it
    try:
        identity = (described_identity(description, uri)
                    or minor_identity(run_dir, export_minor(uri, export, minor)))
    except BaseException:
        close()
        raise
    return Connection(size, identity, lambda length, offset: h.pread(length, offset), close)


def export_description(h) -> str | None:
    """The description the server sent, None if it sent none."""
    import nbd
    try:
        return h.get_export_description()
    except nbd.Error:
        return None


def file_connection(path: str, run_dir: RunDir, minor: int) -> Connection:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapError(e.errno or errno.EIO, f"cannot open snapshot {path}: {e.strerror}")
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        identity = minor_identity(run_dir, minor)
    except BaseException:
        os.close(fd)
        raise

    def read(length: int, offset: int) -> bytes:
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, f"short read from {path} at {offset}")
        return data
    return Connection(size, identity, read, lambda: os.close(fd))


def described_identity(description: str | None, where: str) -> SnapshotId | None:
    """The snapshot an export's description (``exports.describe``) says it serves; None if
    there is no description or it is not snapengine's (then the daemon is asked). An
    origin or a damaged description: EINVAL; a failed snapshot: EIO, as its reads."""
    try:
        doc = json.loads(description) if description else None
    except ValueError:
        return None  # free text: not ours
    if not isinstance(doc, dict) or DESCRIPTION_KEY not in doc:
        return None
    kind = doc[DESCRIPTION_KEY]
    if kind == DESCRIBES_ORIGIN:
        raise SnapError(errno.EINVAL, f"{where} is the origin {doc.get('path')}, "
                        "not a snapshot")
    if kind != DESCRIBES_SNAPSHOT:
        raise SnapError(errno.EINVAL, f"{where} is a snapengine export of kind {kind!r}, "
                        "not a snapshot")
    if "failed" in doc:
        raise SnapError(errno.EIO, f"{where}: the snapshot of minor {doc.get('minor')} "
                        f"has failed: {doc['failed']}")
    uuid, seq_id = doc.get("uuid"), doc.get("seq_id")
    if (not isinstance(uuid, str) or not UUID_HEX.fullmatch(uuid)
            or type(seq_id) is not int or seq_id < 1):
        raise SnapError(errno.EINVAL, f"{where} has a damaged description: {description!r}")
    return SnapshotId(uuid, seq_id)


def export_minor(uri: str, export: str | None, minor: int | None) -> int:
    """The minor to ask the daemon about: --minor, else N of an elastio-snapN export."""
    if minor is not None:
        return minor
    named = SNAPSHOT_EXPORT.fullmatch(export or "")
    if named is None:
        raise SnapError(errno.EINVAL, f"{uri} does not say which snapshot it is: give --minor")
    return int(named.group(1))


def minor_identity(run_dir: RunDir, minor: int) -> SnapshotId:
    """The daemon's answer: which snapshot minor ``minor`` serves now."""
    info = request(run_dir.ctl_socket, "info", minor=minor)
    if info.get("error"):
        raise SnapError(errno.EIO, f"the snapshot of minor {minor} has failed "
                        f"(error {info['error']})")
    if "uuid" not in info or info.get("state") not in SNAPSHOT_STATES:
        raise SnapError(errno.EINVAL, f"minor {minor} is not a snapshot (state "
                        f"{info.get('state')})")
    return SnapshotId(info["uuid"], info["seq_id"])
