"""The daemon's persistent registry: which minors exist, so a restart resumes them.

One JSON file in the run directory, replaced atomically (temp, fsync, rename, fsync of
the directory) on every change of a minor's identity or mode: a save that fails leaves
the previous file whole, which is what lets a transition save it last (lifecycle.py). Counters and health are
not in it: the COW file's header carries those.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from .errors import SnapError
from .fileio import FileIO, atomic_write

REGISTRY_VERSION = 1
FIELDS = ("minor", "origin", "cow_file", "mode", "max_cache", "fallocate", "uuid", "seq_id")
DEFAULTS = {"auto_expand": [0, 0]}  # later fields: [step MB, reserved MB]; absent = off
MODES = ("snapshot", "incremental")


def _bad_value(entry: dict[str, Any]) -> str | None:
    """The first field of ``entry`` whose value no daemon writes, or None."""
    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0
    checks = {
        "minor": count(entry["minor"]), "max_cache": count(entry["max_cache"]),
        "fallocate": count(entry["fallocate"]), "mode": entry["mode"] in MODES,
        "origin": isinstance(entry["origin"], str) and entry["origin"] != "",
        "cow_file": isinstance(entry["cow_file"], str) and entry["cow_file"] != "",
        "uuid": entry["uuid"] is None or (isinstance(entry["uuid"], str)
                                          and len(entry["uuid"]) == 32),
        "seq_id": entry["seq_id"] is None or count(entry["seq_id"]),
        "auto_expand": isinstance(entry["auto_expand"], list) and len(entry["auto_expand"]) == 2
        and all(map(count, entry["auto_expand"])),
    }
    return next((k for k, ok in checks.items() if not ok), None)


class Registry:
    def __init__(self, path: str, opener=FileIO.open) -> None:
        self.path = path
        self.opener = opener  # the temp file of every save is opened through it

    def load(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise SnapError(errno.EUCLEAN, f"registry {self.path} is unreadable: {e}")
        if not isinstance(doc, dict) or doc.get("version") != REGISTRY_VERSION or \
                not isinstance(doc.get("minors"), list):
            raise SnapError(errno.EUCLEAN, f"registry {self.path}: not a version "
                            f"{REGISTRY_VERSION} registry")
        entries = []
        for entry in doc["minors"]:
            if not isinstance(entry, dict) or not set(FIELDS) <= set(entry) <= \
                    set(FIELDS) | set(DEFAULTS):
                raise SnapError(errno.EUCLEAN, f"registry {self.path}: bad entry {entry!r}")
            entry = {**DEFAULTS, **entry}
            bad = _bad_value(entry)
            if bad is not None:
                raise SnapError(errno.EUCLEAN, f"registry {self.path}: bad {bad} "
                                f"{entry[bad]!r} in entry {entry!r}")
            entries.append(entry)
        return entries

    def save(self, entries: list[dict[str, Any]]) -> None:
        doc = {"version": REGISTRY_VERSION, "minors": entries}
        atomic_write(self.path, json.dumps(doc, indent=1).encode() + b"\n", self.opener)

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
