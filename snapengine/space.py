"""Room in a COW store: auto-expand (dattobd's semantics) and the "space low" warnings.

A snapshot's saved data may not pass its limit (``fallocate`` in the header, the
``-f`` of setup). ``expand-cow-file`` raises it by hand; with auto-expand on
(``reconfigure-auto-expand STEP``), reaching it raises it by STEP MB as long as RESERVED
MB stay free on the COW file's file system. One ``Space`` belongs to a minor, not to a
COW file: the policy carries over every transition (the registry keeps it).

The tracker asks ``grow`` when an allocation would pass the limit (never under its
lock: grow looks at the file system) and calls ``allocated`` after each allocation; the
answer to "no room" is errors.StoreFull, which fails the snapshot and keeps the list.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any, Callable

from .errors import SnapError, StoreFull
from .units import MB

LOW_DATA = 0.9  # without auto-expand: data past this share of the limit is "space low"
FREE_CHECK_EVERY = 1.0  # seconds between looks at the file system's free space

OnEvent = Callable[..., None]  # on_event(event, **fields)


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still allocate on ``path``'s file system."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def room_for(path: str, size: int) -> None:
    """ENOSPC unless ``path``'s file system has ``size`` bytes free."""
    try:
        free = free_bytes(path)
    except OSError as e:
        raise SnapError(e.errno or errno.EIO, f"cannot see the free space of {path}: "
                        f"{e.strerror}")
    if free < size:
        raise SnapError(errno.ENOSPC, f"the file system of {path} has {free // MB} MB "
                        f"free, less than the {size // MB} MB asked for")


class Space:
    """A minor's auto-expand policy, and the latches of its "space low" events."""

    def __init__(self, step_mb: int = 0, reserved_mb: int = 0,
                 on_event: OnEvent | None = None) -> None:
        self.policy = (step_mb, reserved_mb)  # one tuple: read and replaced atomically
        self.on_event = on_event
        self._low_limit = 0  # the limit "data past 90 %" was told for (once per limit)
        self._low_free = False  # "free below the reserve" told, not yet recovered
        self._next_look = 0.0

    def info(self) -> dict[str, int]:
        step, reserved = self.policy
        return {"step_size_mib": step, "reserved_space_mib": reserved}

    def grow(self, path: str, limit: int, needed: int) -> int:
        """The new limit for ``needed`` bytes of data (> ``limit``), by whole steps; or
        StoreFull (EFBIG) when auto-expand is off or would eat into the reserve."""
        step_mb, reserved_mb = self.policy
        if not step_mb:
            raise StoreFull(errno.EFBIG, f"COW file {path} reached its limit of {limit} "
                            "bytes (-f; auto-expand is off); the snapshot can no longer be kept")
        step, reserved = step_mb * MB, reserved_mb * MB
        grow = -(-(needed - limit) // step) * step
        try:
            free = free_bytes(path)
        except OSError as e:
            raise StoreFull(errno.EFBIG, f"COW file {path} reached its limit of {limit} "
                            f"bytes and its free space cannot be seen: {e.strerror}")
        if free < grow + reserved:
            raise StoreFull(errno.EFBIG, f"COW file {path} reached its limit of {limit} "
                            f"bytes; auto-expand by {grow // MB} MB would leave less than "
                            f"the {reserved_mb} MB reserved ({free // MB} MB free)")
        return limit + grow

    def expanded(self, old: int, new: int, auto: bool) -> None:
        """The limit was raised (and written to the header)."""
        self._tell("expanded", old_limit=old, new_limit=new, auto=auto)

    def allocated(self, path: str, used: int, limit: int) -> None:
        """After an allocation: tell "space low" once per episode (cheap when not)."""
        step_mb, reserved_mb = self.policy
        if not step_mb:
            if used > LOW_DATA * limit and self._low_limit != limit:
                self._low_limit = limit
                self._tell("space-low", free=self._free(path), used=used, limit=limit)
            return
        now = time.monotonic()
        if not reserved_mb or now < self._next_look:
            return
        self._next_look = now + FREE_CHECK_EVERY
        free = self._free(path)
        low = 0 <= free < reserved_mb * MB
        if low and not self._low_free:
            self._tell("space-low", free=free, used=used, limit=limit)
        self._low_free = low

    @staticmethod
    def _free(path: str) -> int:
        try:
            return free_bytes(path)
        except OSError:
            return -1

    def _tell(self, event: str, **fields: Any) -> None:
        if self.on_event is not None:
            self.on_event(event, **fields)
