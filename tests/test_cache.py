"""LRUCache (cache.py): bounded in bytes, least recently used out first, pinned entries
passed over, ``dispose`` told of every eviction, and a bound that can change."""

from __future__ import annotations

from snapengine.cache import LRUCache

ITEM = 100  # bytes per entry


def make(entries: int, pinned: set | None = None) -> tuple[LRUCache, list]:
    """A cache with room for ``entries`` entries; returns it and the list of disposed values."""
    disposed: list = []
    pins = pinned if pinned is not None else set()
    cache = LRUCache(entries * ITEM, ITEM, pinned=lambda v: v in pins, dispose=disposed.append)
    return cache, disposed


def fill(cache: LRUCache, keys) -> None:
    for k in keys:
        cache.put(k, f"v{k}")


def test_stays_within_its_bound_evicting_the_oldest():
    cache, disposed = make(3)
    fill(cache, range(5))
    assert len(cache) == 3 and cache.bytes == 3 * ITEM <= cache.max_bytes
    assert disposed == ["v0", "v1"]
    assert 0 not in cache and 1 not in cache and cache.get(0) is None
    assert [cache.get(k) for k in (2, 3, 4)] == ["v2", "v3", "v4"]


def test_get_makes_an_entry_recent_peek_does_not():
    cache, disposed = make(3)
    fill(cache, range(3))
    assert cache.get(0) == "v0"  # 1 is now the oldest
    cache.put(3, "v3")
    assert disposed == ["v1"]
    assert cache.peek(2) == "v2"  # still the oldest
    cache.put(4, "v4")
    assert disposed == ["v1", "v2"]
    assert cache.peek(99) is None


def test_put_of_a_present_key_replaces_it_without_growing():
    cache, disposed = make(2)
    fill(cache, [0, 1])
    cache.put(0, "new")  # and makes it recent
    assert len(cache) == 2 and cache.get(0) == "new"
    cache.put(2, "v2")
    assert disposed == ["v1"]


def test_pinned_entries_stay():
    pins = {"v0", "v1"}
    cache, disposed = make(3, pins)
    fill(cache, range(6))
    assert 0 in cache and 1 in cache  # the oldest, but pinned
    assert disposed == ["v2", "v3", "v4"]
    assert sorted(cache.values()) == ["v0", "v1", "v5"]
    assert cache.bytes <= cache.max_bytes


def test_all_pinned_exceeds_the_bound_until_unpinned():
    pins = {f"v{k}" for k in range(4)}
    cache, disposed = make(2, pins)
    fill(cache, range(4))
    assert len(cache) == 4 and disposed == []  # over the bound by the pinned entries alone
    pins.clear()
    cache.put(4, "v4")
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    assert len(disposed) == 3 and "v4" not in disposed and 4 in cache


def test_resize_shrinks_with_dispose_and_grows_without():
    cache, disposed = make(4)
    fill(cache, range(4))
    cache.resize(2 * ITEM)
    assert disposed == ["v0", "v1"] and len(cache) == 2
    cache.resize(10 * ITEM)
    fill(cache, range(10, 18))
    assert len(cache) == 10 and disposed == ["v0", "v1"]
    cache.resize(0)
    assert len(cache) == 0 and cache.bytes == 0
    assert disposed[:2] == ["v0", "v1"] and len(disposed) == 12


def test_resize_passes_over_pinned_entries():
    pins = {"v1"}
    cache, disposed = make(3, pins)
    fill(cache, range(3))
    cache.resize(ITEM)
    assert list(cache.values()) == ["v1"] and disposed == ["v0", "v2"]
