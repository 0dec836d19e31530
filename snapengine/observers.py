"""Who hears about a minor: the info file (refreshed) and the watchers (events.py).

A minor's ``Health`` and ``Space`` are made here, with callbacks that tell both: they
are called from the data path (a failure, an auto-expand, space running low), so they
take no lock and never block. The control path tells its own events (``tell``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .events import EventBus
from .health import Health
from .minor import Minor
from .space import Space

log = logging.getLogger(__name__)


class Observers:
    def __init__(self, minors: dict[int, Minor]) -> None:
        self.minors = minors  # the engine's table, read lock-free
        self.dirty = threading.Event()  # info is stale (set from the data path too)
        self.events = EventBus()  # elioctl watch: pushed as things happen, never queued

    def health(self, n: int) -> Health:
        """Minor ``n``'s failure record."""
        def failed(h: Health) -> None:
            self.dirty.set()
            self.tell_number(n, "failed", error=h.error, tracking=h.tracking, reason=h.reason)
        return Health(failed)

    def space(self, n: int, policy: tuple[int, int] = (0, 0)) -> Space:
        """Minor ``n``'s auto-expand policy."""
        def told(event: str, **fields: Any) -> None:
            self.dirty.set()
            if event == "space-low":
                log.warning("minor %d: COW space low: %s", n, fields)
            self.tell_number(n, event, **fields)
        return Space(*policy, on_event=told)

    def tell(self, m: Minor, event: str, **fields: Any) -> None:
        self.events.emit(m.number, event, m.state, **fields)

    def tell_number(self, n: int, event: str, **fields: Any) -> None:
        m = self.minors.get(n)
        self.events.emit(n, event, m.state if m is not None else None, **fields)
