"""How long writes pause while one ``setup-snapshot`` takes a snapshot point for N origins
(INTERFACE.md §9): the gates of the N origins close one after another and stay closed
together while every part persists and the registry is saved once; then they reopen.

Method: for each N in --origins (1, 2 and 8; 1 is an ordinary single setup-snapshot,
for reference), one daemon (``snapengine serve``, not --verbose, run dir and COW files
in --dir) serving N sparse origins of --size-mib (64 MiB). One writer thread per
origin, each with its own libnbd connection, does 4 KiB pwrites in a loop, one at a
time, at random blocks of the first --region-kib (1024 KiB) of its origin; write k
carries k in its block, and its start and end are recorded with time.perf_counter.
One repetition: --settle seconds (1) of writes, then
``elioctl setup-snapshot -f 1 disk0 cow0 0 ... diskN-1 cowN-1 N-1`` (its wall time
measured around the subprocess, Python's start-up included), --settle seconds more;
the writers stop, each snapshot's region is read back (the highest k in it is the
writer's last write before the snapshot point), and the N minors are destroyed (not
measured). --repeat (5) repetitions per N.

Per repetition:

* ``point write``: the longest latency, over the N writers, of each one's first write
  after the snapshot point, the write the closed gates held back: the pause itself;
* ``longest during``: the longest latency of any write overlapping the command
  (started before it ended, ended after it began);
* ``median outside``, ``longest outside``: of the writes wholly outside the command
  (the first writes after it to each block are first touches: they save the old block
  first);
* the command's wall time, and the writes per second over the repetition.

The writers share this process's GIL with each other, on a 2-core machine with the
daemon and elioctl: every latency includes that contention (sys.getswitchinterval()
is 5 ms), inside and outside the command alike. One markdown table on stdout (each
repetition, then the medians per N), progress on stderr.

    .venv/bin/python -m bench.group_pause [--dir DIR] [--origins N [N ...]]
                                          [--size-mib N] [--region-kib N] [--repeat N]
                                          [--settle S]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass

from bench import BLOCK, MiB
from tests.harness import connect, daemon, shutdown_quietly, sparse_file, workdir

SEED = 20261203
FALLOCATE_MB = 1  # -f: the COW limit; the region (1 MiB) is all a snapshot can save
KiB = 1024
Samples = list[tuple[float, float]]  # (start, end) of write k at index k - 1


@dataclass
class Row:
    n: int
    rep: str
    command: float  # seconds: elioctl's wall time
    point_write: float  # seconds: the longest first write after the snapshot point
    during: float  # writes overlapping the command
    longest_during: float
    median_outside: float
    longest_outside: float
    writes_per_second: float

    def cells(self) -> str:
        return (f"| {self.n} | {self.rep} | {self.command * 1000:.0f} "
                f"| {self.point_write * 1000:.1f} | {self.during:.0f} "
                f"| {self.longest_during * 1000:.1f} | {self.median_outside * 1000:.3f} "
                f"| {self.longest_outside * 1000:.1f} | {self.writes_per_second:.0f} |")


HEADER = ("| N | rep | command ms | point write ms | writes during | longest during ms "
          "| median outside ms | longest outside ms | writes/s |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def write_loop(h, blocks: int, seed: int, stop: threading.Event, out: Samples) -> None:
    """4 KiB pwrites at random blocks of the first ``blocks`` until ``stop``; write k
    (from 1) carries k, and its (start, end) goes to ``out[k - 1]``."""
    rng, clock = random.Random(seed), time.perf_counter
    k = 0
    while not stop.is_set():
        k += 1
        buf = k.to_bytes(8, "little") * (BLOCK // 8)
        offset = rng.randrange(blocks) * BLOCK
        start = clock()
        h.pwrite(buf, offset)
        out.append((start, clock()))


def last_before_point(d, minor: int, region: int) -> int:
    """The highest write number in the snapshot of ``minor``: the writer's last write
    before the snapshot point (0: none)."""
    h = connect(d.uri(f"elastio-snap{minor}"))
    try:
        data = h.pread(region, 0)
    finally:
        shutdown_quietly(h)
    return max(int.from_bytes(data[o:o + 8], "little") for o in range(0, region, BLOCK))


def one_repetition(d, handles: list, a: argparse.Namespace, work: str, rep: int) -> Row:
    n, region = len(handles), a.region_kib * KiB
    stop = threading.Event()
    samples: list[Samples] = [[] for _ in handles]
    threads = [threading.Thread(target=write_loop, daemon=True,
                                args=(h, region // BLOCK, SEED + rep * n + i, stop, samples[i]))
               for i, h in enumerate(handles)]
    parts = []
    for i in range(n):
        parts += [f"disk{i}", os.path.join(work, f"cow{rep}-{i}"), str(i)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(a.settle)
    start = time.perf_counter()
    d.elioctl("setup-snapshot", "-f", FALLOCATE_MB, *parts)
    end = time.perf_counter()
    time.sleep(a.settle)
    stop.set()
    for t in threads:
        t.join()
    ended = time.perf_counter()
    point = []
    for i, s in enumerate(samples):
        k = last_before_point(d, i, region)  # write k + 1 (index k) met the closed gates
        assert 0 < k < len(s), f"origin {i}: snapshot point at write {k} of {len(s)}"
        point.append(s[k][1] - s[k][0])
    for i in range(n):
        d.request("destroy", minor=i)
    writes = [w for s in samples for w in s]
    during = [e - s for s, e in writes if s < end and e > start]
    outside = [e - s for s, e in writes if e <= start or s >= end]
    return Row(n, str(rep + 1), end - start, max(point), len(during),
               max(during, default=0.0), statistics.median(outside), max(outside),
               len(writes) / (ended - began))


def measure(n: int, a: argparse.Namespace, work: str) -> list[Row]:
    """One daemon with ``n`` origins, --repeat repetitions."""
    origins = [(sparse_file(os.path.join(work, f"disk{i}.img"), a.size_mib * MiB), f"disk{i}")
               for i in range(n)]
    rows = []
    with daemon(os.path.join(work, "run"), origins, verbose=False) as d:
        handles = [connect(d.uri(f"disk{i}")) for i in range(n)]
        try:
            for rep in range(a.repeat):
                rows.append(one_repetition(d, handles, a, work, rep))
                print(f"[N={n} {rep + 1}/{a.repeat}] {rows[-1].cells()}", file=sys.stderr,
                      flush=True)
        finally:
            for h in handles:
                shutdown_quietly(h)
    return rows


def median_row(rows: list[Row]) -> Row:
    """The median of each column over ``rows`` (one N)."""
    fields = ("command", "point_write", "during", "longest_during", "median_outside",
              "longest_outside", "writes_per_second")
    values = {f: statistics.median(getattr(r, f) for r in rows) for f in fields}
    return Row(rows[0].n, f"median of {len(rows)}", **values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/var/tmp",
                   help="where the origins, COW files and run dir go (default %(default)s)")
    p.add_argument("--origins", type=int, nargs="+", default=[1, 2, 8], metavar="N",
                   help="origins per group (default: 1 2 8; at most the daemon's 24 minors)")
    p.add_argument("--size-mib", type=int, default=64, help="size of each sparse origin")
    p.add_argument("--region-kib", type=int, default=1024,
                   help="the writes go to the first N KiB of each origin (at most 1024: -f 1)")
    p.add_argument("--repeat", type=int, default=5, help="repetitions per N")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds of writes before and after the command")
    a = p.parse_args(argv)
    if not BLOCK <= a.region_kib * KiB <= min(FALLOCATE_MB * MiB, a.size_mib * MiB):
        p.error(f"--region-kib must be in 4..{FALLOCATE_MB * 1024} and within the origin")
    rows: list[Row] = []
    for n in a.origins:
        with workdir(a.dir, "snapengine-group-") as work:
            rows += measure(n, a, work)
    print(f"write pause during a group setup-snapshot ({a.dir}, origins of {a.size_mib} MiB, "
          f"one 4 KiB writer per origin over its first {a.region_kib} KiB, {a.repeat} "
          "repetitions)\n")
    print(HEADER)
    print("\n".join(r.cells() for r in rows))
    print("\n".join(median_row([r for r in rows if r.n == n]).cells()
                    for n in sorted({r.n for r in rows})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
