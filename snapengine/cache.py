"""A least-recently-used map bounded in bytes."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """Maps keys to values of a fixed cost each, evicting the least recently used
    entry once the total cost would exceed ``max_bytes``.

    ``pinned(value)`` says an entry must not be evicted now; such entries are passed
    over (the cache may then exceed its bound by the pinned entries alone).
    ``dispose(value)`` is called for every entry evicted (to write it back, say).

    Thread-safety: none. The owner serializes every call (the engine calls it with
    its per-minor lock held).
    """

    def __init__(self, max_bytes: int, item_bytes: int,
                 pinned: Callable[[V], bool] = lambda v: False,
                 dispose: Callable[[V], None] = lambda v: None) -> None:
        self._items: OrderedDict[K, V] = OrderedDict()
        self._item_bytes = item_bytes
        self._pinned = pinned
        self._dispose = dispose
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: K) -> bool:
        return key in self._items

    @property
    def bytes(self) -> int:
        return len(self._items) * self._item_bytes

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    @property
    def peek(self) -> Callable[[K], V | None]:
        """``peek(key)``: the value, without making it recent. Safe without the owner's
        lock (one atomic dict lookup, in C), for a caller that can live with a stale
        answer."""
        return self._items.get

    def values(self) -> list[V]:
        return list(self._items.values())

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        self._shrink()

    def resize(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._shrink()

    def _shrink(self) -> None:
        passed = 0  # pinned entries moved to the young end in this pass
        while self.bytes > self.max_bytes and passed < len(self._items):
            key, value = self._items.popitem(last=False)
            if self._pinned(value):
                self._items[key] = value
                passed += 1
            else:
                self._dispose(value)
