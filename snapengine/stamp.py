"""Which snapshot an image holds: its stamp, the chain's uuid and the snapshot's seq_id.

update-img writes the stamp after every successful copy and refuses an image whose stamp
is not what the COW file updates (docs/backup-cycle.md, "An image knows what it holds").
The stamp is the xattr ``user.snapengine.stamp``; where xattrs are refused (some file
systems, device nodes) it is the sidecar file ``<image>.snapengine-stamp``. Either
holds the JSON ``{"uuid": "<32 hex>", "seq_id": N}``.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass

from .errors import SnapError
from .fileio import atomic_write

STAMP_XATTR = "user.snapengine.stamp"
STAMP_SIDECAR = ".snapengine-stamp"  # <image>.snapengine-stamp where xattrs are refused
NO_XATTR = (errno.ENOTSUP, errno.EPERM)  # EPERM: user.* is refused on device nodes


@dataclass(frozen=True)
class SnapshotId:
    """Which snapshot: seq_id of the chain uuid. What a stamp records, and what a
    snapshot export says it serves."""

    uuid: str  # 32 hex digits
    seq_id: int

    def __str__(self) -> str:
        return f"uuid {self.uuid}, seq_id {self.seq_id}"


def _sidecar(image: str) -> str:
    return image + STAMP_SIDECAR


def read_stamp(image: str) -> SnapshotId | None:
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
        return SnapshotId(str(doc["uuid"]), int(doc["seq_id"]))
    except (ValueError, TypeError, KeyError) as e:
        raise SnapError(errno.EINVAL, f"{image} has a damaged stamp ({e}): restamp it with "
                        "'update-img --stamp' if you know which snapshot it holds")


def write_stamp(image: str, fd: int, stamp: SnapshotId) -> None:
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
