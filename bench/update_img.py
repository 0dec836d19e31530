"""update-img's cost follows the number of changed blocks, not the origin size.

What it measures: the wall time of ``update-img 0 <old cow> <image>`` and of
``elioctl changed-blocks <old cow>`` (which reads the same changed-block list), for a
1 TiB sparse origin with 10, 1 000 and 10 000 changed 4 KiB blocks, and for a 16 GiB
sparse origin with 1 000 (same work on an origin 64 times smaller).

How: one daemon (``snapengine serve``) serves both sparse origins. For each row:
setup-snapshot (minor 0) into COW file 1, transition-to-incremental, N distinct random
4 KiB blocks written through NBD (libnbd, pipelined), transition-to-snapshot into COW
file 2. COW file 1 then lists exactly the N blocks. update-img copies them from the new
snapshot (export elastio-snap0) into a sparse image of the origin's size (content
irrelevant; a new unstamped one for each run). The origin's NBD connection stays open, so the minor stays active, as on
a live system. Each command runs 3 times on the same COW file; the table gives the
median and every run. update-img must report exactly N blocks copied, 0 errors.

Target: 1 TiB origin, 1 000 changed blocks: update-img median < 2 s.
Exit 0 if met, 1 if not. Everything created (daemon, files) is removed at the end.

    .venv/bin/python -m bench.update_img [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass

import nbd

from bench import BLOCK, GiB, TiB
from tests.harness import Daemon, connected, daemon, pipelined, run, sparse_file, workdir

REPEATS = 3
TARGET_S = 2.0
TARGET_ROW = (TiB, 1000)
ROWS = [(TiB, 10), (TiB, 1000), (TiB, 10_000), (16 * GiB, 1000)]
COPIED_RE = re.compile(r"copying complete: (\d+) blocks changed, (\d+) errors")
STAMP_SIDECAR = ".snapengine-stamp"  # update-img's stamp beside an image without xattrs


@dataclass
class Row:
    origin_size: int
    changed: int
    update_s: list[float]
    list_s: list[float]
    copied: int


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = run(cmd).stdout
    return time.perf_counter() - start, out


def write_blocks(h: nbd.NBD, blocks: list[int]) -> None:
    """One 4 KiB write per block, pipelined."""
    buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(BLOCK)))
    pipelined(h, ((h.aio_pwrite, buf, block * BLOCK) for block in blocks))


def copied_blocks(output: str) -> int:
    found = COPIED_RE.search(output)
    if found is None or found.group(2) != "0":
        raise RuntimeError(f"update-img did not copy cleanly: {output.strip()!r}")
    return int(found.group(1))


def unstamped_image(path: str, size: int) -> str:
    """A new sparse image, without the stamp a previous update-img left (a stamped image
    of snapshot 2 refuses the update from snapshot 1): each timed run starts alike."""
    for old in (path, path + STAMP_SIDECAR):
        if os.path.exists(old):
            os.unlink(old)
    return sparse_file(path, size)


def timed_update(d: Daemon, cow: str, image: str, size: int) -> tuple[float, str]:
    unstamped_image(image, size)
    return timed(d.command("update-img", "0", cow, image))


def measure(d: Daemon, base: str, origin: tuple[str, int], n: int, rng: random.Random) -> Row:
    """One row: make COW file 1 list n changed blocks, then time the two readers of it."""
    name, size = origin
    cow1, cow2 = os.path.join(base, "cow1"), os.path.join(base, "cow2")
    image = os.path.join(base, "image")
    d.elioctl("setup-snapshot", name, cow1, "0")
    try:
        with connected(d.uri(name)) as h:
            d.elioctl("transition-to-incremental", "0")
            write_blocks(h, rng.sample(range(size // BLOCK), n))
            d.elioctl("transition-to-snapshot", cow2, "0")
            update = [timed_update(d, cow1, image, size) for _ in range(REPEATS)]
            listing = [timed(d.command("elioctl", "changed-blocks", cow1))[0]
                       for _ in range(REPEATS)]
        copied = {copied_blocks(out) for _, out in update}
        if copied != {n}:
            raise RuntimeError(f"update-img copied {copied} blocks, expected {n}")
        return Row(size, n, [t for t, _ in update], listing, n)
    finally:
        d.elioctl("destroy", "0")  # removes cow2
        for path in (cow1, image, image + STAMP_SIDECAR):
            if os.path.exists(path):
                os.unlink(path)


def size_label(size: int) -> str:
    return f"{size // TiB} TiB" if size >= TiB else f"{size // GiB} GiB"


def secs(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def print_table(rows: list[Row]) -> None:
    print("| origin | changed blocks | update-img median (s) | update-img runs (s) "
          "| changed-blocks median (s) | changed-blocks runs (s) | blocks copied |")
    print("|---|---:|---:|---|---:|---|---:|")
    for r in rows:
        print(f"| {size_label(r.origin_size)} | {r.changed:,} | "
              f"{statistics.median(r.update_s):.3f} | {secs(r.update_s)} | "
              f"{statistics.median(r.list_s):.3f} | {secs(r.list_s)} | {r.copied:,} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="where to put the temporary files (default: a new "
                   "directory under /var/tmp)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the block choice")
    args = p.parse_args()
    rng = random.Random(args.seed)
    started = time.monotonic()
    with workdir(args.dir) as base:
        sizes = sorted({size for size, _ in ROWS})
        names = {size: f"origin-{size // GiB}G" for size in sizes}
        served = [(sparse_file(os.path.join(base, f"{names[size]}.img"), size), names[size])
                  for size in sizes]
        with daemon(os.path.join(base, "run"), served, verbose=False) as d:
            rows = [measure(d, base, (names[size], size), n, rng) for size, n in ROWS]
    print_table(rows)
    target = next(r for r in rows if (r.origin_size, r.changed) == TARGET_ROW)
    got = statistics.median(target.update_s)
    met = got < TARGET_S
    print(f"\ntarget: update-img on {size_label(TARGET_ROW[0])} with {TARGET_ROW[1]:,} "
          f"changed blocks < {TARGET_S} s: {got:.3f} s -> {'MET' if met else 'NOT MET'} "
          f"(bench run time {time.monotonic() - started:.0f} s)")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
