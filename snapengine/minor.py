"""The per-minor state machine: mode, activity, verification, failure; and its info.

States (the numbers of elastio-snap)::

    0 dormant incremental      1 dormant snapshot
    2 active incremental       3 active snapshot
    4 unverified incremental   5 unverified snapshot

A minor is *unverified* after reload-* until its COW file has been checked (when the
origin's first NBD client connects); *dormant* while its origin has no client (the
COW file is then closed cleanly); *active* otherwise. Failure is not a state: it is
``error`` (a negative errno) on top of one, as in elastio-snap.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from .arguments import EXPORT_PREFIX
from .errors import SnapError
from .health import Health
from .origin import Origin
from .tracker import CowTracker, SnapshotTracker

SNAPSHOT = "snapshot"
INCREMENTAL = "incremental"

STATE_DORMANT_INCREMENTAL = 0
STATE_DORMANT_SNAPSHOT = 1
STATE_ACTIVE_INCREMENTAL = 2
STATE_ACTIVE_SNAPSHOT = 3
STATE_UNVERIFIED_INCREMENTAL = 4
STATE_UNVERIFIED_SNAPSHOT = 5


@dataclass
class Minor:
    number: int
    origin: Origin
    cow_path: str
    mode: str
    max_cache: int  # bytes
    fallocate: int = 0  # bytes; 0 until known (unverified)
    tracker: CowTracker | None = None
    verified: bool = True
    active: bool = True
    health: Health = field(default_factory=Health)  # the one record of failure
    uuid: str | None = None  # identity the registry recorded, checked on resume
    seq_id: int | None = None
    owned: tuple[int, int] | None = None  # (st_dev, st_ino) of the COW file the daemon
    # created or verified as this minor's: the only file destroy may unlink

    @property
    def state(self) -> int:
        snapshot = self.mode == SNAPSHOT
        if not self.verified:
            return STATE_UNVERIFIED_SNAPSHOT if snapshot else STATE_UNVERIFIED_INCREMENTAL
        if self.active:
            return STATE_ACTIVE_SNAPSHOT if snapshot else STATE_ACTIVE_INCREMENTAL
        return STATE_DORMANT_SNAPSHOT if snapshot else STATE_DORMANT_INCREMENTAL

    @property
    def error(self) -> int:
        return self.health.error

    @property
    def why(self) -> str:
        return self.health.reason

    @property
    def export_name(self) -> str:
        return f"{EXPORT_PREFIX}{self.number}"

    @property
    def snapshot(self) -> SnapshotTracker | None:
        """The tracker serving the snapshot export, if there is one now."""
        t = self.tracker
        return t if isinstance(t, SnapshotTracker) else None

    @property
    def has_snapshot_export(self) -> bool:
        """``elastio-snapN`` exists: a snapshot served, or one that failed (reads EIO)."""
        return self.snapshot is not None or (self.mode == SNAPSHOT and bool(self.error))

    def require_healthy(self, what: str) -> None:
        if not self.verified:
            raise SnapError(errno.EINVAL, f"minor {self.number} is unverified (state "
                            f"{self.state}): {what} needs its origin's first client")
        if self.error:
            raise SnapError(errno.EINVAL, f"minor {self.number} has failed "
                            f"(error {self.error}: {self.why}); destroy it and set up again")

    def info(self) -> dict:
        """The device object of ``elioctl info``, keys in elastio-snap's order."""
        d: dict = {"minor": self.number, "cow_file": self.cow_path,
                   "block_device": self.origin.path, "max_cache": self.max_cache}
        t = self.tracker
        if t is not None:
            h = t.cow.header
            d.update(fallocate=h.fallocate, seq_id=h.seq_id, uuid=h.uuid.hex(),
                     version=h.version, nr_changed_blocks=t.nr_changed)
        if self.error:
            d["error"] = self.error
        d["state"] = self.state
        return d
