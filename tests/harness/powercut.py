"""A disk that remembers what is durable, to simulate power cuts; and process crashes.

``Disk.opener`` is handed to the engine in place of ``FileIO.open``. Every file it opens
is a real file (so flock, fds and reads work as usual) whose writes are also recorded:
the content as of the last fsync is kept, and the 512-byte sectors written since are
dirty. ``Disk.image()`` then builds what the files would hold after a power cut at
this instant: the durable content, plus, for each dirty 4 KiB page, the new content,
the old one, or (torn) a mix of their sectors. The size of a file is its durable size
or its current one.

A crash of the process alone (kill -9) loses nothing the kernel took: ``crash_image``
keeps the files' current content before anything is closed, ``restore_image`` puts it
back once the engine is gone, and a new engine recovers from what a dead process left.
"""

from __future__ import annotations

import os
import random

from snapengine.fileio import FileIO

SECTOR = 512
PAGE = 4096


class SimFile:
    """One file: its durable pages and size, and the sectors written since the last sync.

    A file the engine opened that existed before starts durable and all zero (the tests
    create origins sparse); a file it created exists only once synced."""

    def __init__(self, path: str, new: bool) -> None:
        self.path = path
        self.durable_pages: dict[int, bytes] = {}  # page -> content as of the last sync
        self.durable_size = 0 if new else os.path.getsize(path)
        self.dirty: set[int] = set()  # sectors written since the last sync
        self.synced_once = not new

    def wrote(self, offset: int, length: int) -> None:
        self.dirty.update(range(offset // SECTOR, (offset + length + SECTOR - 1) // SECTOR))

    def sync(self) -> None:
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            for page in {s * SECTOR // PAGE for s in self.dirty}:
                f.seek(page * PAGE)
                self.durable_pages[page] = f.read(PAGE)
        self.durable_pages = {p: d for p, d in self.durable_pages.items() if p * PAGE < size}
        self.durable_size = size
        self.dirty.clear()
        self.synced_once = True

    def sync_range(self, offset: int, length: int) -> None:
        """An O_DSYNC write of [offset, offset + length) returned: its pages (and the
        size it reaches) are durable, the rest of the file is not (unlike ``sync``)."""
        size = os.path.getsize(self.path)
        pages = range(offset // PAGE, (offset + length + PAGE - 1) // PAGE)
        with open(self.path, "rb") as f:
            for page in pages:
                f.seek(page * PAGE)
                self.durable_pages[page] = f.read(PAGE)
        self.dirty -= set(range(pages.start * PAGE // SECTOR, pages.stop * PAGE // SECTOR))
        self.durable_size = max(self.durable_size, min(size, offset + length))
        self.synced_once = True

    def write_image(self, dst: str, rng: random.Random, torn: bool) -> None:
        """Write to ``dst`` what this file holds after a power cut now."""
        size = rng.choice((self.durable_size, os.path.getsize(self.path)))
        with open(dst, "wb") as out, open(self.path, "rb") as current:
            out.truncate(size)
            for page, data in self.durable_pages.items():
                out.seek(page * PAGE)
                out.write(data[:max(0, size - page * PAGE)])
            for page in sorted({s * SECTOR // PAGE for s in self.dirty}):
                how = rng.choice(("old", "new", "torn") if torn else ("old", "new"))
                for sector in range(page * PAGE // SECTOR, (page + 1) * PAGE // SECTOR):
                    lo = sector * SECTOR
                    if how == "old" or lo >= size or sector not in self.dirty or \
                            (how == "torn" and rng.random() < 0.5):
                        continue
                    current.seek(lo)
                    out.seek(lo)
                    out.write(current.read(min(SECTOR, size - lo)))


class RecordingIO(FileIO):
    """FileIO that reports its writes and syncs to its SimFile; every sync is a cut point."""

    sim: SimFile
    disk: "Disk"

    def pwrite(self, buf, offset: int) -> None:
        super().pwrite(buf, offset)
        self.sim.wrote(offset, memoryview(buf).nbytes)

    def pwrite_dsync(self, buf, offset: int) -> None:
        """RWF_DSYNC: durable on return, that range only; a cut point before and after."""
        n = memoryview(buf).nbytes
        super().pwrite(buf, offset)
        self.sim.wrote(offset, n)
        self.disk.boundary()
        self.sim.sync_range(offset, n)
        self.disk.boundary()

    def fsync(self) -> None:
        self.disk.boundary()
        super().fsync()
        self.sim.sync()
        self.disk.boundary()

    fdatasync = fsync

    def truncate(self, size: int) -> None:
        old = self.size()
        super().truncate(size)
        self.sim.wrote(min(size, old), abs(old - size))

    def punch(self, offset: int, length: int) -> None:
        super().punch(offset, length)
        self.sim.wrote(offset, length)

    def zero(self, offset: int, length: int, may_trim: bool) -> None:
        super().zero(offset, length, may_trim)
        self.sim.wrote(offset, length)


class Disk:
    """Every file the engine opened through ``opener``, and the cut points seen."""

    def __init__(self, on_boundary=None) -> None:
        self.files: dict[str, SimFile] = {}
        self.on_boundary = on_boundary  # called before and after every fsync

    def opener(self, path: str, flags: int, mode: int = 0o600) -> RecordingIO:
        io = RecordingIO.open(path, flags, mode)
        sim = self.files.get(path)
        if sim is None or flags & os.O_CREAT:
            sim = self.files[path] = SimFile(path, new=bool(flags & os.O_CREAT))
        io.sim, io.disk = sim, self
        return io

    def boundary(self) -> None:
        if self.on_boundary is not None:
            self.on_boundary()

    def write_image(self, src_dir: str, dst_dir: str, rng: random.Random, torn: bool) -> None:
        """Recreate under ``dst_dir`` the files under ``src_dir`` as a power cut now would
        leave them (files never synced do not exist; unlinked ones are gone)."""
        for path, sim in self.files.items():
            if sim.synced_once and os.path.exists(path) and path.startswith(src_dir + "/"):
                dst = os.path.join(dst_dir, os.path.relpath(path, src_dir))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                sim.write_image(dst, rng, torn)


# -- process crashes (kill -9): every write the kernel took survives ---------------------

def crash_image(top: str) -> dict[str, bytes]:
    """What a crash of the process (kill -9, same boot) leaves of the files under
    ``top``, taken now, before anything is closed: their whole current content, synced
    or not (the page cache keeps it)."""
    image = {}
    for parent, _, names in os.walk(top):
        for name in names:
            path = os.path.join(parent, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    image[path] = f.read()
    return image


def restore_image(top: str, image: dict[str, bytes]) -> None:
    """Put the files under ``top`` back as ``crash_image`` found them, in place (same
    inodes where the file still exists); files made since are removed. Call it once
    the crashed process's files are closed, as the kernel does when it dies."""
    for parent, _, names in os.walk(top):
        for name in names:
            path = os.path.join(parent, name)
            if path not in image and os.path.isfile(path):
                os.unlink(path)
    for path, data in image.items():
        with open(path, "r+b" if os.path.exists(path) else "wb") as f:
            f.write(data)
            f.truncate(len(data))
