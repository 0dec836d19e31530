"""The engine: the table of origins and minors, its lock, and its persistence.

Design notes
------------
* Data path: an origin export's writes go to ``Origin`` (origin.py), which asks the
  minor's tracker (tracker.py) to save or record the blocks first. Snapshot exports
  read through ``SnapshotTracker.read``. The engine is not on that path.
* Control path: one lock (``_lock``) serializes control operations, client attach
  and detach, and the info file. The data path never takes it: a tracker that fails
  records it in the minor's ``Health``, which sets ``dirty``; the info refresher
  publishes it within a second.
* Every control operation checks its arguments here (arguments.py), asks
  lifecycle.py whether the minor's state allows it, and runs one transition
  (transitions.py): prepare, persist, commit, or every step undone. A sub-command
  that fails changes nothing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import uuid as uuidlib
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from . import __version__, group
from .arguments import (DEFAULT_CACHE_MB, DEFAULT_FALLOCATE_PERCENT, DEFAULT_MAX_MINORS,
    EXPORT_PREFIX, cache_bytes, check_origin_names, check_settings, expand_megabytes,
    fallocate_bytes, megabytes, minor_number, new_cow_path, placed, reload_cow_path,
    untracked_origin)
from .cowfile import FLAG_DURABLE, Header, boot_id
from .errors import SnapError
from .events import Watcher
from .exports import FailedSnapshotExport, OriginExport, SnapshotExport
from .fileio import FileIO, atomic_write
from .freeze import check_mounts, frozen
from .lifecycle import (AUTO_EXPAND, DESTROY, EXPAND, RECONFIGURE, TO_INCREMENTAL, TO_SNAPSHOT,
    require)
from .minor import ACTIVE, INCREMENTAL, SNAPSHOT, UNVERIFIED, Minor
from .observers import Observers
from .origin import Origin, open_exclusive
from .registry import Registry
from .resume import fail_minor, restore
from .rundir import RunDir, registry_path
from .space import room_for
from .transitions import (AutoExpand, Clients, Destroy, Expand, Group, Install, Reconfigure,
    Resume, ToIncremental, saved_by_group)
from .units import MB

if TYPE_CHECKING:
    from .metrics import OriginRecorders

log = logging.getLogger(__name__)
T = TypeVar("T")


class Engine:
    """Everything the daemon serves. Use as a context manager, or start()/close()."""

    def __init__(self, run_dir: str, origins: list[tuple[str, str]], *,
                 max_minors: int = DEFAULT_MAX_MINORS, cache_default_mb: int = DEFAULT_CACHE_MB,
                 fallocate_percent: float = DEFAULT_FALLOCATE_PERCENT,
                 durable: bool = False, opener=FileIO.open, state_dir: str | None = None) -> None:
        check_settings(max_minors, cache_default_mb, fallocate_percent)
        self.run_dir = run_dir
        self.layout = RunDir(run_dir)
        self.max_minors = max_minors
        self.cache_default = cache_default_mb * MB
        self.fallocate_percent = fallocate_percent
        self.durable = durable  # snapshots survive power cuts (FLAG_DURABLE)
        self.opener = opener  # every file the engine writes is opened through it
        self.origin_specs = origins
        self.origins: dict[str, Origin] = {}
        self.minors: dict[int, Minor] = {}
        self.state_dir = state_dir or run_dir  # the registry: what a reboot must not lose
        self.registry = Registry(registry_path(self.state_dir), opener)
        self.info_path = self.layout.info
        self.observers = Observers(self.minors)  # info refresh, watchers
        self.dirty = self.observers.dirty  # info is stale (set from the data path too)
        self.events = self.observers.events
        self.stopped = False  # shutdown() ran: no more tracking, no more writes
        self.recorders: dict[str, OriginRecorders] = {}  # by origin: serve --metrics only
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
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        try:
            check_origin_names(self.origin_specs)
            for path, name in self.origin_specs:
                self.origins[name] = Origin(path, name, open_exclusive(path, self.opener))
            for entry in self.registry.load():
                restore(entry, self.origins.values(), self.minors, self.observers,
                        self._save, self.opener)
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
                origin.gate.shut()  # no write is in flight from now on
            for m in self.minors.values():
                self._close_tracker(m)
            self.events.close()
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

    @staticmethod
    def _close_tracker(m: Minor) -> None:
        """Take ``m``'s tracker off its origin, close its COW file cleanly."""
        tracker = m.tracker
        if tracker is None:
            return
        m.origin.tracker = None
        tracker.quiesce()
        try:
            tracker.checkpoint(clean=True)
        except OSError as e:
            log.error("minor %d: cannot close %s cleanly: %s", m.number, tracker.cow.path, e)
        tracker.cow.close()

    # -- exports and clients ------------------------------------------------------------
    def export_list(self) -> list[tuple[str, str]]:
        with self._lock:
            out = [(o.name, f"origin {o.path}") for o in self.origins.values()]
            for m in sorted(self.minors.values(), key=lambda m: m.number):
                if m.has_snapshot_export:
                    out.append((m.export_name, f"snapshot of {m.origin.path} (minor {m.number})"))
            return out

    def open_export(self, name: str, readonly: bool):
        with self._lock:
            if self.stopped:
                raise SnapError(errno.ESHUTDOWN, "the daemon is shutting down")
            origin = self.origins.get(name)
            if origin is not None:
                self.attach(origin)
                return OriginExport(origin, readonly, self.detach, self.recorders.get(name))
            m = self._snapshot_minor(name)
            if m is not None and m.snapshot is not None:
                m.readers += 1
                return SnapshotExport(m.snapshot, m.number, m.origin.size,
                                      lambda: self._reader_left(m))
            if m is not None and m.has_snapshot_export:  # failed before tracking
                return FailedSnapshotExport(m.number, m.origin.size, m.why)
            raise SnapError(errno.ENOENT, f"no export named {name!r}")

    def _reader_left(self, m: Minor) -> None:
        with self._lock:
            m.readers -= 1

    def _snapshot_minor(self, name: str) -> Minor | None:
        digits = name[len(EXPORT_PREFIX):]
        if not name.startswith(EXPORT_PREFIX) or not digits.isdecimal() or \
                not digits.isascii() or str(int(digits)) != digits:
            return None
        return self.minors.get(int(digits))

    def attach(self, origin: Origin) -> None:
        """A client connected to ``origin``: a dormant minor becomes active, a reloaded
        one is checked (and becomes active, or fails)."""
        with self._lock:
            origin.clients += 1
            m = self._minor_of(origin)
            if m is None or m.phase == ACTIVE or (m.error and m.tracker is None):
                return
            if m.phase == UNVERIFIED:
                self._verify(m)
            else:
                Clients(m, active=True).run()
            if m.phase == ACTIVE:  # not after a check that failed: it stays unverified
                log.info("minor %d: active (state %d)", m.number, m.state)
                self.observers.tell(m, "active")
            self.publish()

    def _verify(self, m: Minor) -> None:
        try:
            Resume(m, self.minors, self._save, self.opener).run()
        except SnapError as e:
            fail_minor(m, e)
            return
        log.info("minor %d: %s verified", m.number, m.cow_path)
        self.observers.tell(m, "verified")

    def detach(self, origin: Origin) -> None:
        """A client left ``origin``: after the last one the minor goes dormant."""
        with self._lock:
            origin.clients -= 1
            m = self._minor_of(origin)
            if origin.clients or m is None or m.phase != ACTIVE or self.stopped:
                return
            Clients(m, active=False).run()
            log.info("minor %d: dormant (state %d), %s closed cleanly", m.number, m.state,
                     m.cow_path)
            self.observers.tell(m, "dormant")
            self.publish()

    def _minor_of(self, origin: Origin) -> Minor | None:
        return self.minors.get(origin.minor) if origin.minor is not None else None

    # -- control operations -------------------------------------------------------------
    def setup_snapshot(self, block_device: Any, cow_file: Any, minor: Any,
                       cache_mb: Any = None, fallocate_mb: Any = None,
                       block_device_path: Any = None, freeze: Any = None) -> None:
        """A snapshot of each origin named (several: lists, group.columns), all at one
        snapshot point, with the file systems mounted at ``freeze`` frozen around it."""
        parts = group.columns(block_device=block_device, cow_file=cow_file, minor=minor,
                              block_device_path=block_device_path)
        cache = self._cache_bytes(cache_mb)
        with self._lock:
            names = [f"{p['block_device']} {p['cow_file']} {p['minor']}" for p in parts]
            installs = group.build(parts, names, lambda p, seen: self._new_snapshot(
                p, cache, fallocate_mb, seen))
            self._install(installs, names, freeze, [])
            for t in installs:
                m = t.m
                log.info("minor %d: snapshot of %s set up, COW file %s, limit %d bytes",
                         m.number, m.origin.path, m.cow_path, m.fallocate)
                self.observers.tell(m, "setup")

    def _new_snapshot(self, p: dict, cache: int, fallocate_mb: Any, seen: set) -> Install:
        n = self._minor_number(p["minor"])
        group.once("minor", n, seen)
        origin = self._untracked_origin(n, p["block_device"], p["block_device_path"])
        group.once("origin", origin.path, seen)
        path = self._placed(new_cow_path(self.origins.values(), p["cow_file"]))
        group.once("COW file", path, seen)
        fallocate = self._fallocate_bytes(fallocate_mb, origin)
        header = Header(origin.size, uuidlib.uuid4().bytes, 1, fallocate,
                        flags=self._new_flags(), boot_id=boot_id())
        m = Minor(n, origin, path, SNAPSHOT, cache, fallocate, health=self.observers.health(n),
                  space=self.observers.space(n))
        return Install(m, self.minors, saved_by_group, self.opener, header)

    def _install(self, installs: list[Install], names: list[str], freeze: Any,
                 written: list[str]) -> None:
        """Run ``installs`` as one Group: one snapshot point, frozen if asked. Nothing the
        point writes (COW files, the registry and log) may be on a frozen file system."""
        points = check_mounts(
            [] if freeze is None else freeze if isinstance(freeze, list) else [freeze],
            [t.m.cow_path for t in installs] + written + [self.registry.path]
            + [t.m.origin.path for t in installs if not t.m.origin.io.is_block])
        Group(installs, names, self.minors, self._save).run(hold=lambda: frozen(points))
        self.publish()

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
            m = Minor(n, origin, path, mode, cache, phase=UNVERIFIED, health=self.observers.health(n),
                      space=self.observers.space(n))
            Install(m, self.minors, self._save, self.opener).run()
            log.info("minor %d: reload of %s (%s mode) for %s", n, path, mode, origin.path)
            self.observers.tell(m, "reload")
            if origin.clients:  # already online: check it now
                self._verify(m)
            self.publish()

    def transition_to_incremental(self, minor: Any) -> None:
        n = self._minor_number(minor)
        with self._lock:
            m = self._get(n)
            require(TO_INCREMENTAL, m)
            ToIncremental(m, self.minors, self._save).run()
            self.publish()
            log.info("minor %d: incremental (state %d), %d blocks changed so far, data of "
                     "%s released", n, m.state, m.tracker.nr_changed if m.tracker else 0,
                     m.cow_path)
            self.observers.tell(m, TO_INCREMENTAL)

    def transition_to_snapshot(self, cow_file: Any, minor: Any, fallocate_mb: Any = None,
                               freeze: Any = None) -> None:
        """The next snapshot of each minor named (several: lists), at one snapshot point;
        each old COW file is closed with the changes since its own point."""
        parts = group.columns(cow_file=cow_file, minor=minor)
        with self._lock:
            names = [f"{p['cow_file']} {p['minor']}" for p in parts]
            installs = group.build(parts, names, lambda p, seen: self._next_snapshot(
                p, fallocate_mb, seen))
            olds = [t.old for t in installs]
            self._install(installs, names, freeze, [old.cow_path for old in olds])
            for t, old in zip(installs, olds):
                log.info("minor %d: snapshot seq_id %d in %s; %s closed with %d changed "
                         "blocks", t.m.number, t.m.seq_id, t.m.cow_path, old.cow_path,
                         old.tracker.nr_changed)
                self.observers.tell(t.m, TO_SNAPSHOT)

    def _next_snapshot(self, p: dict, fallocate_mb: Any, seen: set) -> Install:
        n = self._minor_number(p["minor"])
        group.once("minor", n, seen)
        old = self._get(n)
        require(TO_SNAPSHOT, old)
        path = self._placed(new_cow_path(self.origins.values(), p["cow_file"]))
        group.once("COW file", path, seen)
        assert old.tracker is not None
        fallocate = self._fallocate_bytes(fallocate_mb, old.origin)
        h = old.tracker.cow.header
        header = Header(h.origin_size, h.uuid, h.seq_id + 1, fallocate,
                        flags=self._new_flags(), boot_id=boot_id())
        m = replace(old, cow_path=path, mode=SNAPSHOT, fallocate=fallocate, tracker=None,
                    owned=None, readers=0, seq_id=h.seq_id + 1)  # the old snapshot's
        return Install(m, self.minors, saved_by_group, self.opener, header)  # readers: old

    def destroy(self, minor: Any) -> str | None:
        """Stop tracking and forget minor ``minor``; unlink its COW file only if the
        daemon created it or verified it as this minor's. Returns a note for the user
        when a file was left in place."""
        n = self._minor_number(minor)
        with self._lock:
            m = self._get(n)
            require(DESTROY, m)
            t = Destroy(m, self.minors, self._save)
            t.run()
            self.publish()
            notes = [t.remove_cow()]
            if m.readers:  # allowed, as elastio-snap does; but a mounted snapshot breaks
                notes.insert(0, f"{m.export_name} had {m.readers} open connection(s) "
                             "(a mounted snapshot?): their reads fail from now on")
                log.warning("minor %d: destroyed with %d clients on %s", n, m.readers,
                            m.export_name)
            note = "; ".join(filter(None, notes)) or None
            log.info("minor %d: destroyed; %s", n, note or f"{m.cow_path} removed")
            self.events.emit(n, DESTROY, None)
            return note

    def reconfigure(self, minor: Any, cache_mb: Any = None) -> None:
        n = self._minor_number(minor)
        cache = self._cache_bytes(cache_mb)
        with self._lock:
            m = self._get(n)
            require(RECONFIGURE, m)
            Reconfigure(m, self.minors, self._save, cache).run()
            self.publish()
            log.info("minor %d: index cache limit now %d bytes", n, cache)

    def expand_cow_file(self, minor: Any, size_mb: Any) -> None:
        """Raise a snapshot's COW limit by ``size_mb`` MB, live; ENOSPC (nothing changed)
        if the COW file's file system has less than that free."""
        n = self._minor_number(minor)
        grow = expand_megabytes(size_mb) * MB
        with self._lock:
            m = self._get(n)
            require(EXPAND, m)
            room_for(m.cow_path, grow)
            old = m.limit
            Expand(m, self.minors, self._save, grow).run()
            self.publish()
            log.info("minor %d: limit of %s raised from %d to %d bytes", n, m.cow_path, old,
                     m.limit)
            m.space.expanded(old, m.limit, auto=False)

    def reconfigure_auto_expand(self, minor: Any, step_mb: Any, reserved_mb: Any = None) -> None:
        """Auto-expand by ``step_mb`` MB (0: off) while ``reserved_mb`` MB stay free."""
        n = self._minor_number(minor)
        policy = (megabytes(step_mb, "<step MB>"), megabytes(reserved_mb, "-r"))
        with self._lock:
            m = self._get(n)
            require(AUTO_EXPAND, m)
            AutoExpand(m, self.minors, self._save, policy).run()
            self.publish()
            log.info("minor %d: auto-expand %s", n, f"by {policy[0]} MB, {policy[1]} MB "
                     "reserved" if policy[0] else "off")

    def watch(self, minor: Any = None) -> Watcher:
        """Subscribe to the events of minor ``minor`` (it need not exist yet) or of all."""
        n = None if minor is None else self._minor_number(minor)
        return self.events.subscribe(n)

    def info(self, minor: Any = None) -> dict:
        with self._lock:
            if minor is None:
                return self._info_doc()
            return self._get(self._minor_number(minor)).info()

    def sample(self, read: Callable[[Minor], T]) -> list[T]:
        """``read`` of every minor, by number, under the lock ``info`` takes (metrics)."""
        with self._lock:
            return [read(self.minors[n]) for n in sorted(self.minors)]

    def get_free_minor(self) -> int:
        with self._lock:
            if self.stopped:
                raise SnapError(errno.ESHUTDOWN, "the daemon is shutting down")
            for n in range(self.max_minors):
                if n not in self.minors:
                    return n
            raise SnapError(errno.ENOENT, f"all {self.max_minors} minors are in use")

    # -- argument checks ------------------------------------------------------------------
    def _minor_number(self, minor: Any) -> int:
        """Check a minor argument (every control operation starts here)."""
        if self.stopped:
            raise SnapError(errno.ESHUTDOWN, "the daemon is shutting down")
        return minor_number(minor, self.max_minors)

    def _untracked_origin(self, n: int, block_device: Any, path: str | None) -> Origin:
        return untracked_origin(self.origins.values(), self.minors, n, block_device, path)

    def _placed(self, path: str) -> str:
        return placed(path, list(self.origins.values()), self.layout.nbd_socket)
    def _get(self, n: int) -> Minor:
        m = self.minors.get(n)
        if m is None:
            raise SnapError(errno.ENOENT, f"minor {n} is not set up")
        return m

    def _cache_bytes(self, cache_mb: Any) -> int:
        return cache_bytes(cache_mb, self.cache_default, MB)

    def _fallocate_bytes(self, fallocate_mb: Any, origin: Origin) -> int:
        return fallocate_bytes(fallocate_mb, origin, self.fallocate_percent, MB)

    def _new_flags(self) -> int:
        return FLAG_DURABLE if self.durable else 0

    # -- persistence and info -----------------------------------------------------------
    def _save(self, minors: dict[int, Minor]) -> None:
        self.registry.save([minors[n].registry_entry() for n in sorted(minors)])

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
            try:
                atomic_write(self.info_path, text.encode(), self.opener, durable=False)
            except OSError as e:  # info is a view; the operation itself succeeded
                log.error("cannot write %s: %s", self.info_path, e)
                return
            self._published = text
