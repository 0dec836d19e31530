"""The daemon's memory stays within the index cache limit (-c) plus 64 MiB.

What it measures: the resident set (VmRSS, and the peak VmHWM, from /proc/PID/status of
the nbdkit process, pid in RUN/nbdkit.pid) of a daemon serving a 1 TiB sparse origin
while 2 000 000 of its 4 KiB blocks change, with ``-c 16`` and with ``-c 64``, in
incremental mode (only change marks are written) and in snapshot mode (the old data of
every block, zeroes, is saved to the COW file: 8 GiB, run only if the directory has
that much free space plus a reserve, checked with shutil.disk_usage).

How: a fresh daemon per run; setup-snapshot -c C (then transition-to-incremental for
incremental mode); one NBD connection sends NBD trims of 256 KiB (64 blocks) at
1 MiB-aligned places drawn at random, without repeats, over the whole 1 TiB, 32 in
flight. Trims keep the real data small (the origin stays a hole) and are tracked and
copied like writes. Each run touches 31 250 index pages (one per trim), many more than
the cache holds (3 472 pages at -c 16, 13 888 at -c 64), so the cache must evict.
RSS is read before the trims, every 0.1 s during them, and after; VmHWM at the end
is the peak. ``nr_changed_blocks`` comes from ``elioctl info 0``.

Target: in every run, peak (VmHWM) <= -c + 64 MiB, and nr_changed_blocks >= 2 000 000.
Exit 0 if met, 1 if not. Each run's daemon is stopped with SIGTERM and its files
removed.

    .venv/bin/python -m bench.rss [--dir DIR] [--cache MB...] [--modes MODE...]
                                  [--run-kib KiB]

--cache, --modes and --run-kib change the runs (e.g. ``--cache 300 --run-kib 16``: the
default -c with 500 000 pages touched); the defaults are the runs described above.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import threading
import time
from dataclasses import dataclass

import nbd

from bench import BLOCK, GiB, MiB, TiB
from snapengine.index import MIN_CACHE_PAGES, PAGE_COST
from tests.harness import connected, daemon, pipelined, sparse_file, workdir

MB = 1000 * 1000  # -c is in MB
ORIGIN_SIZE = TiB
TARGET_BLOCKS = 2_000_000
RUN_KIB = 256  # one trim: 64 blocks, inside one 1 MiB index page's range
HEADROOM = 64 * MiB  # allowed beyond -c
CACHES_MB = (16, 64)
MODES = ("incremental", "snapshot")
RESERVE = 10 * GiB  # free space left to others when snapshot mode writes its COW data
SAMPLE_EVERY = 0.1  # seconds


@dataclass
class Result:
    mode: str
    cache_mb: int
    changed: int
    rss_before: int  # bytes
    rss_during: int
    rss_after: int
    hwm: int
    seconds: float

    @property
    def limit(self) -> int:
        return self.cache_mb * MB + HEADROOM

    @property
    def met(self) -> bool:
        return self.hwm <= self.limit and self.changed >= TARGET_BLOCKS


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in bytes."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


class Sampler:
    """Reads VmRSS every SAMPLE_EVERY seconds in a thread; keeps the maximum."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.max_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self.max_rss = max(self.max_rss, memory(self.pid)[0])


def trim_offsets(rng: random.Random, run_bytes: int) -> list[int]:
    """1 MiB-aligned offsets, distinct, random order, spread over the whole origin."""
    runs = -(-TARGET_BLOCKS * BLOCK // run_bytes)
    return [slot * MiB for slot in rng.sample(range(ORIGIN_SIZE // MiB), runs)]


def trim_all(h: nbd.NBD, offsets: list[int], run_bytes: int) -> None:
    pipelined(h, ((h.aio_trim, run_bytes, offset) for offset in offsets))


def snapshot_space_needed() -> int:
    return TARGET_BLOCKS * BLOCK + RESERVE


def measure(base: str, mode: str, cache_mb: int, offsets: list[int], run_bytes: int) -> Result:
    """One fresh daemon: set up minor 0 in ``mode`` with -c ``cache_mb``, trim, read RSS."""
    with workdir(base) as tmp:
        origin = sparse_file(os.path.join(tmp, "origin.img"), ORIGIN_SIZE)
        with daemon(os.path.join(tmp, "run"), [(origin, "origin")], verbose=False) as d:
            d.elioctl("setup-snapshot", "-c", str(cache_mb), "origin",
                      os.path.join(tmp, "cow"), "0")
            if mode == "incremental":
                d.elioctl("transition-to-incremental", "0")
            with connected(d.uri("origin")) as h:
                before = memory(d.pid)[0]
                started = time.monotonic()
                with Sampler(d.pid) as sampler:
                    trim_all(h, offsets, run_bytes)
                seconds = time.monotonic() - started
                after, hwm = memory(d.pid)
                changed = d.info(0)["nr_changed_blocks"]
            d.elioctl("destroy", "0")
    return Result(mode, cache_mb, changed, before, max(sampler.max_rss, after), after, hwm,
                  seconds)


def cache_pages(cache_mb: int) -> int:
    return max(cache_mb * MB, MIN_CACHE_PAGES * PAGE_COST) // PAGE_COST


def mib(n: int) -> str:
    return f"{n / MiB:.1f}"


def print_table(results: list[Result], pages: int) -> None:
    print("| mode | -c (MB) | nr_changed_blocks | index pages touched / cache holds "
          "| RSS before (MiB) | RSS during, max (MiB) | RSS after (MiB) | peak VmHWM (MiB) "
          "| limit -c + 64 MiB (MiB) | trims took (s) | met |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r.mode} | {r.cache_mb} | {r.changed:,} | {pages:,} / "
              f"{cache_pages(r.cache_mb):,} | {mib(r.rss_before)} | {mib(r.rss_during)} | "
              f"{mib(r.rss_after)} | {mib(r.hwm)} | {mib(r.limit)} | {r.seconds:.1f} | "
              f"{'yes' if r.met else 'NO'} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/var/tmp", help="where to put the temporary files "
                   "(a new directory is made in it; default %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the trim places")
    p.add_argument("--cache", type=int, nargs="+", default=list(CACHES_MB), metavar="MB",
                   help="-c values to run (default %(default)s)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="modes to run (default %(default)s)")
    p.add_argument("--run-kib", type=int, choices=(4, 16, 64, 256, 1024), default=RUN_KIB,
                   help="size of one trim, so 2M blocks touch 2M / (KiB / 4) index pages "
                   "(default %(default)s)")
    args = p.parse_args()
    run_bytes = args.run_kib * 1024
    offsets = trim_offsets(random.Random(args.seed), run_bytes)
    started = time.monotonic()
    results: list[Result] = []
    skipped: list[str] = []
    notes: list[str] = []
    for mode in args.modes:
        for cache_mb in args.cache:
            free = shutil.disk_usage(args.dir).free
            space = (f"{free / GiB:.0f} GiB free in {args.dir}, "
                     f"{snapshot_space_needed() / GiB:.0f} GiB needed")
            if mode == "snapshot":
                if free < snapshot_space_needed():
                    skipped.append(f"snapshot -c {cache_mb}: {space}")
                    continue
                notes.append(f"snapshot -c {cache_mb} ran: {space} (COW data + reserve)")
            results.append(measure(args.dir, mode, cache_mb, offsets, run_bytes))
    print_table(results, len(offsets))
    for line in notes:
        print(f"\n{line}")
    for line in skipped:
        print(f"\nskipped (not enough space): {line}")
    met = bool(results) and all(r.met for r in results)
    print(f"\ntarget: peak RSS <= -c + 64 MiB with >= {TARGET_BLOCKS:,} changed blocks on a "
          f"1 TiB origin: {'MET' if met else 'NOT MET'} in {len(results)} run(s), "
          f"{len(skipped)} skipped (bench run time {time.monotonic() - started:.0f} s)")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
