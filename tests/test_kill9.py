"""kill -9 of the daemon during a write load, restart, and check against a model.

Each round: writers on two NBD connections (each owning half the origin) write random
data; the daemon is killed with SIGKILL after a random number of acknowledged writes;
it is restarted (the
registry brings the minor back, the COW file is recovered from its index); then:

* snapshot mode: the snapshot reads back exactly as the origin was at its point;
* incremental mode: closing the list (transition-to-snapshot) lists every block of
  every acknowledged write, and of the write in flight if it reached the origin;
* the origin holds every acknowledged write.

SNAPENGINE_KILL_ROUNDS sets the rounds (CI: 20; `make soak`: more). Every random choice
comes from one seed per mode, fixed (KILL_SEED + crc32 of the mode's name, so the same
in every process), printed with any failure; SNAPENGINE_KILL_SEED changes its base.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import zlib

import nbd
import pytest

from snapengine.units import BLOCK_SIZE
from tests.harness import Daemon, read_all, sparse_file, wait_for

pytestmark = pytest.mark.e2e

MiB = 1 << 20
SIZE = 32 * MiB
ROUNDS = int(os.environ.get("SNAPENGINE_KILL_ROUNDS", "20"))
KILL_SEED = int(os.environ.get("SNAPENGINE_KILL_SEED", "20260311"))
KILL_AFTER = (20, 800)  # the kill comes after this many acknowledged writes (random)
ROUND_S = 4.0  # seconds one round takes at most: measured (1.2 s), times 3, rounded up


class Writer(threading.Thread):
    """Writes random chunks into [lo, hi) until its connection breaks."""

    def __init__(self, uri: str, lo: int, hi: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.lo, self.hi = lo, hi
        self.rng = random.Random(seed)
        self.acked: list[tuple[int, bytes]] = []
        self.in_flight: tuple[int, int] | None = None

    def run(self) -> None:
        while True:
            length = self.rng.choice((512, 4096, 8192, 65536, 3 * 4096 + 100))
            offset = self.rng.randrange(self.lo, self.hi - length) // 512 * 512
            data = self.rng.randbytes(length)
            self.in_flight = (offset, length)
            try:
                self.h.pwrite(data, offset)
            except nbd.Error:
                return
            self.acked.append((offset, data))
            self.in_flight = None


def blocks_of(offset: int, length: int) -> range:
    return range(offset // BLOCK_SIZE, (offset + length + BLOCK_SIZE - 1) // BLOCK_SIZE)


def load_then_kill(d: Daemon, rng: random.Random) -> list[Writer]:
    writers = [Writer(d.uri("disk0"), i * SIZE // 2, (i + 1) * SIZE // 2, rng.randrange(1 << 30))
               for i in range(2)]
    kill_after = rng.randrange(*KILL_AFTER)
    for w in writers:
        w.start()
    wait_for(lambda: sum(len(w.acked) for w in writers) >= kill_after,
             what=f"{kill_after} acknowledged writes")
    d.kill9()
    for w in writers:
        w.join(30)
    return writers


def apply(model: bytearray, writers: list[Writer]) -> list[tuple[int, int]]:
    """Apply acknowledged writes to ``model``; return the ranges in flight (unknown)."""
    for w in writers:
        for offset, data in w.acked:
            model[offset:offset + len(data)] = data
    return [w.in_flight for w in writers if w.in_flight]


def check_origin(d: Daemon, model: bytearray, unknown: list[tuple[int, int]]) -> bytes:
    origin = read_all(d.uri("disk0"))
    for offset, length in unknown:  # either content is right: take what is there
        model[offset:offset + length] = origin[offset:offset + length]
    assert origin == bytes(model), "the origin lost an acknowledged write"
    return origin


def seed_of(mode: str) -> int:
    return KILL_SEED + zlib.crc32(mode.encode())


@pytest.mark.timeout(30 + ROUND_S * ROUNDS)
@pytest.mark.parametrize("mode", ["snapshot", "incremental"])
def test_kill9_rounds(tmp_path, mode):
    seed = seed_of(mode)
    print(f"kill -9 rounds, {mode} mode: seed {seed} (SNAPENGINE_KILL_SEED={KILL_SEED})")
    rng = random.Random(seed)
    origin = sparse_file(str(tmp_path / "disk.img"), SIZE)
    with open(origin, "wb") as f:
        f.write(rng.randbytes(SIZE))
    model = bytearray(open(origin, "rb").read())
    d = Daemon(str(tmp_path / "run"), [(origin, "disk0")])
    try:
        d.start()
        d.elioctl("setup-snapshot", "-f", "32", "disk0", str(tmp_path / "cow0"), "0")
        point = bytes(model)  # the snapshot's image
        if mode == "incremental":
            d.elioctl("transition-to-incremental", "0")
        for round_ in range(ROUNDS):
            writers = load_then_kill(d, rng)
            unknown = apply(model, writers)
            d.start()  # restart: the registry brings the minor back
            info = d.info(0)
            assert "error" not in info, (seed, round_, info, d.log()[-3000:])
            assert info["state"] in (0, 1)  # dormant until a client connects
            origin_now = check_origin(d, model, unknown)
            if mode == "snapshot":
                assert hashlib.sha256(read_all(d.uri("elastio-snap0"))).digest() == \
                    hashlib.sha256(point).digest(), f"seed {seed} round {round_}: snapshot changed"
                continue
            cow, new = str(tmp_path / f"cow{round_}"), str(tmp_path / f"cow{round_ + 1}")
            d.elioctl("transition-to-snapshot", "-f", "32", new, "0")
            listed = set()
            for line in d.elioctl("changed-blocks", cow).stdout.split("\n"):
                if line:
                    offset, length = map(int, line.split())
                    listed.update(blocks_of(offset, length))
            truth = {b for w in writers for o, data in w.acked for b in blocks_of(o, len(data))}
            truth |= {b for o, n in unknown for b in blocks_of(o, n)
                      if origin_now[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE]
                      != point[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE]}
            assert truth <= listed, \
                f"seed {seed} round {round_}: unlisted {sorted(truth - listed)[:10]}"
            point = origin_now
            d.elioctl("transition-to-incremental", "0")
    finally:
        d.stop()
