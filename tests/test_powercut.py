"""Power cuts: the engine runs over a disk that knows what is durable (powercut.py); at
every fsync boundary and at random points between operations, the files are rebuilt as
a power cut would leave them (unsynced writes dropped, kept, or torn per sector), a new
engine recovers them under "another boot", and the invariants are checked:

* a snapshot that resumes reads back exactly as the origin was at its snapshot point;
* a change list that resumes (open, or closed in an older COW file) holds every block
  written since its snapshot point (a superset of the truth);
* anything else says it is broken (``error`` set), never silently wrong.

Without --durable, a snapshot interrupted by a power cut must fail; with it, it must
survive. Incremental change tracking survives either way (write-intent record).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import uuid as uuidlib

import pytest

from snapengine import changes
from snapengine.cowfile import HEADER_AREA, CowFile, Header
from snapengine.engine import Engine
from snapengine.errors import SnapError
from snapengine.units import BLOCK_SIZE, MiB, nr_blocks
from tests.harness.powercut import Disk

ORIGIN_SIZE = 3 * 64 * MiB + 12345  # four write-intent regions, an unaligned tail
LAST = nr_blocks(ORIGIN_SIZE) - 1
# Writes land in a window of each region (and the partial last block).
WINDOWS = [range(r * 16384 + 100, r * 16384 + 164) for r in range(3)] + [range(LAST - 40, LAST + 1)]
WINDOW_BLOCKS = sorted(b for w in WINDOWS for b in w)


def block_bytes(content: dict[int, bytes], block: int) -> bytes:
    size = min(BLOCK_SIZE, ORIGIN_SIZE - block * BLOCK_SIZE)
    return content.get(block, bytes(BLOCK_SIZE))[:size]


class Scenario:
    """Random operations on one origin, a model of it, and the checks at each cut."""

    def __init__(self, top: str, seed: int, durable: bool, cut_every: float) -> None:
        self.top = top
        self.rng = random.Random(seed)
        self.durable = durable
        self.cut_every = cut_every
        self.disk = Disk(on_boundary=self.maybe_cut)
        self.origin = os.path.join(top, "disk.img")
        with open(self.origin, "wb") as f:
            f.truncate(ORIGIN_SIZE)
        self.content: dict[int, bytes] = {}  # block -> bytes (absent: zeros)
        self.points: dict[str, tuple[dict[int, bytes], set[int]]] = {}  # cow -> (image, writes)
        self.cow: str | None = None  # the minor's current COW file
        self.mode = ""
        self.cows = 0
        self.stats = {"cuts": 0, "resumed": 0, "failed": 0, "lists": 0}
        self.errors: list[BaseException] = []  # kept, not raised through the engine
        self.engine = Engine(os.path.join(top, "run"), [(self.origin, "disk")], durable=durable,
                             opener=self.disk.opener, max_minors=1)
        self.engine.start()
        self.h = self.engine.open_export("disk", False)

    # -- operations -----------------------------------------------------------------
    def run(self, steps: int) -> None:
        for _ in range(steps):
            op = self.rng.choice(["write"] * 6 + ["zero", "flush", "setup", "incremental",
                                                  "snapshot", "reopen", "destroy"])
            getattr(self, f"op_{op}")()
            if self.rng.random() < self.cut_every:
                self.cut()
        self.h.close()
        self.engine.close()

    def touched(self, blocks) -> None:
        for writes in (self.points[self.cow][1],) if self.cow else ():
            writes.update(blocks)

    def op_write(self) -> None:
        block = self.rng.choice(WINDOW_BLOCKS)
        count = min(self.rng.randint(1, 3), LAST + 1 - block)
        start = block * BLOCK_SIZE + self.rng.choice((0, 512, 1000))
        end = min((block + count) * BLOCK_SIZE - self.rng.choice((0, 100)), ORIGIN_SIZE)
        start = min(start, end - 1)  # the last block holds only a few bytes
        data = self.rng.randbytes(end - start)
        self.h.pwrite(data, start, self.rng.random() < 0.2)
        self.apply(start, data)
        self.touched(range(block, block + count))

    def op_zero(self) -> None:
        block = self.rng.choice(WINDOW_BLOCKS)
        count = min(2, LAST + 1 - block)
        length = min(count * BLOCK_SIZE, ORIGIN_SIZE - block * BLOCK_SIZE)
        held_data = [b for b in range(block, block + count) if any(self.content.get(b, b""))]
        self.h.zero(length, block * BLOCK_SIZE, self.rng.random() < 0.5, False)
        self.apply(block * BLOCK_SIZE, bytes(length))
        self.touched(held_data)  # zeroes over zeroes change nothing: need not be listed

    def apply(self, offset: int, data: bytes) -> None:
        while data:
            block, skip = divmod(offset, BLOCK_SIZE)
            piece = data[:BLOCK_SIZE - skip]
            old = bytearray(self.content.get(block, bytes(BLOCK_SIZE)))
            old[skip:skip + len(piece)] = piece
            self.content[block] = bytes(old)
            offset += len(piece)
            data = data[len(piece):]

    def op_flush(self) -> None:
        self.h.flush()

    def new_point(self) -> str:
        """A snapshot point: flushed first, as an administrator freezes before one."""
        self.h.flush()
        self.cows += 1
        cow = os.path.join(self.top, f"cow{self.cows}")
        self.points[cow] = (dict(self.content), set())
        return cow

    def op_setup(self) -> None:
        if self.cow is None:
            cow = self.new_point()
            self.cow = cow  # before the call: cuts inside it check this point
            try:
                self.engine.setup_snapshot("disk", cow, 0)
            except SnapError:
                self.cow = None
                raise
            self.mode = "snapshot"

    def op_incremental(self) -> None:
        if self.mode == "snapshot" and not self.engine.info(0).get("error"):
            self.engine.transition_to_incremental(0)
            self.mode = "incremental"

    def op_snapshot(self) -> None:
        if self.mode == "incremental" and not self.engine.info(0).get("error"):
            cow = self.new_point()
            self.engine.transition_to_snapshot(cow, 0)
            self.cow, self.mode = cow, "snapshot"

    def op_reopen(self) -> None:
        self.h.close()  # the minor goes dormant: a clean point
        self.h = self.engine.open_export("disk", False)

    def op_destroy(self) -> None:
        if self.cow is not None and self.rng.random() < 0.3:
            self.engine.destroy(0)
            self.cow, self.mode = None, ""

    # -- cuts -----------------------------------------------------------------------
    def maybe_cut(self) -> None:
        if self.rng.random() < self.cut_every:
            self.cut()

    def cut(self) -> None:
        """Check recovery from a power cut now, in a thread of its own (the engine under
        test may be in the middle of an operation on this one). A failed check is kept
        in ``errors``: raising it here would go through the engine under test."""
        if not self.errors:
            worker = threading.Thread(target=self._cut, args=(self.errors,))
            worker.start()
            worker.join()

    def _cut(self, errors: list[BaseException]) -> None:
        try:
            self.stats["cuts"] += 1
            image = os.path.join(self.top, f"cut{self.stats['cuts']}")
            self.disk.write_image(self.top, image, self.rng, torn=self.rng.random() < 0.5)
            self.copy_registry(image)
            self.other_boot(image)
            self.recover(image)
            shutil.rmtree(image)
        except BaseException as e:
            errors.append(e)

    def copy_registry(self, image: str) -> None:
        src = os.path.join(self.top, "run", "registry.json")
        os.makedirs(os.path.join(image, "run"), exist_ok=True)
        if os.path.exists(src):
            with open(src) as f:
                text = f.read().replace(self.top + "/", image + "/")
            with open(os.path.join(image, "run", "registry.json"), "w") as f:
                f.write(text)

    def other_boot(self, image: str) -> None:
        """The files were written under the boot before this one."""
        for name in os.listdir(image):
            path = os.path.join(image, name)
            if not name.startswith("cow"):
                continue
            with open(path, "r+b") as f:
                try:
                    header = Header.unpack(f.read(HEADER_AREA), path)
                except SnapError:
                    continue  # torn: recovery must refuse it
                header.boot_id = uuidlib.uuid4().bytes
                f.seek(0)
                f.write(header.pack())

    def recover(self, image: str) -> None:
        origin = os.path.join(image, "disk.img")
        for name in sorted(os.listdir(image)):  # lists closed before the cut
            if name.startswith("cow"):
                self.check_closed_list(os.path.join(image, name), os.path.join(self.top, name))
        with Engine(os.path.join(image, "run"), [(origin, "disk")], max_minors=1) as e:
            for m in e.minors.values():
                if m.error:  # allowed only for a snapshot that was not durable
                    self.stats["failed"] += 1
                    with CowFile.open(m.cow_path, writable=False) as cow:
                        assert not cow.header.incremental and not self.durable, m.why
                    continue
                self.stats["resumed"] += 1
                cow = m.cow_path
                point = self.points[os.path.join(self.top, os.path.basename(cow))]
                if m.mode == "snapshot":
                    self.check_snapshot(e, point[0])
                    e.transition_to_incremental(0)
                e.transition_to_snapshot(os.path.join(image, "closing"), 0)
                self.check_list(cow, point[1])

    def check_snapshot(self, e: Engine, expected: dict[int, bytes]) -> None:
        snap = e.open_export("elastio-snap0", True)
        for block in WINDOW_BLOCKS:
            want = block_bytes(expected, block)
            got = bytearray(len(want))
            snap.pread(got, block * BLOCK_SIZE)
            assert bytes(got) == want, f"snapshot block {block} differs after a power cut"

    def check_closed_list(self, path: str, original: str) -> None:
        try:
            changed = changes.read_closed(path)
        except SnapError:
            return  # not closed (or not whole): update-img and changed-blocks refuse it
        if changed.header.incremental and original in self.points:
            self.check_list_of(changed, self.points[original][1])

    def check_list(self, path: str, writes: set[int]) -> None:
        self.check_list_of(changes.read_closed(path), writes)

    def check_list_of(self, changed: changes.ChangeList, writes: set[int]) -> None:
        listed = {b for offset, length in changed.byte_extents()
                  for b in range(offset // BLOCK_SIZE, -(-(offset + length) // BLOCK_SIZE))}
        missing = writes - listed
        assert not missing, f"{changed.path}: changed but not listed: {sorted(missing)[:10]}"
        self.stats["lists"] += 1


@pytest.mark.parametrize("durable", [False, True], ids=["plain", "durable"])
@pytest.mark.parametrize("seed", range(6))
def test_power_cuts(tmp_path, seed, durable):
    scenario = Scenario(str(tmp_path), seed, durable, cut_every=0.25)
    scenario.run(60)
    if scenario.errors:
        raise scenario.errors[0]
    stats = scenario.stats
    assert stats["cuts"] >= 20
    print(json.dumps({"seed": seed, "durable": durable, **stats}))
