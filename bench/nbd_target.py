"""update-img into a local file against update-img into a qcow2 overlay over NBD.

What it measures: the wall time of ``update-img 0 <cow> <image>`` for 1 000 and 100 000
changed 4 KiB blocks (random, distinct) of a 4 GiB sparse origin, into
  - a local sparse file (the image as before), and
  - a new qcow2 overlay (``qemu-img create -b base.qcow2``) served by ``qemu-nbd -t``
    on a Unix socket: ``nbd+unix:///?socket=...``, the nightly overlay of
    docs/backup-cycle.md, with qcow2's default 64 KiB clusters and with 4 KiB ones,
and how many bytes of data the overlay holds afterwards (``qemu-img map``: its top
layer), against the changed data.

How: one daemon serves the origin. For each row: setup-snapshot (minor 0),
transition-to-incremental, N blocks written through NBD (pipelined),
transition-to-snapshot: COW file 1 then lists exactly the N blocks. Each target kind is
timed REPEATS times, alternating, each time into a new image (a new sparse file; a new
overlay and a new qemu-nbd), qemu-nbd's start not timed and its exit (which flushes
the qcow2) timed with the run. update-img must report N blocks, 0 errors. Medians.

No target: the row shows what an NBD target costs next to a local file.

    .venv/bin/python -m bench.nbd_target [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

from bench import BLOCK, GiB
from bench.update_img import copied_blocks, unstamped_image, write_blocks
from tests.harness import Daemon, connected, daemon, run, sparse_file, workdir
from tests.harness.process import stop_process, wait_for

ORIGIN_SIZE = 4 * GiB
ROWS = (1000, 100_000)
REPEATS = 3
CLUSTERS = (64 * 1024, 4096)  # qcow2's default cluster size, and one block per cluster


def overlay_data(path: str) -> int:
    """Bytes of data in the top layer of the qcow2 at ``path``."""
    entries = json.loads(run(["qemu-img", "map", "--output=json", path]).stdout)
    return sum(e["length"] for e in entries if e["depth"] == 0 and e["data"])


def into_file(d: Daemon, cow: str, base: str) -> float:
    image = unstamped_image(os.path.join(base, "image"), ORIGIN_SIZE)
    start = time.perf_counter()
    out = run(d.command("update-img", "0", cow, image)).stdout
    elapsed = time.perf_counter() - start
    copied_blocks(out)
    return elapsed


def into_overlay(d: Daemon, cow: str, base: str, cluster: int) -> tuple[float, int]:
    """One run into a new overlay with ``cluster``-byte clusters over NBD: (seconds,
    bytes of data it then holds)."""
    backing, overlay = os.path.join(base, "base.qcow2"), os.path.join(base, "night.qcow2")
    sock = os.path.join(base, "q.sock")
    if not os.path.exists(backing):
        run(["qemu-img", "create", "-q", "-f", "qcow2", backing, str(ORIGIN_SIZE)])
    for path in (overlay, sock):
        if os.path.exists(path):
            os.unlink(path)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", "-b",
         backing, "-F", "qcow2", overlay])
    proc = subprocess.Popen(["qemu-nbd", "-t", "-k", sock, "-f", "qcow2", overlay],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(sock), what="qemu-nbd")
        start = time.perf_counter()
        out = run(d.command("update-img", "0", cow, f"nbd+unix:///?socket={sock}")).stdout
        stop_process(proc)  # qemu-nbd flushes the qcow2 as it exits
        elapsed = time.perf_counter() - start
    finally:
        stop_process(proc)
    copied_blocks(out)
    return elapsed, overlay_data(overlay)


def measure(d: Daemon, base: str, n: int, rng: random.Random) -> dict:
    cow1, cow2 = os.path.join(base, "cow1"), os.path.join(base, "cow2")
    d.elioctl("setup-snapshot", "disk0", cow1, "0")
    try:
        with connected(d.uri("disk0")) as h:
            d.elioctl("transition-to-incremental", "0")
            write_blocks(h, rng.sample(range(ORIGIN_SIZE // BLOCK), n))
            d.elioctl("transition-to-snapshot", cow2, "0")
            row: dict = {"changed": n, "file": []}
            for _ in range(REPEATS):
                row["file"].append(into_file(d, cow1, base))
                for cluster in CLUSTERS:
                    seconds, row[f"held{cluster}"] = into_overlay(d, cow1, base, cluster)
                    row.setdefault(f"overlay{cluster}", []).append(seconds)
        return row
    finally:
        d.elioctl("destroy", "0")
        if os.path.exists(cow1):
            os.unlink(cow1)


def table(rows: list[dict]) -> str:
    lines = ["| changed blocks (data) | local file, s | qcow2 overlay over NBD, s "
             "| overlay / file | the overlay holds |", "|---|---|---|---|---|"]
    for r in rows:
        f = statistics.median(r["file"])
        for cluster in CLUSTERS:
            o = statistics.median(r[f"overlay{cluster}"])
            lines.append(f"| {r['changed']:,} ({r['changed'] * BLOCK / 2**20:.1f} MiB), "
                         f"{cluster // 1024} KiB clusters | {f:.2f} | {o:.2f} | {o / f:.2f} "
                         f"| {r[f'held{cluster}'] / 2**20:.1f} MiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/dev/shm", help="where the origin, COW files and "
                   "images go (default %(default)s)")
    args = p.parse_args(argv)
    rng = random.Random(13)
    with workdir(args.dir) as base:
        origin = sparse_file(os.path.join(base, "disk0.img"), ORIGIN_SIZE)
        with daemon(os.path.join(base, "run"), [(origin, "disk0")], verbose=False) as d:
            rows = [measure(d, base, n, rng) for n in ROWS]
    print(f"update-img: local file vs qcow2 overlay (qemu-nbd), 4 GiB origin, "
          f"median of {REPEATS}, dir {args.dir}\n")
    print(table(rows))
    for r in rows:
        runs = [f"file {' / '.join(f'{s:.2f}' for s in r['file'])} s"]
        runs += [f"{c // 1024} KiB clusters {' / '.join(f'{s:.2f}' for s in r[f'overlay{c}'])} s"
                 for c in CLUSTERS]
        print(f"  {r['changed']:,} blocks: " + "; ".join(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
