"""The handles of NBD connections: one class per kind of export."""

from __future__ import annotations

import errno
import json
from typing import TYPE_CHECKING, Callable

from .errors import SnapError
from .extents import Extent, origin_extents, snapshot_extents
from .origin import Origin
from .snapshot import SnapshotTracker

if TYPE_CHECKING:
    from .metrics import OriginRecorders

DESCRIPTION_KEY = "snapengine"  # an export's NBD description is a JSON object with this key
DESCRIBES_ORIGIN = "origin"  # ... whose value says what the export is: an origin
DESCRIBES_SNAPSHOT = "snapshot"  # ... or elastio-snapN (update-img reads uuid, seq_id)
DESCRIPTION_TEXT_MAX = 512  # characters kept of a path or a reason: nbdkit sends no
#   description over 4096 bytes (NBD's string limit), and JSON escapes a character in 6 at most


def describe(kind: str, **fields) -> str:
    """An export's NBD description: ``{"snapengine": kind, **fields}`` as ASCII JSON (other
    characters escaped, so any path is valid UTF-8), under nbdkit's limit of 4096 bytes."""
    cut = {k: v[:DESCRIPTION_TEXT_MAX] if isinstance(v, str) else v for k, v in fields.items()}
    return json.dumps({DESCRIPTION_KEY: kind, **cut})


class OriginExport:
    """One NBD connection to an origin: read-write, every change tracked. ``detach``
    is called once, when the client leaves (the last one sends the minor dormant).
    With ``recorders`` (serve --metrics) the data callbacks are the timed ones."""

    def __init__(self, origin: Origin, readonly: bool, detach: Callable[[Origin], None],
                 recorders: OriginRecorders | None = None) -> None:
        self._detach = detach
        self.origin = origin
        self.size = origin.size
        self.writable = not readonly
        self.description = describe(DESCRIBES_ORIGIN, path=origin.path)
        self.pread = origin.pread
        self.pwrite = origin.pwrite
        self.zero = origin.zero
        self.trim = origin.trim
        self.flush = origin.flush
        if recorders is not None:
            self.pread, self.pwrite, self.zero, self.trim = recorders.callbacks

    def extents(self, count: int, offset: int, req_one: bool) -> list[Extent]:
        return origin_extents(self.origin.io, self.size, count, offset, req_one)

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

    def __init__(self, tracker: SnapshotTracker, minor: int, size: int,
                 on_close: Callable[[], None] = lambda: None) -> None:
        self.size = size
        self.pread = tracker.read
        self._tracker = tracker
        self.close = on_close  # once, when the client leaves (the minor counts its readers)
        h = tracker.cow.header  # update-img reads its identity from here
        self.description = describe(DESCRIBES_SNAPSHOT, minor=minor, uuid=h.uuid.hex(),
                                    seq_id=h.seq_id)

    def extents(self, count: int, offset: int, req_one: bool) -> list[Extent]:
        return snapshot_extents(self._tracker, self.size, count, offset, req_one)


class FailedSnapshotExport(ReadOnlyExport):
    """``elastio-snapN`` of a snapshot that failed before it could be served (its COW
    file failed its checks at a restart or a reload): it opens, and every read is EIO."""

    def __init__(self, minor: int, size: int, reason: str) -> None:
        self.size = size
        self.reason = reason
        self.description = describe(DESCRIBES_SNAPSHOT, minor=minor, failed=reason)

    def pread(self, buf, offset: int) -> None:
        raise SnapError(errno.EIO, f"the snapshot has failed: {self.reason}")

    def extents(self, count: int, offset: int, req_one: bool) -> list[Extent]:
        self.pread(b"", offset)
        return []
