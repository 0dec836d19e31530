"""The control operations cost O(1) in the origin size.

What it measures: the wall time of setup-snapshot, transition-to-incremental,
transition-to-snapshot and destroy on a 1 TiB and on a 1 GiB sparse origin, in two ways:

* ``elioctl``: the command line an administrator runs (includes starting Python for
  elioctl, about 70 ms);
* ``in-process``: the same request sent over the control socket with
  ``snapengine.client.request`` from this process: the engine's own cost.

How: one daemon serves both origins; each keeps one NBD connection open (the minor is
active, as on a live system). One cycle is setup-snapshot (minor 0), writes,
transition-to-incremental, writes, transition-to-snapshot, writes, destroy, where
"writes" are 32 random 4 KiB blocks and one random 1 MiB extent, pipelined and
flushed. Five repetitions, each running the cycle on both origins and both ways
(interleaved, so background noise hits all of them alike); median and max per cell.

Target: on the 1 TiB origin, each of the four operations has a median < 0.2 s, both
through elioctl and in-process. Exit 0 if met, 1 if not. The daemon is stopped and
every file removed at the end.

    .venv/bin/python -m bench.o1_timing [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import nbd

from bench import BLOCK, GiB, MiB, TiB
from tests.harness import Daemon, connected, daemon, pipelined, run, sparse_file, workdir

SIZES = (TiB, GiB)
REPEATS = 5
TARGET_S = 0.2
MINOR = "0"
OPS = ("setup-snapshot", "transition-to-incremental", "transition-to-snapshot", "destroy")
WAYS = ("elioctl", "in-process")
SMALL_WRITES = 32


@dataclass
class Step:
    """One control operation, as elioctl arguments and as a control request."""

    op: str
    argv: list[str]
    fields: dict[str, Any]


Timings = dict[tuple[int, str, str], list[float]]  # (origin size, way, op) -> seconds


def some_writes(h: nbd.NBD, rng: random.Random) -> None:
    """SMALL_WRITES random 4 KiB blocks and one random 1 MiB extent, then a flush."""
    size = h.get_size()
    small = nbd.Buffer.from_bytearray(bytearray(rng.randbytes(BLOCK)))
    big = nbd.Buffer.from_bytearray(bytearray(rng.randbytes(MiB)))
    writes = [(small, rng.randrange(size // BLOCK) * BLOCK) for _ in range(SMALL_WRITES)]
    writes.append((big, rng.randrange(size // MiB) * MiB))
    pipelined(h, ((h.aio_pwrite, buf, offset) for buf, offset in writes))


def cycle_steps(name: str, cow1: str, cow2: str) -> list[Step]:
    return [
        Step("setup-snapshot", [name, cow1, MINOR],
             {"block_device": name, "cow_file": cow1, "minor": MINOR}),
        Step("transition-to-incremental", [MINOR], {"minor": MINOR}),
        Step("transition-to-snapshot", [cow2, MINOR], {"cow_file": cow2, "minor": MINOR}),
        Step("destroy", [MINOR], {"minor": MINOR}),
    ]


def timed_step(d: Daemon, way: str, step: Step) -> float:
    start = time.perf_counter()
    if way == "elioctl":
        run(d.command("elioctl", step.op, *step.argv))
    else:
        d.request(step.op, **step.fields)
    return time.perf_counter() - start


def cycle(d: Daemon, h: nbd.NBD, name: str, base: str, way: str, rng: random.Random,
          timings: Timings, size: int) -> None:
    """setup, writes, to incremental, writes, to snapshot, writes, destroy."""
    cow1, cow2 = os.path.join(base, f"{name}.cow1"), os.path.join(base, f"{name}.cow2")
    steps = cycle_steps(name, cow1, cow2)
    try:
        for i, step in enumerate(steps):
            timings.setdefault((size, way, step.op), []).append(timed_step(d, way, step))
            if i < len(steps) - 1:
                some_writes(h, rng)
    finally:
        for path in (cow1, cow2):  # destroy removes cow2; cow1 is the closed change list
            if os.path.exists(path):
                os.unlink(path)


def size_label(size: int) -> str:
    return f"{size // TiB} TiB" if size >= TiB else f"{size // GiB} GiB"


def print_table(timings: Timings) -> None:
    head = " | ".join(f"{size_label(s)} median (s) | {size_label(s)} max (s)" for s in SIZES)
    print(f"| operation | way | {head} |")
    print("|---|---|" + "---:|" * (2 * len(SIZES)))
    for op in OPS:
        for way in WAYS:
            cells = " | ".join(f"{statistics.median(timings[s, way, op]):.3f} | "
                               f"{max(timings[s, way, op]):.3f}" for s in SIZES)
            print(f"| {op} | {way} | {cells} |")


def slowest_median(timings: Timings, size: int) -> tuple[float, str]:
    return max((statistics.median(timings[size, way, op]), f"{op} ({way})")
               for op in OPS for way in WAYS)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="where to put the temporary files (default: a new "
                   "directory under /var/tmp)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the writes")
    args = p.parse_args()
    rng = random.Random(args.seed)
    started = time.monotonic()
    timings: Timings = {}
    with workdir(args.dir) as base:
        names = {size: f"origin-{size // GiB}G" for size in SIZES}
        served = [(sparse_file(os.path.join(base, f"{names[s]}.img"), s), names[s])
                  for s in SIZES]
        with daemon(os.path.join(base, "run"), served, verbose=False) as d, \
                ExitStack() as stack:
            handles = {size: stack.enter_context(connected(d.uri(names[size])))
                       for size in SIZES}
            for _ in range(REPEATS):
                for size in SIZES:
                    for way in WAYS:
                        cycle(d, handles[size], names[size], base, way, rng, timings, size)
    print_table(timings)
    worst, what = slowest_median(timings, TiB)
    met = worst < TARGET_S
    print(f"\ntarget: every operation on the 1 TiB origin has a median < {TARGET_S} s; "
          f"slowest median {worst:.3f} s, {what} -> {'MET' if met else 'NOT MET'} "
          f"(bench run time {time.monotonic() - started:.0f} s)")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
