"""The handles of NBD connections: one class per kind of export."""

from __future__ import annotations

import errno
from typing import Callable

from .errors import SnapError
from .origin import Origin
from .tracker import SnapshotTracker


class OriginExport:
    """One NBD connection to an origin: read-write, every change tracked. ``detach``
    is called once, when the client leaves (the last one sends the minor dormant)."""

    def __init__(self, origin: Origin, readonly: bool,
                 detach: Callable[[Origin], None]) -> None:
        self._detach = detach
        self.origin = origin
        self.size = origin.size
        self.writable = not readonly
        self.description = f"snapengine origin {origin.path}"
        self.pread = origin.pread
        self.pwrite = origin.pwrite
        self.zero = origin.zero
        self.trim = origin.trim
        self.flush = origin.flush

    def close(self) -> None:
        self._detach(self.origin)


class ReadOnlyExport:
    """What every snapshot export refuses: it is read-only."""

    writable = False

    def pwrite(self, buf, offset: int, fua: bool) -> None:
        raise SnapError(errno.EPERM, "snapshot exports are read-only")

    def zero(self, length: int, offset: int, may_trim: bool, fua: bool) -> None:
        self.pwrite(b"", offset, fua)

    def trim(self, length: int, offset: int, fua: bool) -> None:
        self.pwrite(b"", offset, fua)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class SnapshotExport(ReadOnlyExport):
    """One NBD connection to ``elastio-snapN``: the read-only point-in-time image."""

    def __init__(self, tracker: SnapshotTracker, minor: int, size: int) -> None:
        self.size = size
        self.pread = tracker.read
        h = tracker.cow.header  # update-img reads its identity from here
        self.description = (f"snapengine snapshot: minor {minor}, uuid {h.uuid.hex()}, "
                            f"seq_id {h.seq_id}")


class FailedSnapshotExport(ReadOnlyExport):
    """``elastio-snapN`` of a snapshot that failed before it could be served (its COW
    file failed its checks at a restart or a reload): it opens, and every read is EIO."""

    def __init__(self, minor: int, size: int, reason: str) -> None:
        self.size = size
        self.reason = reason
        self.description = f"snapengine snapshot: minor {minor}, failed"

    def pread(self, buf, offset: int) -> None:
        raise SnapError(errno.EIO, f"the snapshot has failed: {self.reason}")
