"""A minor: one snapshot or change list of one origin, and its state.

A minor's state is two facts, each held once:

* ``mode``: ``snapshot`` (old data saved, the image served as ``elastio-snapN``) or
  ``incremental`` (only the record of changed blocks). The tracker's kind follows it;
  the COW header's FLAG_INCREMENTAL is its persistent form, written by the transitions.
* ``phase``: ``unverified`` after reload-* until the COW file has been checked (when
  the origin's first NBD client connects); ``dormant`` while the origin has no client
  (the COW file closed cleanly); ``active`` otherwise.

They give elastio-snap's state numbers (``STATES``). Failure is not a state: it is
``health.error`` (a negative errno) on top of one, as in elastio-snap. lifecycle.py
says which operation may change what; transitions.py changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .arguments import EXPORT_PREFIX
from .health import Health
from .origin import Origin
from .space import Space
from .snapshot import SnapshotTracker
from .tracker import CowTracker, IncrementalTracker

SNAPSHOT = "snapshot"
INCREMENTAL = "incremental"

UNVERIFIED = "unverified"
DORMANT = "dormant"
ACTIVE = "active"

STATES = {  # (phase, mode) -> the state number of elastio-snap
    (DORMANT, INCREMENTAL): 0, (DORMANT, SNAPSHOT): 1,
    (ACTIVE, INCREMENTAL): 2, (ACTIVE, SNAPSHOT): 3,
    (UNVERIFIED, INCREMENTAL): 4, (UNVERIFIED, SNAPSHOT): 5,
}


def tracker_kind(mode: str) -> type[CowTracker]:
    return SnapshotTracker if mode == SNAPSHOT else IncrementalTracker


@dataclass
class Minor:
    number: int
    origin: Origin
    cow_path: str
    mode: str
    max_cache: int  # bytes
    fallocate: int = 0  # bytes; 0 until known (unverified)
    phase: str = ACTIVE
    tracker: CowTracker | None = None
    health: Health = field(default_factory=Health)  # the one record of failure
    space: Space = field(default_factory=Space)  # auto-expand: the minor's, not a file's
    uuid: str | None = None  # identity the registry recorded, checked on resume
    seq_id: int | None = None
    owned: tuple[int, int] | None = None  # (st_dev, st_ino) of the COW file the daemon
    # created or verified as this minor's: the only file destroy may unlink
    readers: int = 0  # open connections to elastio-snapN (a mounted snapshot, a copy)

    @property
    def state(self) -> int:
        return STATES[self.phase, self.mode]

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

    def identity(self) -> tuple[str | None, int | None]:
        """(uuid, seq_id): the open COW file's, else as the registry recorded them."""
        if self.tracker is not None:
            h = self.tracker.cow.header
            return h.uuid.hex(), h.seq_id
        return self.uuid, self.seq_id

    @property
    def limit(self) -> int:
        """The COW limit in bytes now: the open file's header (auto-expand raises it
        there), else as recorded."""
        return self.tracker.cow.header.fallocate if self.tracker is not None else self.fallocate

    def registry_entry(self) -> dict:
        uuid, seq_id = self.identity()
        step, reserved = self.space.policy
        return {"minor": self.number, "origin": self.origin.path, "cow_file": self.cow_path,
                "mode": self.mode, "max_cache": self.max_cache, "fallocate": self.limit,
                "uuid": uuid, "seq_id": seq_id, "auto_expand": [step, reserved]}

    def info(self) -> dict:
        """The device object of ``elioctl info``, keys in elastio-snap's order."""
        d: dict = {"minor": self.number, "cow_file": self.cow_path,
                   "block_device": self.origin.path, "max_cache": self.max_cache}
        t = self.tracker
        if t is not None:
            h = t.cow.header
            d.update(fallocate=h.fallocate, seq_id=h.seq_id, uuid=h.uuid.hex(),
                     version=h.version, nr_changed_blocks=t.nr_changed,
                     cow_size_current=t.cow.io.allocated(), auto_expand=self.space.info())
        if self.error:  # the errno, as elastio-snap gives it, and why (for the admin)
            d["error"] = self.error
            d["error_text"] = self.why
            d["tracking"] = self.health.tracking  # the change list is kept (§8)
        d["state"] = self.state
        return d
