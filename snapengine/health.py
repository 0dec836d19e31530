"""A minor's failure: the one place that says whether, and why, it has failed.

Failure is not a state (as in elastio-snap): it is an ``error`` (a negative errno) on
top of one. It is set from the data path (a first touch that cannot save, a snapshot
read that meets bad data) without the engine's lock, and from the control path (a COW
file that fails its checks at a restart or a reload). The first reason is kept.

Two kinds of failure (INTERFACE.md §8):

* the snapshot is lost but its **change list is kept** (``kept``): the COW store
  overflowed (errors.StoreFull). The minor goes on recording changed blocks, and
  transition-to-incremental clears the error (a ``fresh`` Health);
* everything else loses the list as well (``tracking`` is False): the minor is
  destroyed and set up again. A kept list can still be lost later (an I/O error on
  its index); ``reason`` then says both.
"""

from __future__ import annotations

import errno
import threading
from typing import Callable

from .errors import StoreFull


class Health:
    __slots__ = ("error", "reason", "kept", "_lock", "_on_fail")

    def __init__(self, on_fail: Callable[["Health"], None] | None = None) -> None:
        self.error = 0  # 0, or a negative errno once failed (read lock-free)
        self.reason = ""
        self.kept = False  # failed, but the change list goes on (read lock-free)
        self._lock = threading.Lock()
        self._on_fail = on_fail  # told after a change (never takes a lock we hold)

    @property
    def tracking(self) -> bool:
        """The change list is good: not failed, or failed with the list kept."""
        return not self.error or self.kept

    def outcome(self, e: BaseException) -> tuple[int, bool] | None:
        """(error, kept) after ``e`` were recorded, or None if ``e`` changes nothing."""
        if not self.error:
            err = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
            return -err, isinstance(e, StoreFull)
        if self.kept and not isinstance(e, StoreFull):
            return self.error, False
        return None

    def fail(self, e: BaseException) -> bool:
        """Record ``e``; False if it changes nothing (the first failure wins, and only a
        loss of the kept list is added to it)."""
        with self._lock:
            after = self.outcome(e)
            if after is None:
                return False
            if self.error:
                self.reason = f"{self.reason}; then the change list was lost: {e}"
            else:
                self.reason = str(e)
            self.error, self.kept = after
        if self._on_fail is not None:
            self._on_fail(self)
        return True

    def fresh(self) -> "Health":
        """A new, healthy record with the same observer (transition-to-incremental after
        an overflow)."""
        return Health(self._on_fail)
