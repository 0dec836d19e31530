"""Bringing minors back: from the registry at a daemon start, and failing one whose COW
file does not pass its checks (then, or at the first client after a reload).

A minor brought back is dormant (no client yet) with its COW file proven (recovery.py)
by ``transitions.Resume``; one whose file fails is still registered, with ``error`` and
the reason in info and the log, and its origin is served untracked. A snapshot that had
failed by an overflow comes back with its change list (state 1, ``tracking`` true).
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Iterable

from .errors import SnapError
from .minor import DORMANT, UNVERIFIED, Minor
from .observers import Observers
from .origin import AbsentOrigin, Origin
from .transitions import Resume, Save, chain_file

log = logging.getLogger(__name__)


def restore(entry: dict, origins: Iterable[Origin], minors: dict[int, Minor],
            observers: Observers, save: Save, opener) -> None:
    """Register the minor of registry ``entry`` in ``minors`` and resume its COW file."""
    n = entry["minor"]
    origin = origin_at(origins, entry["origin"])
    m = Minor(n, origin, entry["cow_file"], entry["mode"], entry["max_cache"],
              entry["fallocate"], phase=DORMANT if entry["uuid"] else UNVERIFIED,
              health=observers.health(n), space=observers.space(n, tuple(entry["auto_expand"])),
              uuid=entry["uuid"], seq_id=entry["seq_id"])
    origin.minor = n
    minors[n] = m
    if m.phase == UNVERIFIED:
        log.info("minor %d: reloaded, %s is checked when %s gets its first client",
                 n, m.cow_path, origin.path)
        return
    try:
        if isinstance(origin, AbsentOrigin):
            raise SnapError(errno.ENODEV, f"origin {origin.path} is not served")
        Resume(m, minors, save, opener, restart=True).run()
    except SnapError as e:  # failed; its COW file stays ours (destroy may unlink it)
        fail_minor(m, e)  # only if it still is a file of the minor's chain
        m.owned = chain_file(m.cow_path, m.uuid, opener)
        return
    if m.error:
        log.warning("minor %d: resumed %s: its snapshot had failed (error %d), its change "
                    "list is kept (transition-to-incremental goes on with the chain)",
                    n, m.cow_path, m.error)
    else:
        log.info("minor %d: resumed %s in %s mode (state %d)", n, m.cow_path, m.mode, m.state)


def fail_minor(m: Minor, e: SnapError) -> None:
    m.health.fail(e)
    log.error("minor %d: %s; the origin is served untracked", m.number, e)


def origin_at(origins: Iterable[Origin], path: str) -> Origin:
    """The served origin at ``path`` (or a link to it), else a placeholder."""
    for origin in origins:
        if origin.path == path or origin.real_path == os.path.realpath(path):
            return origin
    return AbsentOrigin(path)
