"""The life of a minor: which operation takes which state where, and how a change is made.

``TABLE`` is the state machine (docs/design.md prints it, and a test holds the two
equal): for each operation on an existing minor, each state's new state, or the errno
it is refused with. Creating a minor (setup-snapshot, reload-*) is EBUSY on any state
and gives 3 or 1 (a client or not), 5 or 4. A failed minor (``error`` set) keeps its
state number; only destroy, reconfigure, reconfigure-auto-expand and info apply to it,
and transition-to-incremental when its change list was kept (an overflow).

A ``Transition`` makes one change in three steps, and undoes it in one place:

* ``prepare``: everything that may fail and is not seen by anyone: checks, a new COW
  file, a new tracker. Its undo removes what it made.
* ``persist`` (the origins' writes held back, when the change concerns them): what
  makes the change durable: headers, then the registry, last because its write is
  atomic (temp + rename) and leaves the old one whole when it fails. A restart trusts
  the COW file over the registry (recovery.py), so a registry left ahead is corrected.
* ``commit`` (still held back): the switch in memory; it cannot fail.

``run`` calls them in order; if prepare or persist raises, every undo recorded so far
runs, newest first, and the error is raised as it was: the minor, its files and the
registry are as before. An undo that fails itself is logged; an undo that cannot put a
change list's header back fails that list itself (transitions.restore_header).
"""

from __future__ import annotations

import errno
import logging
from contextlib import ExitStack
from typing import Callable, ContextManager, Iterable

from .errors import SnapError
from .minor import Minor
from .origin import WriteGate

log = logging.getLogger(__name__)

TO_INCREMENTAL = "transition-to-incremental"
TO_SNAPSHOT = "transition-to-snapshot"
DESTROY = "destroy"
RECONFIGURE = "reconfigure"
EXPAND = "expand-cow-file"
AUTO_EXPAND = "reconfigure-auto-expand"
FIRST_CLIENT = "first client"
LAST_CLIENT = "last client leaves"
RESTART = "daemon restart"

_UNVERIFIED = (errno.EINVAL, "is unverified: {op} needs its origin's first client")
_INCREMENTAL = (errno.EINVAL, "is already in incremental mode")
_NOT_INCREMENTAL = (errno.EINVAL, "is not in incremental mode")
_NO_DATA = (errno.EINVAL, "is in incremental mode: it keeps no data, so it has no limit")

# operation -> {state: new state | (errno, why)}; states 0-5 as minor.STATES
TABLE: dict[str, dict[int, int | tuple[int, str]]] = {
    TO_INCREMENTAL: {0: _INCREMENTAL, 1: 0, 2: _INCREMENTAL, 3: 2, 4: _UNVERIFIED, 5: _UNVERIFIED},
    TO_SNAPSHOT: {0: 1, 1: _NOT_INCREMENTAL, 2: 3, 3: _NOT_INCREMENTAL, 4: _UNVERIFIED,
                  5: _UNVERIFIED},
    DESTROY: {0: -1, 1: -1, 2: -1, 3: -1, 4: -1, 5: -1},  # -1: no minor
    RECONFIGURE: {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5},
    EXPAND: {0: _NO_DATA, 1: 1, 2: _NO_DATA, 3: 3, 4: _UNVERIFIED, 5: _UNVERIFIED},
    AUTO_EXPAND: {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5},
    FIRST_CLIENT: {0: 2, 1: 3, 2: 2, 3: 3, 4: 2, 5: 3},  # 4, 5: the COW file is checked
    LAST_CLIENT: {0: 0, 1: 1, 2: 0, 3: 1, 4: 4, 5: 5},
    RESTART: {0: 0, 1: 1, 2: 0, 3: 1, 4: 4, 5: 5},  # the COW file's mode wins
}
REFUSED_WHEN_FAILED = (TO_INCREMENTAL, TO_SNAPSHOT, EXPAND)
ALLOWED_WHEN_KEPT = (TO_INCREMENTAL,)  # a snapshot lost to an overflow kept its list


def require(op: str, m: Minor) -> int:
    """The state ``op`` takes minor ``m`` to; SnapError with the table's errno if the
    table refuses it, or EINVAL if ``m`` has failed and ``op`` needs a healthy minor
    (transition-to-incremental needs only its change list)."""
    target = TABLE[op][m.state]
    if isinstance(target, tuple):
        err, why = target
        raise SnapError(err, f"minor {m.number} (state {m.state}) {why.format(op=op)}")
    if m.error and op in REFUSED_WHEN_FAILED and \
            not (op in ALLOWED_WHEN_KEPT and m.health.kept and m.tracker is not None):
        lost = "; its change list is lost too (a full backup is needed)" \
            if op in ALLOWED_WHEN_KEPT else ""
        raise SnapError(errno.EINVAL, f"minor {m.number} has failed (error {m.error}: "
                        f"{m.why}){lost}; destroy it and set up again")
    return target


class Transition:
    """One change of a minor; subclasses define the steps (each may do nothing)."""

    def __init__(self, gates: Iterable[WriteGate] = ()) -> None:
        self.gates = list(gates)  # closed around persist and commit: one per origin
        # the change concerns (several, for one snapshot point across origins)
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def prepare(self) -> None:
        pass

    def persist(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def did(self, what: str, undo: Callable[[], None]) -> None:
        """Record the undo of a step just done."""
        self._undo.append((what, undo))

    def rollback(self) -> None:
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as e:
                log.error("cannot undo %s: %s", what, e)

    def run(self, hold: Callable[[], ContextManager] | None = None) -> None:
        """Prepare, then persist and commit with the gates closed; ``hold`` (a freeze of
        file systems) is entered after prepare, before the gates, and left after them."""
        try:
            self.prepare()
            with ExitStack() as stack:
                if hold is not None:
                    stack.enter_context(hold())
                for gate in sorted(self.gates, key=id):  # one order: no two swaps deadlock
                    stack.enter_context(gate.closed())
                self.persist()
                self._undo.clear()  # from here on nothing is undone
                self.commit()
        except BaseException:
            self.rollback()
            raise
