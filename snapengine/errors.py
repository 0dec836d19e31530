"""The one error type that crosses a boundary (control socket, NBD, CLI)."""

from __future__ import annotations

import errno
import os

__all__ = ["SnapError", "errno"]


class SnapError(OSError):
    """An error a user or an NBD client sees; its errno is the contract.

    The caller must not retry blindly: report ``str(e)`` ("<strerror>: <detail>")
    and use ``e.errno`` as the exit status (elioctl) or the NBD error (plugin).
    The state that raised it has not changed.
    """

    def __init__(self, err: int, detail: str) -> None:
        super().__init__(err, os.strerror(err))
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.strerror}: {self.detail}"

    def __reduce__(self):  # keep (errno, detail) through pickling
        return (type(self), (self.errno, self.detail))


class StoreFull(SnapError):
    """The COW store has no room for more saved data (its limit, which cannot grow, or
    a full file system): the snapshot is lost, its change list is not (snapshot.py)."""
