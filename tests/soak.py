"""Soak: a real daemon under concurrent load, through a loop of transitions.

    .venv/bin/python -m tests.soak --minutes 10 [--size-mib 32] [--writers 3] [--readers 3]

from the repository root (``make soak`` runs it). The same code runs in CI for under a
minute (tests/test_soak.py).

What runs at once
-----------------
* Writer threads, each with its own libnbd connection to the origin, each owning a
  block-aligned region of it: writes (some with FUA, some unaligned), write-zeroes
  and flushes, each logged before it is sent (so the log is the order of the origin's
  changes in that region). No trims: what a trimmed range reads is unspecified (during a
  snapshot the daemon drops them), so the model could not check the origin after one;
  tests/test_trim.py and the engine model cover them.
* Reader threads, each with its own connection to ``elastio-snap0``, reading random
  ranges and comparing every block (xxhash per block) with the image frozen at the
  snapshot point.
* The controller: a loop of transitions, chosen at random: transition-to-incremental,
  transition-to-snapshot into a new COW file, destroy + setup-snapshot (a new chain).

What is checked
---------------
* The snapshot point. Writers keep writing while a command runs, so for each writer
  the point lies between its last write acknowledged before the command and its first
  write sent after it. The new snapshot is read in full and must equal, region by
  region, the origin after some prefix of that window (each write wholly before or
  wholly after the point). That image is then frozen: every later reader block must
  match it, for as long as the snapshot lives.
* Changed blocks. When transition-to-snapshot closes the previous COW file,
  ``elioctl changed-blocks`` on it must list every block written between the two
  snapshot points (a superset), and ``update-img`` must turn the backup image of the
  previous snapshot into exactly the new one.
* The origin: at the end it holds every acknowledged write (compared with the model).
* ``info`` never shows ``error``; the daemon exits 0 on SIGTERM, and its log has no
  traceback and no ERROR line.

Exit status 0 when everything held; the operations done are printed either way.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import nbd  # type: ignore[import-untyped]
import xxhash

from tests.harness import Daemon, connect, export_names, run, shutdown_quietly

BLOCK = 4096
MiB = 1 << 20
READ_CHUNK = 4 * MiB
HOT_WINDOW = 1 * MiB  # most of a writer's changes land in a window of its region
EXPORT = "elastio-snap0"
_hash = xxhash.xxh3_64_intdigest


class SoakFailure(AssertionError):
    """A rule was broken: the message says which, where and what was seen."""


def block_hashes(image) -> list[int]:
    view = memoryview(image)
    return [_hash(view[o:o + BLOCK]) for o in range(0, len(view), BLOCK)]


def blocks_of(offset: int, length: int) -> range:
    return range(offset // BLOCK, (offset + length + BLOCK - 1) // BLOCK)


@dataclass
class Stats:
    writes: int = 0
    zeroes: int = 0
    flushes: int = 0
    bytes_written: int = 0
    reads: int = 0
    blocks_verified: int = 0
    bytes_read: int = 0
    setups: int = 0
    to_incremental: int = 0
    to_snapshot: int = 0
    destroys: int = 0
    full_snapshot_checks: int = 0
    ambiguous_writes: int = 0  # in flight across a snapshot point, resolved by content
    lists_checked: int = 0
    blocks_required: int = 0  # written between two points: must be listed
    blocks_listed: int = 0
    blocks_per_list: int = 0  # the origin's blocks, times the lists checked
    update_imgs: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if k != "failures"}
        d["seconds"] = round(self.seconds, 1)
        d["MiB_written"] = round(self.bytes_written / MiB, 1)
        d["MiB_read"] = round(self.bytes_read / MiB, 1)
        del d["bytes_written"], d["bytes_read"]
        return ", ".join(f"{k} {v}" for k, v in d.items())


# -- writers ------------------------------------------------------------------------------

class Writer(threading.Thread):
    """Changes its region [lo, hi) of the origin until told to stop.

    ``log`` holds the changes sent, in order (kind, offset, length, data), indexed from
    ``base``; an entry is appended before the request is sent, and ``acked`` counts
    those answered."""

    def __init__(self, soak: Soak, number: int, lo: int, hi: int, content: bytes) -> None:
        super().__init__(name=f"writer{number}", daemon=True)
        self.soak = soak
        self.lo, self.hi = lo, hi
        self.rng = random.Random(soak.seed * 1000 + number)
        self.h = connect(soak.d.uri("disk0"))
        self.lock = threading.Lock()
        self.log: list[tuple[str, int, int, bytes | None]] = []
        self.base = 0
        self.acked = 0
        self.shadow = bytearray(content)  # the region after ``shadow_at`` changes
        self.shadow_at = 0
        self.hot = self.rng.randrange(0, max(1, hi - lo - HOT_WINDOW))  # hot window start
        self.counts: Counter[str] = Counter()

    @property
    def started(self) -> int:
        with self.lock:
            return self.base + len(self.log)

    def entries(self, start: int, end: int) -> list:
        with self.lock:
            return self.log[start - self.base:end - self.base]

    def forget_before(self, index: int) -> None:
        with self.lock:
            del self.log[:index - self.base]
            self.base = index

    def next_change(self) -> tuple[str, int, int, bytes | None, int]:
        """Mostly small changes in a hot window that wanders, some anywhere in the region:
        so each interval between two snapshots changes part of the origin, not all."""
        rng, size = self.rng, self.hi - self.lo
        kind = rng.choices(("write", "fua", "zero", "flush"), (80, 6, 10, 4))[0]
        length = min(size, rng.choices((512, BLOCK, 2 * BLOCK, 3 * BLOCK + 100, 16 * BLOCK,
                                        64 * 1024, 256 * 1024), (15, 40, 15, 15, 8, 5, 2))[0])
        if rng.random() < 0.0005:
            self.hot = rng.randrange(0, max(1, size - HOT_WINDOW))
        if rng.random() < 0.97:
            lo, hi = self.lo + self.hot, min(self.hi, self.lo + self.hot + HOT_WINDOW)
        else:
            lo, hi = self.lo, self.hi
        offset = lo + rng.randrange(0, max(1, hi - lo - length + 1))
        offset = min(offset, self.hi - length)
        if rng.random() < 0.7:
            offset -= (offset - self.lo) % 512
        data = rng.randbytes(length) if kind in ("write", "fua") else None
        return kind, offset, length, data, nbd.CMD_FLAG_FUA if kind == "fua" else 0

    def run(self) -> None:
        counts = self.counts
        try:
            while not self.soak.stop.is_set():
                kind, offset, length, data, flags = self.next_change()
                if kind == "flush":
                    self.h.flush()
                    counts["flushes"] += 1
                    continue
                with self.lock:
                    self.log.append((kind, offset, length, data))
                if data is not None:
                    self.h.pwrite(data, offset, flags)
                    counts["writes"] += 1
                else:
                    self.h.zero(length, offset)  # may punch a hole (no NO_HOLE flag)
                    counts["zeroes"] += 1
                counts["bytes_written"] += length
                self.acked += 1
        except nbd.Error as e:  # the origin must take every change
            self.soak.fail(f"{self.name}: origin {kind} of {length} bytes at {offset} failed: {e}")
        finally:
            shutdown_quietly(self.h)

    # -- the model, advanced by the controller ---------------------------------------
    def apply(self, region: bytearray, entry):
        """Apply one change to ``region``; return the blocks it may have changed: a
        write's, and those where a write-zeroes met bytes that were not zeros (zeros over
        zeros change nothing, and the daemon need not list them)."""
        _, offset, length, data = entry
        lo = offset - self.lo
        if data is None:
            blocks = [b for b in blocks_of(offset, length)
                      if any(region[max(lo, (b * BLOCK) - self.lo):
                                    min(lo + length, (b + 1) * BLOCK - self.lo)])]
            region[lo:lo + length] = bytes(length)
            return blocks
        region[lo:lo + length] = data
        return blocks_of(offset, length)

    def advance(self, index: int) -> set[int]:
        """Bring the shadow up to ``index`` changes; return the blocks they touched."""
        touched: set[int] = set()
        for entry in self.entries(self.shadow_at, index):
            touched.update(self.apply(self.shadow, entry))
        self.shadow_at = max(self.shadow_at, index)
        return touched

    def cuts(self, image: memoryview, first: int, last: int) -> list[int]:
        """Every j in [first, last] such that the region after j changes equals
        ``image`` (the snapshot's bytes of this region)."""
        state = bytearray(self.shadow)
        assert self.shadow_at == first
        nr = (len(state) + BLOCK - 1) // BLOCK
        base = self.lo // BLOCK

        def differs(b: int) -> bool:
            lo, hi = (b - base) * BLOCK, (b - base + 1) * BLOCK
            return state[lo:hi] != image[lo:hi]

        bad = {base + i for i in range(nr) if differs(base + i)}
        found = [first] if not bad else []
        for j, entry in enumerate(self.entries(first, last), start=first + 1):
            for b in self.apply(state, entry):
                if differs(b):
                    bad.add(b)
                else:
                    bad.discard(b)
            if not bad:
                found.append(j)
        if not found:
            self.soak.fail(f"{self.name}: the new snapshot is not the origin at any point "
                           f"between change {first} and {last}: blocks {sorted(bad)[:10]} differ "
                           f"from the origin after change {last}")
        return found


# -- readers ------------------------------------------------------------------------------

@dataclass
class Epoch:
    """One snapshot's frozen image."""

    number: int
    image: bytes
    hashes: list[int]


class ReaderGate:
    """Readers read only while an epoch is open; ``close`` waits for reads in flight."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.epoch: Epoch | None = None
        self.busy = 0

    def begin(self, stop: threading.Event) -> Epoch | None:
        with self.cond:
            while self.epoch is None and not stop.is_set():
                self.cond.wait(0.1)
            if stop.is_set():
                return None
            self.busy += 1
            return self.epoch

    def end(self) -> None:
        with self.cond:
            self.busy -= 1
            self.cond.notify_all()

    def open(self, epoch: Epoch) -> None:
        with self.cond:
            self.epoch = epoch
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.epoch = None
            while self.busy:
                self.cond.wait()


class Reader(threading.Thread):
    def __init__(self, soak: Soak, number: int) -> None:
        super().__init__(name=f"reader{number}", daemon=True)
        self.soak = soak
        self.rng = random.Random(soak.seed * 1000 + 500 + number)
        self.counts: Counter[str] = Counter()

    def run(self) -> None:
        soak, h, connected_to = self.soak, None, None
        try:
            while True:
                epoch = soak.gate.begin(soak.stop)
                if epoch is None:
                    return
                try:
                    if connected_to != epoch.number:
                        shutdown_quietly(h)
                        h, connected_to = connect(soak.d.uri(EXPORT)), epoch.number
                    self.read_once(h, epoch)
                finally:
                    soak.gate.end()
        except nbd.Error as e:
            soak.fail(f"{self.name}: snapshot read failed in epoch {connected_to}: {e}")
        finally:
            shutdown_quietly(h)

    def read_once(self, h: nbd.NBD, epoch: Epoch) -> None:
        size, rng, counts = self.soak.size, self.rng, self.counts
        if rng.random() < 0.1:  # unaligned: compare bytes
            length = rng.randrange(1, 3 * BLOCK)
            offset = rng.randrange(0, size - length + 1)
            data = h.pread(length, offset)
            if data != epoch.image[offset:offset + length]:
                self.soak.fail(f"{self.name}: snapshot bytes [{offset}, +{length}) differ from "
                               f"the frozen image of epoch {epoch.number}")
        else:
            nr = (size + BLOCK - 1) // BLOCK
            count = min(nr, rng.choice((1, 4, 16, 64, 256)))
            first = rng.randrange(0, nr - count + 1)
            if rng.random() < 0.5:  # where the writers are busy: first touches race reads
                w = rng.choice(self.soak.writers)
                first = min(nr - count, (w.lo + w.hot) // BLOCK + rng.randrange(HOT_WINDOW // BLOCK))
            offset = first * BLOCK
            length = min(count * BLOCK, size - offset)
            data = h.pread(length, offset)
            got = block_hashes(data)
            want = epoch.hashes[first:first + count]
            if got != want:
                b = next(i for i in range(count) if got[i] != want[i])
                self.soak.fail(f"{self.name}: snapshot block {first + b} reads {got[b]:#x}, "
                               f"frozen at {want[b]:#x} (epoch {epoch.number})")
            counts["blocks_verified"] += count
        counts["reads"] += 1
        counts["bytes_read"] += length


# -- the controller -------------------------------------------------------------------------

class Soak:
    def __init__(self, top: str, seconds: float, size: int = 32 * MiB + 3 * BLOCK + 1000,
                 writers: int = 3, readers: int = 3, seed: int = 1,
                 log=print) -> None:
        self.top = top
        self.seconds = seconds
        self.size = size
        self.nr_writers = writers
        self.nr_readers = readers
        self.seed = seed
        self.rng = random.Random(seed)
        self.say = log
        self.stats = Stats()
        self.stop = threading.Event()
        self.gate = ReaderGate()
        self.origin = os.path.join(top, "disk.img")
        self.backup = os.path.join(top, "backup.img")
        self.d = Daemon(os.path.join(top, "run"), [(self.origin, "disk0")])
        self.writers: list[Writer] = []
        self.readers: list[Reader] = []
        self.mode = ""  # "", "snapshot", "incremental"
        self.cow = ""
        self.nr_cows = 0
        self.epochs = 0
        self.seq_id = 0
        self.uuid = ""
        self.required: set[int] = set()  # blocks the current COW file must list
        self.frozen: Epoch | None = None
        self.started = 0.0

    def fail(self, message: str) -> None:
        if not self.stats.failures:
            self.say(f"soak: FAILURE: {message}")
        self.stats.failures.append(message)
        self.stop.set()

    def check(self) -> None:
        if self.stats.failures:
            raise SoakFailure(self.stats.failures[0])

    def collect(self) -> Stats:
        """Add up the threads' counters into ``stats``."""
        total: Counter[str] = Counter()
        for t in self.writers + self.readers:
            total.update(t.counts)
        for name, value in total.items():
            setattr(self.stats, name, value)
        self.stats.seconds = time.monotonic() - self.started
        return self.stats

    # -- run ------------------------------------------------------------------------
    def run(self) -> Stats:
        start = self.started = time.monotonic()
        rng = random.Random(self.seed)
        content = rng.randbytes(self.size)
        with open(self.origin, "wb") as f:
            f.write(content)
        self.d.start()
        try:
            self.start_threads(content)
            self.setup()
            deadline = start + self.seconds
            next_report = time.monotonic() + 10
            while time.monotonic() < deadline and not self.stop.is_set():
                self.stop.wait(self.rng.uniform(0.2, 1.0))
                self.check()
                self.step()
                if time.monotonic() >= next_report:
                    self.say(f"soak: {time.monotonic() - start:.0f} s: "
                             f"{self.collect().summary()}")
                    next_report += 10
            self.check()
            self.finish()
        except SoakFailure:
            pass  # in stats.failures already
        except Exception as e:  # noqa: BLE001 (a command or a check that could not run: report it)
            self.fail(f"{type(e).__name__}: {e}")
        finally:
            self.stop.set()
            for t in self.writers + self.readers:
                t.join(30)
            status = self.d.stop()
            self.collect()
        if status != 0 and not self.stats.failures:
            self.fail(f"the daemon exited with status {status} on SIGTERM")
        log = self.d.log().splitlines()
        bad = [i for i, line in enumerate(log) if "Traceback" in line or " ERROR " in line]
        if bad and not self.stats.failures:
            self.fail(f"the daemon logged {len(bad)} errors, the first:\n" +
                      "\n".join(log[bad[0]:bad[0] + 15]))
        return self.stats

    def start_threads(self, content: bytes) -> None:
        per = self.size // self.nr_writers // BLOCK * BLOCK
        for i in range(self.nr_writers):
            lo, hi = i * per, (self.size if i == self.nr_writers - 1 else (i + 1) * per)
            self.writers.append(Writer(self, i, lo, hi, content[lo:hi]))
        self.readers = [Reader(self, i) for i in range(self.nr_readers)]
        for t in self.writers + self.readers:
            t.start()

    def step(self) -> None:
        r = self.rng.random()
        if self.mode == "snapshot":
            if r < 0.75:
                self.to_incremental()
            else:
                self.destroy()
                self.setup()
        elif r < 0.85:
            self.to_snapshot()
        else:
            self.destroy()
            self.setup()
        self.check()

    # -- transitions -------------------------------------------------------------------
    def new_cow(self) -> str:
        self.nr_cows += 1
        return os.path.join(self.top, f"cow{self.nr_cows}")

    def command(self, *args: str) -> list[tuple[int, int]]:
        """Run elioctl while the writers write; return each writer's window of changes
        that may lie on either side of the command's point."""
        before = [w.acked for w in self.writers]
        self.d.elioctl(*args)
        after = [w.started for w in self.writers]
        return list(zip(before, after))

    def setup(self) -> None:
        self.cow = self.new_cow()
        windows = self.command("setup-snapshot", "-f", str(-(-self.size // MiB)), "disk0",
                               self.cow, "0")
        self.stats.setups += 1
        info = self.info(state=3)
        self.seq_id, self.uuid = info["seq_id"], info["uuid"]
        assert self.seq_id == 1
        self.new_point(windows)
        with open(self.backup, "wb") as f:  # a full backup of the new chain's first snapshot
            f.write(self.frozen_image())
        run(self.d.command("update-img", "--stamp", "0", self.backup))  # the image now
        # holds snapshot 1 of this chain, not the last one's

    def to_incremental(self) -> None:
        self.gate.close()
        self.catch_up()
        self.d.elioctl("transition-to-incremental", "0")
        self.stats.to_incremental += 1
        self.mode = "incremental"
        self.info(state=2)
        if EXPORT in [name for name, _ in export_names(self.d.uri("disk0"))]:
            self.fail(f"{EXPORT} is still listed in incremental mode")

    def to_snapshot(self) -> None:
        old = self.cow
        self.cow = self.new_cow()
        windows = self.command("transition-to-snapshot", "-f", str(-(-self.size // MiB)),
                               self.cow, "0")
        self.stats.to_snapshot += 1
        info = self.info(state=3)
        if info["seq_id"] != self.seq_id + 1 or info["uuid"] != self.uuid:
            self.fail(f"transition-to-snapshot: seq_id {info['seq_id']} uuid {info['uuid']}, "
                      f"expected {self.seq_id + 1} {self.uuid}")
        self.seq_id += 1
        required = self.new_point(windows)
        self.check_list(old, required)
        self.check_update_img(old)
        os.unlink(old)

    def destroy(self) -> None:
        self.gate.close()
        self.catch_up()
        self.d.elioctl("destroy", "0")
        self.stats.destroys += 1
        if os.path.exists(self.cow):
            self.fail(f"destroy left {self.cow}")
        if self.d.info()["devices"]:
            self.fail("destroy left the minor in info")
        self.mode = ""

    def info(self, state: int) -> dict:
        info = self.d.info(0)
        if "error" in info or info["state"] != state:
            self.fail(f"info after a transition: {info}, expected state {state} without error")
            self.check()
        return info

    # -- checks ------------------------------------------------------------------------
    def new_point(self, windows: list[tuple[int, int]]) -> set[int]:
        """A snapshot was just taken: find where it fell in each writer's changes, freeze
        its image for the readers. Return the blocks the previous COW file must list."""
        image = self.read_snapshot()
        view = memoryview(image)
        required = self.required
        self.required = set()
        for w, (first, last) in zip(self.writers, windows):
            first = max(first, w.shadow_at)  # an earlier point already placed these
            last = max(last, first)
            required |= w.advance(first)
            cuts = w.cuts(view[w.lo:w.hi], first, last)
            self.check()
            self.stats.ambiguous_writes += last - first
            required |= w.advance(cuts[0])  # surely before the point
            w.advance(cuts[-1])  # these may be on either side: required by neither file
            w.forget_before(w.shadow_at)
        self.stats.full_snapshot_checks += 1
        self.epochs += 1
        self.frozen = Epoch(self.epochs, image, block_hashes(image))
        self.mode = "snapshot"
        self.gate.open(self.frozen)
        return required

    def frozen_image(self) -> bytes:
        assert self.frozen is not None, "no snapshot point yet"
        return self.frozen.image

    def catch_up(self) -> None:
        """Account the changes made since the last point to the current COW file."""
        for w in self.writers:
            self.required |= w.advance(w.acked)
            w.forget_before(w.shadow_at)

    def read_snapshot(self) -> bytes:
        h = connect(self.d.uri(EXPORT))
        try:
            if h.get_size() != self.size:
                self.fail(f"elastio-snap0 has size {h.get_size()}, the origin {self.size}")
            return b"".join(h.pread(min(READ_CHUNK, self.size - o), o)
                            for o in range(0, self.size, READ_CHUNK))
        finally:
            shutdown_quietly(h)

    def check_list(self, cow: str, required: set[int]) -> None:
        r = self.d.elioctl("changed-blocks", "--json", cow)
        doc = json.loads(r.stdout)
        listed = {b for e in doc["extents"] for b in blocks_of(e["offset"], e["length"])}
        missing = required - listed
        if missing:
            self.fail(f"{cow} does not list {len(missing)} changed blocks, e.g. "
                      f"{sorted(missing)[:10]}")
        if doc["nr_changed_blocks"] != len(listed) or doc["seq_id"] != self.seq_id - 1:
            self.fail(f"{cow}: nr_changed_blocks {doc['nr_changed_blocks']} for "
                      f"{len(listed)} listed, seq_id {doc['seq_id']}")
        self.stats.lists_checked += 1
        self.stats.blocks_required += len(required)
        self.stats.blocks_listed += len(listed)
        self.stats.blocks_per_list += (self.size + BLOCK - 1) // BLOCK

    def check_update_img(self, cow: str) -> None:
        r = self.d.update_img("0", cow, self.backup)
        if r.returncode != 0:
            self.fail(f"update-img exited {r.returncode}: {r.stderr.strip()}")
            return
        with open(self.backup, "rb") as f:
            if f.read() != self.frozen_image():
                self.fail(f"update-img with {cow} did not produce snapshot {self.seq_id}")
        self.stats.update_imgs += 1

    def finish(self) -> None:
        """Stop the load; the origin must hold every change, the snapshot its image."""
        self.stop.set()
        for t in self.writers:
            t.join(30)
        self.check()
        h = connect(self.d.uri("disk0"))
        try:
            origin = b"".join(h.pread(min(READ_CHUNK, self.size - o), o)
                              for o in range(0, self.size, READ_CHUNK))
        finally:
            shutdown_quietly(h)
        for w in self.writers:
            w.advance(w.acked)
            if origin[w.lo:w.hi] != w.shadow:
                bad = [b for b in range(w.lo // BLOCK, (w.hi + BLOCK - 1) // BLOCK)
                       if origin[b * BLOCK:(b + 1) * BLOCK] !=
                       w.shadow[b * BLOCK - w.lo:(b + 1) * BLOCK - w.lo]]
                self.fail(f"the origin lost changes of {w.name}: blocks {bad[:10]}")
        if self.mode == "snapshot" and self.read_snapshot() != self.frozen_image():
            self.fail("the snapshot changed at the end of the run")
        self.check()
        if self.mode:
            self.destroy()


def run_soak(top: str, seconds: float, **kwargs) -> Stats:
    return Soak(top, seconds, **kwargs).run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="how long (default %(default)s)")
    p.add_argument("--size-mib", type=int, default=32, help="origin size (default %(default)s)")
    p.add_argument("--writers", type=int, default=3)
    p.add_argument("--readers", type=int, default=3)
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--dir", default=None, help="where the origin and COW files go "
                   "(default: a new temporary directory, removed afterwards)")
    args = p.parse_args(argv)
    print(f"soak: {args.minutes} min, {args.size_mib} MiB origin, {args.writers} writers, "
          f"{args.readers} readers, seed {args.seed}")
    with tempfile.TemporaryDirectory(prefix="snapengine-soak-", dir=args.dir) as top:
        stats = run_soak(top, args.minutes * 60, size=args.size_mib * MiB + 3 * BLOCK + 1000,
                         writers=args.writers, readers=args.readers, seed=args.seed)
    print(f"soak: {stats.summary()}")
    if stats.failures:
        print(f"soak: FAILED ({len(stats.failures)}): {stats.failures[0]}")
        return 1
    print("soak: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
