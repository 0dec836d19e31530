"""A minor's failure: the one place that says whether, and why, it has failed.

Failure is not a state (as in elastio-snap): it is an ``error`` (a negative errno) on
top of one. It is set from the data path (a first touch that cannot save, a snapshot
read that meets bad data) without the engine's lock, and from the control path (a COW
file that fails its checks at a restart or a reload). The first reason is kept; a
minor never recovers: it is destroyed and set up again.
"""

from __future__ import annotations

import errno
import threading
from typing import Callable


class Health:
    __slots__ = ("error", "reason", "_lock", "_on_fail")

    def __init__(self, on_fail: Callable[[], None] | None = None) -> None:
        self.error = 0  # 0, or a negative errno once failed (read lock-free)
        self.reason = ""
        self._lock = threading.Lock()
        self._on_fail = on_fail  # told after the first failure (never takes a lock we hold)

    def fail(self, e: BaseException) -> bool:
        """Record ``e`` as the failure; False if it had already failed (first wins)."""
        err = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
        with self._lock:
            if self.error:
                return False
            self.error, self.reason = -err, str(e)
        if self._on_fail is not None:
            self._on_fail()
        return True

