"""Registry (registry.py): the run directory's list of minors, which a restart resumes.

Missing means no minor; a file that is not a version-1 registry is EUCLEAN, and the
message names the file (the administrator must look at it: the daemon will not guess).
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from snapengine.errors import SnapError
from snapengine.registry import DEFAULTS, FIELDS, REGISTRY_VERSION, Registry


def entry(minor: int, mode: str = "snapshot") -> dict:
    return {"minor": minor, "origin": f"/srv/disk{minor}.img", "cow_file": f"/var/cow{minor}",
            "mode": mode, "max_cache": 300 << 20, "fallocate": 1 << 20,
            "uuid": f"{minor:032x}", "seq_id": minor + 1, "auto_expand": [minor, 2 * minor]}


def test_a_missing_registry_is_no_minor(tmp_path):
    assert Registry(str(tmp_path / "registry.json")).load() == []


def test_save_then_load_round_trip(tmp_path):
    path = str(tmp_path / "registry.json")
    entries = [entry(0), entry(3, "incremental"), {**entry(7), "uuid": None, "seq_id": None}]
    Registry(path).save(entries)
    assert Registry(path).load() == entries
    Registry(path).save(entries[:1])  # replaced, not appended to
    assert Registry(path).load() == entries[:1]
    with open(path) as f:
        assert json.load(f) == {"version": REGISTRY_VERSION, "minors": entries[:1]}
    assert os.listdir(tmp_path) == ["registry.json"]  # no temporary file left behind


def test_remove(tmp_path):
    path = str(tmp_path / "registry.json")
    registry = Registry(path)
    registry.save([entry(1)])
    registry.remove()
    assert not os.path.exists(path) and registry.load() == []
    registry.remove()  # already gone: fine


CORRUPT = {
    "garbage": b"\x00\xff not json",
    "truncated": b'{"version": 1, "minors": [{"minor": 0',
    "empty": b"",
    "not-utf8": b'{"version": 1, "minors": ["\xff"]}',
}
WRONG = {
    "version-2": {"version": 2, "minors": []},
    "no-version": {"minors": []},
    "version-as-string": {"version": "1", "minors": []},
    "minors-not-a-list": {"version": 1, "minors": {"0": {}}},
    "not-an-object": [1, 2],
    "entry-not-an-object": {"version": 1, "minors": [0]},
    "entry-missing-a-field": {"version": 1, "minors": [
        {k: v for k, v in entry(0).items() if k != "uuid"}]},
    "entry-with-an-extra-field": {"version": 1, "minors": [{**entry(0), "state": 3}]},
}


def expect_euclean(path: str) -> SnapError:
    with pytest.raises(SnapError) as e:
        Registry(path).load()
    assert e.value.errno == errno.EUCLEAN
    assert path in str(e.value), str(e.value)
    return e.value


@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT.keys())
def test_a_corrupt_registry_is_euclean_naming_the_file(tmp_path, content):
    path = str(tmp_path / "registry.json")
    with open(path, "wb") as f:
        f.write(content)
    expect_euclean(path)


@pytest.mark.parametrize("doc", WRONG.values(), ids=WRONG.keys())
def test_a_registry_of_another_shape_is_euclean_naming_the_file(tmp_path, doc):
    path = str(tmp_path / "registry.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    expect_euclean(path)


def test_an_unreadable_registry_is_euclean(tmp_path):
    path = str(tmp_path / "registry.json")
    os.mkdir(path)  # EISDIR on open
    expect_euclean(path)


def test_every_field_is_saved(tmp_path):
    path = str(tmp_path / "registry.json")
    Registry(path).save([entry(2)])
    assert set(Registry(path).load()[0]) == set(FIELDS) | set(DEFAULTS)


def test_an_entry_of_an_older_registry_loads_with_the_defaults(tmp_path):
    """A registry written before auto-expand existed: its minors load, auto-expand off."""
    path = str(tmp_path / "registry.json")
    old = {k: v for k, v in entry(1).items() if k != "auto_expand"}
    with open(path, "w") as f:
        json.dump({"version": REGISTRY_VERSION, "minors": [old]}, f)
    assert Registry(path).load() == [{**old, "auto_expand": [0, 0]}]


BAD_VALUES = {
    "minor-not-a-number": ("minor", "x"), "minor-negative": ("minor", -1),
    "minor-bool": ("minor", True), "cache-not-a-number": ("max_cache", "big"),
    "mode-unknown": ("mode", "weird"), "origin-empty": ("origin", ""),
    "cow-file-not-a-string": ("cow_file", 7), "uuid-short": ("uuid", "abc"),
    "seq-id-not-a-number": ("seq_id", "2"), "fallocate-negative": ("fallocate", -4096),
    "auto-expand-not-a-list": ("auto_expand", 4), "auto-expand-short": ("auto_expand", [4]),
    "auto-expand-negative": ("auto_expand", [4, -1]),
}


@pytest.mark.parametrize("field,value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_a_registry_entry_with_a_value_no_daemon_writes_is_euclean(tmp_path, field, value):
    path = str(tmp_path / "registry.json")
    with open(path, "w") as f:
        json.dump({"version": REGISTRY_VERSION, "minors": [{**entry(0), field: value}]}, f)
    e = expect_euclean(path)
    assert field in str(e)


def test_an_unverified_entry_has_no_uuid_and_loads(tmp_path):
    path = str(tmp_path / "registry.json")
    unverified = {**entry(2), "uuid": None, "seq_id": None}
    Registry(path).save([unverified])
    assert Registry(path).load() == [unverified]
