"""Files: sparse images, digests, scratch directories, seeded file-system activity."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import tempfile
from typing import Iterator

DIGEST_CHUNK = 4 << 20  # bytes read at a time


def sparse_file(path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def digest(path) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(DIGEST_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def workdir(parent: str | None, prefix: str = "snapengine-bench-") -> Iterator[str]:
    """A new directory under ``parent`` (default /var/tmp), removed on the way out."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent or "/var/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def churn(top: str, rng: random.Random, operations: int) -> None:
    """Seeded file activity under ``top``: create, grow, overwrite in place, delete, rename."""
    os.makedirs(top, exist_ok=True)
    for _ in range(operations):
        names = sorted(os.listdir(top))
        action = rng.choice(["create", "create", "grow", "overwrite", "delete", "rename"])
        if action == "create" or not names:
            with open(os.path.join(top, f"f{rng.randrange(10**9)}"), "wb") as f:
                f.write(rng.randbytes(rng.randrange(0, 256 * 1024)))
            continue
        path = os.path.join(top, rng.choice(names))
        if action == "grow":
            with open(path, "ab") as f:
                f.write(rng.randbytes(rng.randrange(1, 128 * 1024)))
        elif action == "overwrite":
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.seek(rng.randrange(0, size + 1))
                f.write(rng.randbytes(rng.randrange(1, 64 * 1024)))
        elif action == "delete":
            os.unlink(path)
        else:
            os.rename(path, os.path.join(top, f"r{rng.randrange(10**9)}"))
