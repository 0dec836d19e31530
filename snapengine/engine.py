"""The engine: origins, minors, exports, and every control operation on them.

Design notes
------------
* Data path: an origin export's writes go to ``Origin`` (origin.py), which asks the
  minor's tracker (tracker.py) to save or record the blocks first. Snapshot exports
  read through ``SnapshotTracker.read``. The engine is not on that path.
* Control path: one lock (``_lock``) serializes control operations, client attach
  and detach, and the info file. The data path never takes it: a tracker that fails
  records the failure in its own COW header and sets ``dirty``; the info refresher
  publishes it within a second.
* A control operation that changes what writes do (setup, both transitions, destroy)
  swaps ``origin.tracker`` with the origin's write gate closed, so every write lands
  wholly before or wholly after the switch.
* A sub-command that fails changes nothing: the new COW file, if one was created, is
  unlinked; trackers and minors are only installed once everything else succeeded.
* Every header write happens with the gate closed or with no client, except the one
  recording a failure (cowfile serializes header writes).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import uuid as uuidlib
from typing import Any

from . import __version__
from .arguments import (
    DEFAULT_CACHE_MB,
    DEFAULT_FALLOCATE_PERCENT,
    DEFAULT_MAX_MINORS,
    check_origin_names,
    check_settings,
    file_identity,
    find_origin,
    megabytes,
    minor_number,
    new_cow_path,
    reload_cow_path,
)
from .cowfile import FLAG_DURABLE, CowFile, Header, boot_id
from .errors import SnapError
from .exports import FailedSnapshotExport, OriginExport, SnapshotExport
from .fileio import FileIO
from .health import Health
from .minor import EXPORT_PREFIX, INCREMENTAL, SNAPSHOT, Minor
from .origin import AbsentOrigin, Origin, open_exclusive
from .recovery import open_verified
from .registry import Registry
from .rundir import RunDir
from .stacking import carrying_origin
from .tracker import CowTracker, IncrementalTracker, SnapshotTracker
from .units import MB, MiB

log = logging.getLogger(__name__)



class Engine:
    """Everything the daemon serves. Use as a context manager, or start()/close()."""

    def __init__(self, run_dir: str, origins: list[tuple[str, str]], *,
                 max_minors: int = DEFAULT_MAX_MINORS, cache_default_mb: int = DEFAULT_CACHE_MB,
                 fallocate_percent: float = DEFAULT_FALLOCATE_PERCENT,
                 durable: bool = False, opener=FileIO.open) -> None:
        check_settings(max_minors, cache_default_mb, fallocate_percent)
        self.run_dir = run_dir
        self.max_minors = max_minors
        self.cache_default = cache_default_mb * MB
        self.fallocate_percent = fallocate_percent
        self.durable = durable  # snapshots survive power cuts (FLAG_DURABLE)
        self.opener = opener
        self.origin_specs = origins
        self.origins: dict[str, Origin] = {}
        self.minors: dict[int, Minor] = {}
        self.layout = RunDir(run_dir)
        self.registry = Registry(self.layout.registry)
        self.info_path = self.layout.info
        self.dirty = threading.Event()  # info is stale (set from the data path)
        self.stopped = False  # shutdown() ran: no more tracking, no more writes
        self._lock = threading.RLock()
        self._published = ""

    # -- life cycle -----------------------------------------------------------------
    def __enter__(self) -> "Engine":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Open every origin and resume every registered minor; no client yet."""
        os.makedirs(self.run_dir, mode=0o755, exist_ok=True)
        try:
            check_origin_names(self.origin_specs)
            for path, name in self.origin_specs:
                self.origins[name] = Origin(path, name, open_exclusive(path, self.opener))
            for entry in self.registry.load():
                self._restore(entry)
            self.publish()
        except BaseException:
            self.close()
            raise

    def shutdown(self) -> None:
        """Stop tracking for good, cleanly, while clients may still be connected: writes
        are refused from now on (ESHUTDOWN), every COW file is synced and marked clean.
        The registry keeps every minor for the next start."""
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
            for origin in self.origins.values():
                origin.gate.shut()
            for m in self.minors.values():
                self._close_tracker(m, m.tracker)
            log.info("tracking stopped: every COW file closed cleanly")

    def close(self) -> None:
        """Clean shutdown: every COW file synced and marked clean, origins closed."""
        with self._lock:
            self.shutdown()
            for origin in self.origins.values():
                origin.close()
            self.origins.clear()
            self.minors.clear()
            try:
                os.unlink(self.info_path)
            except FileNotFoundError:
                pass

    def _close_tracker(self, m: Minor, tracker: CowTracker | None) -> None:
        """Take ``tracker`` off the origin, close its COW file cleanly, keep the errors."""
        if tracker is None:
            return
        origin = m.origin
        if self.stopped:  # the gate is shut for good: no write is in flight
            origin.tracker = None
        else:
            with origin.gate.closed():
                if origin.tracker is tracker:
                    origin.tracker = None
        tracker.quiesce()
        try:
            tracker.checkpoint(clean=True)
        except OSError as e:
            log.error("minor %d: cannot close %s cleanly: %s", m.number, tracker.cow.path, e)
        tracker.cow.close()

    # -- exports --------------------------------------------------------------------
    def export_list(self) -> list[tuple[str, str]]:
        with self._lock:
            out = [(o.name, f"origin {o.path}") for o in self.origins.values()]
            for m in sorted(self.minors.values(), key=lambda m: m.number):
                if m.has_snapshot_export:
                    out.append((m.export_name, f"snapshot of {m.origin.path} (minor {m.number})"))
            return out

    def open_export(self, name: str, readonly: bool) -> OriginExport | SnapshotExport:
        with self._lock:
            if self.stopped:
                raise SnapError(errno.ESHUTDOWN, "the daemon is shutting down")
            origin = self.origins.get(name)
            if origin is not None:
                self.attach(origin)
                return OriginExport(origin, readonly, self.detach)
            m = self._snapshot_minor(name)
            if m is not None and m.snapshot is not None:
                return SnapshotExport(m.snapshot, m.number, m.origin.size)
            if m is not None and m.has_snapshot_export:  # failed before tracking
                return FailedSnapshotExport(m.number, m.origin.size, m.why)
            raise SnapError(errno.ENOENT, f"no export named {name!r}")

    def _snapshot_minor(self, name: str) -> Minor | None:
        digits = name[len(EXPORT_PREFIX):]
        if not name.startswith(EXPORT_PREFIX) or not digits.isdecimal() or \
                not digits.isascii() or str(int(digits)) != digits:
            return None
        return self.minors.get(int(digits))

    def attach(self, origin: Origin) -> None:
        """A client connected to ``origin``: a dormant minor becomes active."""
        with self._lock:
            origin.clients += 1
            m = self._minor_of(origin)
            if m is None or m.active or (m.error and m.tracker is None):
                return
            if not m.verified:
                self._verify_reloaded(m)
            elif m.tracker is not None and not m.error:
                with origin.gate.closed():
                    self._checkpoint(m.tracker, clean=False)
            m.active = True
            log.info("minor %d: active (state %d)", m.number, m.state)
            self.publish()

    def _verify_reloaded(self, m: Minor) -> None:
        """The origin of a reloaded minor came online: check its COW file now."""
        try:
            tracker = self._resume(m)
        except SnapError as e:
            self._fault(m, e)
            return
        self._checkpoint(tracker, clean=False)
        try:
            self._save_registry(self.minors)
        except OSError as e:  # the minor works; a restart will need reload-* again
            log.error("minor %d: cannot save the registry: %s", m.number, e)
        m.active = True
        log.info("minor %d: %s verified (state %d)", m.number, m.cow_path, m.state)
        self.publish()

    def detach(self, origin: Origin) -> None:
        """A client left ``origin``: after the last one the minor goes dormant."""
        with self._lock:
            origin.clients -= 1
            m = self._minor_of(origin)
            if origin.clients or m is None or not m.active or not m.verified or self.stopped:
                return
            if m.tracker is not None and not m.error:
                with origin.gate.closed():
                    self._checkpoint(m.tracker, clean=True)
            m.active = False
            log.info("minor %d: dormant (state %d), %s closed cleanly", m.number, m.state,
                     m.cow_path)
            self.publish()

    @staticmethod
    def _close_list(tracker: CowTracker) -> None:
        """Close a change list cleanly (every mark written, synced, CLEAN), or fail it."""
        try:
            tracker.checkpoint(clean=True)
        except OSError as e:
            tracker.fail(e)
            raise SnapError(e.errno or errno.EIO, f"cannot close {tracker.cow.path} cleanly: "
                            f"{e.strerror or e}; its list is failed")

    @staticmethod
    def _checkpoint(tracker: CowTracker, clean: bool) -> None:
        """Mark a COW file clean or dirty; if it cannot be written, the minor fails (the
        client's connection, and the origin, are not its business)."""
        try:
            tracker.checkpoint(clean)
        except OSError as e:
            tracker.fail(e)

    def _minor_of(self, origin: Origin) -> Minor | None:
        return self.minors.get(origin.minor) if origin.minor is not None else None

    # -- control operations -------------------------------------------------------------
    def setup_snapshot(self, block_device: str, cow_file: str, minor: Any,
                       cache_mb: Any = None, fallocate_mb: Any = None,
                       block_device_path: str | None = None) -> None:
        n = self._minor_number(minor)
        cache = self._cache_bytes(cache_mb)
        with self._lock:
            origin = self._untracked_origin(n, block_device, block_device_path)
            path = self._placed(new_cow_path(self.origins.values(), cow_file))
            fallocate = self._fallocate_bytes(fallocate_mb, origin)
            header = Header(origin.size, uuidlib.uuid4().bytes, 1, fallocate,
                            flags=self._new_flags(), boot_id=boot_id())
            m = Minor(n, origin, path, SNAPSHOT, cache, fallocate, health=Health(self.dirty.set))
            self._install(m, SnapshotTracker, self._create_cow(path, header))
            log.info("minor %d: snapshot of %s set up, COW file %s, limit %d bytes",
                     n, origin.path, path, fallocate)

    def reload_snapshot(self, block_device: str, cow_file: str, minor: Any,
                        cache_mb: Any = None, block_device_path: str | None = None) -> None:
        self._reload(SNAPSHOT, block_device, cow_file, minor, cache_mb, block_device_path)

    def reload_incremental(self, block_device: str, cow_file: str, minor: Any,
                           cache_mb: Any = None, block_device_path: str | None = None) -> None:
        self._reload(INCREMENTAL, block_device, cow_file, minor, cache_mb, block_device_path)

    def _reload(self, mode: str, block_device: str, cow_file: Any, minor: Any, cache_mb: Any,
                block_device_path: str | None) -> None:
        """Expect ``cow_file`` back for the origin: unverified (4/5) until it comes online."""
        n = self._minor_number(minor)
        cache = self._cache_bytes(cache_mb)
        with self._lock:
            origin = self._untracked_origin(n, block_device, block_device_path)
            path = self._placed(reload_cow_path(
                self.origins.values(),
                [(o.number, o.cow_path, o.owned) for o in self.minors.values()], cow_file))
            m = Minor(n, origin, path, mode, cache, verified=False, active=False,
                      health=Health(self.dirty.set))
            self._save_registry({**self.minors, n: m})
            origin.minor = n
            self.minors[n] = m
            log.info("minor %d: reload of %s (%s mode) for %s", n, path, mode, origin.path)
            if origin.clients:  # already online: check it now
                self._verify_reloaded(m)
            self.publish()

    def transition_to_incremental(self, minor: Any) -> None:
        n = self._minor_number(minor)
        with self._lock:
            m = self._get(n)
            if m.mode == INCREMENTAL:
                raise SnapError(errno.EINVAL, f"minor {n} is already in incremental mode")
            m.require_healthy("transition-to-incremental")
            old = m.tracker
            assert isinstance(old, SnapshotTracker)
            origin = m.origin
            m.mode = INCREMENTAL
            try:
                self._save_registry(self.minors)
            except BaseException:
                m.mode = SNAPSHOT
                raise
            with origin.gate.closed():
                old.quiesce()
                try:
                    old.become_incremental(clean=not m.active)
                except OSError as e:  # the COW file cannot be written: the minor fails
                    old.fail(e)
                    m.mode = SNAPSHOT
                    self._save_registry(self.minors)
                    raise
                new = IncrementalTracker(old.cow, origin.io, m.max_cache, m.health)
                origin.tracker = m.tracker = new
            self.publish()
            log.info("minor %d: incremental (state %d), %d blocks changed so far, data of "
                     "%s released", n, m.state, new.nr_changed, m.cow_path)

    def transition_to_snapshot(self, cow_file: str, minor: Any, fallocate_mb: Any = None) -> None:
        n = self._minor_number(minor)
        with self._lock:
            m = self._get(n)
            if m.mode != INCREMENTAL:
                raise SnapError(errno.EINVAL, f"minor {n} is not in incremental mode")
            m.require_healthy("transition-to-snapshot")
            path = self._placed(new_cow_path(self.origins.values(), cow_file))
            old = m.tracker
            assert old is not None
            fallocate = self._fallocate_bytes(fallocate_mb, m.origin)
            h = old.cow.header
            header = Header(h.origin_size, h.uuid, h.seq_id + 1, fallocate,
                            flags=self._new_flags(), boot_id=boot_id())
            cow = self._create_cow(path, header)
            old_path = m.cow_path
            m.cow_path, m.fallocate, m.mode = path, fallocate, SNAPSHOT
            try:
                self._install(m, SnapshotTracker, cow, replacing=old)
            except BaseException:
                m.cow_path, m.mode = old_path, INCREMENTAL
                raise
            old.quiesce()
            old.cow.close()
            log.info("minor %d: snapshot seq_id %d in %s; %s closed with %d changed blocks",
                     n, header.seq_id, path, old_path, old.nr_changed)

    def destroy(self, minor: Any) -> str | None:
        """Stop tracking and forget minor ``minor``; unlink its COW file only if the
        daemon created it or verified it as this minor's. Returns a note for the user
        when a file was left in place."""
        n = self._minor_number(minor)
        with self._lock:
            m = self._get(n)
            self._save_registry({k: v for k, v in self.minors.items() if k != n})
            if m.tracker is not None:
                with m.origin.gate.closed():
                    if m.origin.tracker is m.tracker:
                        m.origin.tracker = None
                m.tracker.quiesce()
                m.tracker.cow.close()
            m.origin.minor = None
            del self.minors[n]
            self.publish()
            note = self._remove_cow(m)
            log.info("minor %d: destroyed; %s", n, note or f"{m.cow_path} removed")
            return note

    @staticmethod
    def _remove_cow(m: Minor) -> str | None:
        """Unlink ``m``'s COW file if it is still the file the daemon owned; else say why not."""
        identity = file_identity(m.cow_path)
        if identity is None:
            return f"{m.cow_path} was not there; nothing removed"
        if m.owned is None or identity != m.owned:
            return (f"{m.cow_path} left in place: the daemon neither created it nor "
                    "verified it as this minor's COW file")
        try:
            os.unlink(m.cow_path)
        except OSError as e:
            log.warning("minor %d: cannot unlink %s: %s", m.number, m.cow_path, e)
            return f"cannot remove {m.cow_path}: {e.strerror}"
        return None

    def reconfigure(self, minor: Any, cache_mb: Any = None) -> None:
        n = self._minor_number(minor)
        cache = self._cache_bytes(cache_mb)
        with self._lock:
            m = self._get(n)
            m.max_cache = cache
            if m.tracker is not None:
                m.tracker.resize_cache(cache)
            self._save_registry(self.minors)
            self.publish()
            log.info("minor %d: index cache limit now %d bytes", n, cache)

    def info(self, minor: Any = None) -> dict:
        with self._lock:
            if minor is None:
                return self._info_doc()
            return self._get(self._minor_number(minor)).info()

    def get_free_minor(self) -> int:
        with self._lock:
            if self.stopped:
                raise SnapError(errno.ESHUTDOWN, "the daemon is shutting down")
            for n in range(self.max_minors):
                if n not in self.minors:
                    return n
            raise SnapError(errno.ENOENT, f"all {self.max_minors} minors are in use")

    # -- helpers of the control operations -------------------------------------------------
    def _install(self, m: Minor, kind: type[CowTracker], cow: CowFile,
                 replacing: CowTracker | None = None) -> None:
        """Put a new tracker on ``m``'s origin, replacing ``replacing``, whose COW file is
        closed cleanly at the very instant of the switch (its change list then holds
        exactly the writes before it).

        Everything that can fail happens before the switch, with the origin's writes
        held back, and is undone on failure (the new COW file removed, the old one
        reopened); from the switch on, writes go to the new tracker and nothing is undone."""
        closed = False
        try:
            tracker = kind(cow, m.origin.io, m.max_cache, m.health)
            if not m.active:
                tracker.checkpoint(clean=True)
            with m.origin.gate.closed():
                if replacing is not None:
                    self._close_list(replacing)
                    closed = True
                m.tracker = tracker
                self._save_registry({**self.minors, m.number: m})
                m.origin.tracker = tracker
        except BaseException:
            m.tracker = replacing
            if closed and m.active and replacing is not None:  # tracking goes on: dirty again
                self._checkpoint(replacing, clean=False)
            cow.close()
            os.unlink(cow.path)
            raise
        m.owned = cow.io.identity()
        m.origin.minor = m.number
        self.minors[m.number] = m
        self.publish()

    def _new_flags(self) -> int:
        return FLAG_DURABLE if self.durable else 0

    def _create_cow(self, path: str, header: Header) -> CowFile:
        try:
            return CowFile.create(path, header, self.opener)
        except FileExistsError:
            raise SnapError(errno.EEXIST, f"{path} already exists; a COW file is never overwritten")
        except OSError as e:
            if isinstance(e, SnapError):
                raise
            raise SnapError(e.errno or errno.EIO, f"cannot create COW file {path}: {e.strerror}")

    def _placed(self, path: str) -> str:
        """``path``, unless its file system is carried by one of our origins (EINVAL):
        every COW write would go through this daemon's own disk and wait for itself."""
        found = carrying_origin(os.path.dirname(path), [o.path for o in self.origins.values()],
                                list(self.origins), self.layout.nbd_socket)
        if found:
            raise SnapError(errno.EINVAL, f"COW file {path} is on a file system carried by "
                            f"{found}: its writes would go through this daemon's own disk; "
                            "put COW files on storage that no origin carries")
        return path

    def _minor_number(self, minor: Any) -> int:
        """Check a minor argument (every control operation starts here)."""
        if self.stopped:
            raise SnapError(errno.ESHUTDOWN, "the daemon is shutting down")
        return minor_number(minor, self.max_minors)

    def _untracked_origin(self, n: int, block_device: Any, path: str | None) -> Origin:
        """For a new minor ``n``: the origin it would track; EBUSY if either is taken."""
        if n in self.minors:
            raise SnapError(errno.EBUSY, f"minor {n} is already in use "
                            f"({self.minors[n].cow_path})")
        origin = find_origin(self.origins.values(), block_device, path)
        if origin.minor is not None:
            raise SnapError(errno.EBUSY, f"origin {origin.path} is already tracked "
                            f"by minor {origin.minor}")
        return origin

    def _get(self, n: int) -> Minor:
        m = self.minors.get(n)
        if m is None:
            raise SnapError(errno.ENOENT, f"minor {n} is not set up")
        return m

    def _cache_bytes(self, cache_mb: Any) -> int:
        mb = megabytes(cache_mb, "-c")
        return mb * MB if mb else self.cache_default

    def _fallocate_bytes(self, fallocate_mb: Any, origin: Origin) -> int:
        mb = megabytes(fallocate_mb, "-f")
        if mb:
            return mb * MB
        return max(MiB, int(origin.size * self.fallocate_percent / 100))

    # -- persistence and info -----------------------------------------------------------
    def _restore(self, entry: dict) -> None:
        """Bring back a registered minor, dormant; a COW file that fails its checks
        leaves the minor failed, with the reason in info and the log."""
        n = entry["minor"]
        origin = self._origin_at(entry["origin"])
        m = Minor(n, origin, entry["cow_file"], entry["mode"], entry["max_cache"],
                  entry["fallocate"], active=False, verified=entry["uuid"] is not None,
                  health=Health(self.dirty.set),
                  uuid=entry["uuid"], seq_id=entry["seq_id"])
        origin.minor = n
        self.minors[n] = m
        if not m.verified:
            log.info("minor %d: reloaded, %s is checked when %s gets its first client",
                     n, m.cow_path, origin.path)
            return
        if isinstance(origin, AbsentOrigin):
            self._fault_at_restart(m, SnapError(errno.ENODEV,
                                                f"origin {origin.path} is not served"))
            return
        try:
            self._resume(m, restart=True, uuid=entry["uuid"], seq_id=entry["seq_id"])
            log.info("minor %d: resumed %s in %s mode (state %d)", n, m.cow_path, m.mode, m.state)
        except SnapError as e:
            self._fault_at_restart(m, e)

    def _resume(self, m: Minor, restart: bool = False, uuid: str | None = None,
                seq_id: int | None = None) -> CowTracker:
        """Open and prove ``m``'s COW file, then track the origin with it. On a restart
        the file's own mode wins over the registry's (the registry is written first, so
        it can be ahead of a transition that a crash interrupted)."""
        cow = open_verified(m.cow_path, m.origin.size, None if restart else m.mode == INCREMENTAL,
                            self.opener, uuid, seq_id, recover=restart)
        m.mode = INCREMENTAL if cow.header.incremental else SNAPSHOT
        kind = IncrementalTracker if m.mode == INCREMENTAL else SnapshotTracker
        tracker = kind(cow, m.origin.io, m.max_cache, m.health)
        m.fallocate = cow.header.fallocate
        with m.origin.gate.closed():
            m.origin.tracker = m.tracker = tracker
        m.verified = True
        m.owned = cow.io.identity()
        return tracker

    def _fault_at_restart(self, m: Minor, e: SnapError) -> None:
        """A registered minor cannot resume: failed; its COW file stays ours (destroy
        may unlink it) only if it still is a file of the minor's chain."""
        self._fault(m, e)
        m.owned = _chain_file(m.cow_path, m.uuid, self.opener)

    def _fault(self, m: Minor, e: SnapError) -> None:
        m.health.fail(e)
        log.error("minor %d: %s; the origin is served untracked", m.number, e)

    def _origin_at(self, path: str) -> Origin:
        for origin in self.origins.values():
            if origin.path == path or origin.real_path == os.path.realpath(path):
                return origin
        return AbsentOrigin(path)

    def _save_registry(self, minors: dict[int, Minor]) -> None:
        self.registry.save([self._registry_entry(minors[n]) for n in sorted(minors)])

    @staticmethod
    def _registry_entry(m: Minor) -> dict:
        uuid, seq_id = m.uuid, m.seq_id  # as recorded, while the COW file is not open
        if m.tracker is not None:
            uuid, seq_id = m.tracker.cow.header.uuid.hex(), m.tracker.cow.header.seq_id
        return {"minor": m.number, "origin": m.origin.path, "cow_file": m.cow_path,
                "mode": m.mode, "max_cache": m.max_cache, "fallocate": m.fallocate,
                "uuid": uuid, "seq_id": seq_id}

    def _info_doc(self) -> dict:
        return {"version": __version__,
                "devices": [m.info() for m in sorted(self.minors.values(), key=lambda m: m.number)]}

    def publish(self) -> None:
        """Rewrite the info file (temp + rename) if its content changed."""
        with self._lock:
            self.dirty.clear()
            text = json.dumps(self._info_doc(), indent=4) + "\n"
            if text == self._published:
                return
            tmp = f"{self.info_path}.tmp"
            try:
                with open(tmp, "w") as f:
                    f.write(text)
                os.rename(tmp, self.info_path)
            except OSError as e:  # info is a view; the operation itself succeeded
                log.error("cannot write %s: %s", self.info_path, e)
                return
            self._published = text


def _chain_file(path: str, uuid: str | None, opener) -> tuple[int, int] | None:
    """The identity of ``path`` if it still is a COW file of chain ``uuid`` (a file the
    daemon made, which failed its checks at a restart), else None."""
    try:
        with CowFile.open(path, opener, writable=False) as cow:
            return cow.io.identity() if cow.header.uuid.hex() == uuid else None
    except OSError:
        return None
