"""Events: what happens to the minors, pushed at once to whoever watches (elioctl watch).

The engine (control path) and the trackers (data path: a failure, an auto-expand, space
running low) call ``EventBus.emit``. It never blocks and never fails: each watcher has a
bounded queue; a watcher whose queue is full is dropped (its connection is closed, the
log says so), so a slow or dead watcher cannot hold up a write or another watcher.
Events that happen while nobody watches are not kept.

An event is a flat dict: ``time`` (ISO 8601, UTC, milliseconds), ``minor``, ``event``
(one of ``EVENTS``), ``state`` (the minor's state number after the event, None once it
is gone), and the fields of its kind (INTERFACE.md §8).
"""

from __future__ import annotations

import logging
import queue
import threading
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger(__name__)

EVENTS = ("setup", "reload", "verified", "transition-to-incremental",
          "transition-to-snapshot", "destroy", "dormant", "active", "failed", "expanded",
          "space-low")
QUEUE_LIMIT = 1024  # events one watcher may have waiting before it is dropped

Event = dict[str, Any]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Watcher:
    """One subscription: the events of one minor (or all), in the order they happened.
    ``None`` from ``next`` ends it: the daemon stops, or the watcher was dropped."""

    def __init__(self, minor: int | None, limit: int = QUEUE_LIMIT) -> None:
        self.minor = minor
        self.dropped = False  # its queue overflowed: it missed events
        self._queue: queue.Queue[Event | None] = queue.Queue(maxsize=limit)

    def wants(self, minor: int) -> bool:
        return self.minor is None or self.minor == minor

    def offer(self, event: Event | None) -> bool:
        """Queue ``event`` without waiting; False if the queue is full."""
        try:
            self._queue.put_nowait(event)
            return True
        except queue.Full:
            return False

    def next(self, timeout: float | None = None) -> Event | None:
        """The next event; ``queue.Empty`` after ``timeout`` seconds with none."""
        return self._queue.get(timeout=timeout)

    def end(self) -> None:
        """Make ``next`` return None once the events queued before it are read."""
        if not self.offer(None):
            self.dropped = True


class EventBus:
    """Fan-out of events to watchers. ``emit`` takes no lock when nobody watches; the
    watcher list is replaced, never changed in place, so emit reads it lock-free."""

    def __init__(self) -> None:
        self._watchers: tuple[Watcher, ...] = ()
        self._lock = threading.Lock()  # serializes changes of the list
        self.closed = False

    def subscribe(self, minor: int | None = None, limit: int = QUEUE_LIMIT) -> Watcher:
        w = Watcher(minor, limit)
        with self._lock:
            if self.closed:
                w.end()
            else:
                self._watchers += (w,)
        return w

    def unsubscribe(self, w: Watcher) -> None:
        with self._lock:
            self._watchers = tuple(x for x in self._watchers if x is not w)

    def emit(self, minor: int, event: str, state: int | None, **fields: Any) -> None:
        """Push one event to every watcher of ``minor``; never blocks, never raises."""
        watchers = self._watchers
        if not watchers:
            return
        item: Event = {"time": now_iso(), "minor": minor, "event": event, "state": state,
                       **fields}
        for w in watchers:
            if w.wants(minor) and not w.offer(item):
                self._drop(w)

    def _drop(self, w: Watcher) -> None:
        w.dropped = True
        self.unsubscribe(w)
        log.warning("a watcher of %s fell %d events behind and was dropped",
                    "every minor" if w.minor is None else f"minor {w.minor}", QUEUE_LIMIT)

    def close(self) -> None:
        """The daemon stops: every watcher ends after the events it has queued."""
        with self._lock:
            self.closed = True
            watchers, self._watchers = self._watchers, ()
        for w in watchers:
            w.end()
