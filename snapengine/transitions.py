"""Every change of a minor's life, each as prepare / persist / commit with its undo.

lifecycle.py defines the steps and which state each operation reaches; engine.py checks
the arguments, picks the transition and runs it under its lock. Each class here is one
row group of that table. ``minors`` is the engine's table (changed only in commit) and
``save`` writes the registry for a table given whole (the one the change would make).
"""

from __future__ import annotations

import errno
import logging
import os
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, Iterator

from . import group
from .arguments import file_identity
from .cowfile import CowFile, Header
from .errors import SnapError
from .lifecycle import Transition
from .minor import ACTIVE, DORMANT, INCREMENTAL, SNAPSHOT, Minor, tracker_kind
from .recovery import open_verified
from .space import Space
from .tracker import CowTracker

log = logging.getLogger(__name__)

Minors = dict[int, Minor]
Save = Callable[[Minors], None]


def create_cow(path: str, header: Header, opener) -> CowFile:
    try:
        return CowFile.create(path, header, opener)
    except FileExistsError:
        raise SnapError(errno.EEXIST, f"{path} already exists; a COW file is never overwritten")
    except SnapError:
        raise
    except OSError as e:
        raise SnapError(e.errno or errno.EIO, f"cannot create COW file {path}: {e.strerror}")


def discard_cow(cow: CowFile) -> None:
    """Close and unlink a COW file this transition created and nobody has used."""
    cow.close()
    os.unlink(cow.path)


def new_tracker(m: Minor, cow: CowFile, mode: str) -> CowTracker:
    return tracker_kind(mode)(cow, m.origin.io, m.max_cache, m.health, m.space)


def restore_header(tracker: CowTracker, clean: bool, flags: int | None = None) -> None:
    """Undo a header write of a list that goes on: write it back as it was (dirty, or
    clean when dormant). If that fails, the header is unknown: the list fails."""
    try:
        tracker.checkpoint(clean, flags=flags)
    except OSError as e:
        tracker.fail(e)
        raise


@contextmanager
def own_file(tracker: CowTracker, what: str) -> Iterator[None]:
    """Steps on the minor's own COW file: an I/O error there is not undone. After a
    failed write or fsync the file cannot be trusted (the kernel may have dropped the
    pages), so the minor fails, as on the data path, and the operation says so."""
    try:
        yield
    except OSError as e:
        if isinstance(e, SnapError) and not tracker.health.tracking:
            raise  # the list failed already, with this error
        tracker.fail(e)
        raise SnapError(e.errno or errno.EIO, f"cannot {what} {tracker.cow.path}: "
                        f"{e.strerror or e}; the minor has failed")


class Install(Transition):
    """setup-snapshot (``header``: a new COW file), transition-to-snapshot (``header``
    and the minor's list, closed at the switch), reload-* (no file: unverified)."""

    def __init__(self, m: Minor, minors: Minors, save: Save, opener,
                 header: Header | None = None) -> None:
        super().__init__([m.origin.gate] if header is not None else [])
        self.m, self.minors, self.save, self.opener = m, minors, save, opener
        self.header = header
        self.old = minors.get(m.number)  # transition-to-snapshot: the minor it replaces
        self.tracker: CowTracker | None = None

    def prepare(self) -> None:
        if self.header is None:
            return
        cow = create_cow(self.m.cow_path, self.header, self.opener)
        self.did(f"creating {cow.path}", lambda: discard_cow(cow))
        self.tracker = new_tracker(self.m, cow, SNAPSHOT)
        if self.m.phase == DORMANT:
            self.tracker.checkpoint(clean=True)

    def persist(self) -> None:
        old = self.old.tracker if self.old is not None else None
        if old is not None:  # its list ends here: every mark written, synced, CLEAN
            was_clean = self.old.phase == DORMANT
            with own_file(old, "close the change list in"):
                old.checkpoint(clean=True)
            self.did(f"closing {old.cow.path}", lambda: restore_header(old, was_clean))
        self.save({**self.minors, self.m.number: replace(self.m, tracker=self.tracker)})

    def commit(self) -> None:
        m, old = self.m, self.old
        m.tracker = m.origin.tracker = self.tracker
        if self.tracker is not None:
            m.owned = self.tracker.cow.io.identity()
        m.origin.minor = m.number
        self.minors[m.number] = m
        if old is not None and old.tracker is not None:
            old.tracker.quiesce()
            old.tracker.cow.close()


def saved_by_group(table: Minors) -> None:
    """The ``save`` of a Group's part: the group saves the registry once, for all."""


class Group(Transition):
    """Several Installs (setup-snapshot, transition-to-snapshot) at one snapshot point
    (INTERFACE §9): every part prepared (its COW file made), then the gates of all their
    origins closed together, every part persisted, the registry saved once with all of
    them, every part switched, the gates opened. A part that fails undoes them all.
    Each part's errors name it (group.part)."""

    def __init__(self, parts: list[Install], names: list[str], minors: Minors,
                 save: Save) -> None:
        super().__init__([g for p in parts for g in p.gates])
        self.parts, self.names, self.minors, self.save = parts, names, minors, save

    def prepare(self) -> None:
        for p, name in zip(self.parts, self.names):
            self.did(name, p.rollback)  # its own steps, newest first, prepare and persist
            with group.part(name, len(self.parts)):
                p.prepare()

    def persist(self) -> None:
        for p, name in zip(self.parts, self.names):
            with group.part(name, len(self.parts)):
                p.persist()
        self.save({**self.minors, **{p.m.number: replace(p.m, tracker=p.tracker)
                                     for p in self.parts}})

    def commit(self) -> None:
        for p in self.parts:
            p.commit()


class ToIncremental(Transition):
    """Keep only the list of changed blocks: index and marks synced, the header says
    incremental (the point of no return for the file), then the data released. After
    an overflow (the list kept) the failure is cleared: a fresh Health from here on."""

    def __init__(self, m: Minor, minors: Minors, save: Save) -> None:
        super().__init__([m.origin.gate])
        self.m, self.minors, self.save = m, minors, save
        self.health = m.health.fresh() if m.error else m.health
        self.new: CowTracker | None = None

    def persist(self) -> None:
        m = self.m
        old = m.snapshot
        assert old is not None
        self.save({**self.minors, m.number: replace(m, mode=INCREMENTAL)})
        self.did("the registry", lambda: self.save(self.minors))
        flags, clean = old.cow.header.flags, m.phase == DORMANT
        with own_file(old, "make incremental"):
            old.mark_incremental(clean, self.health)
            self.did(f"the header of {old.cow.path}", lambda: restore_header(old, clean, flags))
            self.new = new_tracker(replace(m, health=self.health), old.cow, INCREMENTAL)

    def commit(self) -> None:
        m = self.m
        old = m.tracker
        assert old is not None
        old.quiesce()  # snapshot reads in flight end; later ones get ENXIO
        try:
            old.cow.release_data()
        except OSError as e:  # only space is lost: the header says incremental already
            log.warning("minor %d: cannot release the data of %s: %s", m.number, m.cow_path, e)
        m.mode, m.health = INCREMENTAL, self.health
        m.tracker = m.origin.tracker = self.new


class Destroy(Transition):
    """Forget the minor: the registry first, then tracking stops (its COW file closed)."""

    def __init__(self, m: Minor, minors: Minors, save: Save) -> None:
        super().__init__([m.origin.gate] if m.tracker is not None else [])
        self.m, self.minors, self.save = m, minors, save

    def persist(self) -> None:
        self.save({n: v for n, v in self.minors.items() if n != self.m.number})

    def commit(self) -> None:
        m = self.m
        if m.tracker is not None:
            if m.origin.tracker is m.tracker:
                m.origin.tracker = None
            m.tracker.quiesce()
            m.tracker.cow.close()
        m.origin.minor = None
        del self.minors[m.number]

    def remove_cow(self) -> str | None:
        """Unlink the COW file if it is still the one the daemon owned; else say why not."""
        m = self.m
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


class Reconfigure(Transition):
    """A new index cache limit: registry, then the cache resized."""

    def __init__(self, m: Minor, minors: Minors, save: Save, cache: int) -> None:
        super().__init__()
        self.m, self.minors, self.save, self.cache = m, minors, save, cache

    def persist(self) -> None:
        self.save({**self.minors, self.m.number: replace(self.m, max_cache=self.cache)})

    def commit(self) -> None:
        self.m.max_cache = self.cache
        if self.m.tracker is not None:
            try:
                self.m.tracker.resize_cache(self.cache)
            except OSError as e:  # an evicted page's marks cannot be written: as on
                self.m.tracker.fail(e)  # the data path, the list is broken


class Expand(Transition):
    """expand-cow-file: the snapshot's limit raised by ``grow`` bytes, in its header
    (the truth at a restart), then the registry."""

    def __init__(self, m: Minor, minors: Minors, save: Save, grow: int) -> None:
        super().__init__([m.origin.gate])
        self.m, self.minors, self.save, self.grow = m, minors, save, grow

    def persist(self) -> None:
        t = self.m.snapshot
        assert t is not None
        old = t.cow.header.fallocate
        with own_file(t, "raise the limit in"):
            t.cow.write_header(fallocate=old + self.grow)
        self.did(f"the limit of {t.cow.path}", lambda: self._put_back(t, old))
        self.save(self.minors)  # registry_entry reads the limit from the header

    @staticmethod
    def _put_back(t: CowTracker, old: int) -> None:
        try:
            t.cow.write_header(fallocate=old)
        except OSError as e:  # the header is unknown: as in restore_header
            t.fail(e)
            raise

    def commit(self) -> None:
        self.m.fallocate = self.m.limit


class AutoExpand(Transition):
    """reconfigure-auto-expand: the minor's policy, in the registry, then in use."""

    def __init__(self, m: Minor, minors: Minors, save: Save, policy: tuple[int, int]) -> None:
        super().__init__()
        self.m, self.minors, self.save, self.policy = m, minors, save, policy

    def persist(self) -> None:
        space = Space(*self.policy)  # registry_entry reads only the policy
        self.save({**self.minors, self.m.number: replace(self.m, space=space)})

    def commit(self) -> None:
        self.m.space.policy = self.policy


class Resume(Transition):
    """Open and prove a minor's COW file, then track its origin with it: at a restart
    (``restart``: the file's own mode wins, an unclean file is recovered; the minor
    stays dormant) or at the first client of a reloaded minor (it becomes active). A
    file that fails its checks raises (the caller fails the minor: it stays unverified)."""

    def __init__(self, m: Minor, minors: Minors, save: Save, opener,
                 restart: bool = False) -> None:
        super().__init__([] if restart else [m.origin.gate])
        self.m, self.minors, self.save, self.opener = m, minors, save, opener
        self.restart = restart
        self.tracker: CowTracker | None = None

    def prepare(self) -> None:
        m = self.m
        expect = None if self.restart else m.mode == INCREMENTAL
        cow = open_verified(m.cow_path, m.origin.size, expect, self.opener,
                            m.uuid, m.seq_id, recover=self.restart)
        self.did(f"opening {cow.path}", cow.close)
        mode = INCREMENTAL if cow.header.incremental else SNAPSHOT
        self.tracker = new_tracker(m, cow, mode)

    def persist(self) -> None:
        if self.restart:
            return
        assert self.tracker is not None
        try:
            self.tracker.checkpoint(clean=False)  # a client: dirty from now on
        except OSError as e:  # as in Clients: the minor fails, the client goes on
            self.tracker.fail(e)
        h = self.tracker.cow.header
        try:
            self.save({**self.minors, self.m.number: replace(
                self.m, uuid=h.uuid.hex(), seq_id=h.seq_id, fallocate=h.fallocate)})
        except OSError as e:  # the minor works; a restart will need reload-* again
            log.error("minor %d: cannot save the registry: %s", self.m.number, e)

    def commit(self) -> None:
        m, t = self.m, self.tracker
        assert t is not None
        h = t.cow.header
        m.mode = INCREMENTAL if h.incremental else SNAPSHOT
        m.fallocate, m.uuid, m.seq_id = h.fallocate, h.uuid.hex(), h.seq_id
        m.tracker = m.origin.tracker = t
        m.phase = DORMANT if self.restart else ACTIVE
        m.owned = t.cow.io.identity()


class Clients(Transition):
    """The origin's first client came (``active``) or its last one left: the COW file
    is marked dirty or closed cleanly. A header that cannot be written fails the minor,
    not the client's connection."""

    def __init__(self, m: Minor, active: bool) -> None:
        super().__init__([m.origin.gate] if m.tracker is not None and m.health.tracking
                         else [])
        self.m, self.active = m, active

    def persist(self) -> None:
        t = self.m.tracker
        if t is None or not self.m.health.tracking:
            return
        try:
            t.checkpoint(clean=not self.active)
        except OSError as e:
            t.fail(e)

    def commit(self) -> None:
        self.m.phase = ACTIVE if self.active else DORMANT


def chain_file(path: str, uuid: str | None, opener) -> tuple[int, int] | None:
    """The identity of ``path`` if it still is a COW file of chain ``uuid`` (a file the
    daemon made, which failed its checks at a restart), else None."""
    try:
        with CowFile.open(path, opener, writable=False) as cow:
            return cow.io.identity() if cow.header.uuid.hex() == uuid else None
    except OSError:
        return None
