"""The daemon's persistent registry: which minors exist, so a restart resumes them.

One JSON file in the run directory, replaced atomically (temp, fsync, rename, fsync of
the directory) on every change of a minor's identity or mode. Counters and health are
not in it: the COW file's header carries those.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from .errors import SnapError
from .fileio import atomic_write

REGISTRY_VERSION = 1
FIELDS = ("minor", "origin", "cow_file", "mode", "max_cache", "fallocate", "uuid", "seq_id")


class Registry:
    def __init__(self, path: str) -> None:
        self.path = path

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
            if not isinstance(entry, dict) or set(entry) != set(FIELDS):
                raise SnapError(errno.EUCLEAN, f"registry {self.path}: bad entry {entry!r}")
            entries.append(entry)
        return entries

    def save(self, entries: list[dict[str, Any]]) -> None:
        doc = {"version": REGISTRY_VERSION, "minors": entries}
        atomic_write(self.path, json.dumps(doc, indent=1).encode() + b"\n")

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
