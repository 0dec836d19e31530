"""What `snapengine serve --metrics` costs on 4 KiB requests, side by side.

bench/run.py --metrics measures whole runs, minutes apart: on the 2-core machine their
spread (±10 % and more) hides a cost of a few percent. Here two daemons run at the same
time, each on its own image of random data in --dir: one without --metrics, one with.
fio (4k randwrite, then 4k randread, iodepth 32, time-based, no snapshot) alternates
between them, the order flipping every repeat, so each pair is measured seconds apart.
Per row: median IOPS, the median of the per-pair on/off ratios, and the user CPU time
of the nbdkit process per request (/proc/PID/stat). ``--control`` runs both daemons
without --metrics: the spread an on/off ratio has when nothing differs.

    .venv/bin/python -m bench.metrics_cost [--repeat N] [--runtime S] [--control] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile

from bench import MiB
from bench.fio import RANDREAD_4K, RANDWRITE_4K, Job, Workload
from bench.minor import ORIGIN_NAME
from bench.pairs import Measurement, measure, pair_order
from bench.servers import make_image
from tests.harness import daemon
from tests.harness.sockets import free_tcp_port

MODES = ("off", "on")
WORKLOADS = (RANDWRITE_4K, RANDREAD_4K)


def row(w: Workload, got: dict[str, list[Measurement]]) -> str:
    off, on = got["off"], got["on"]
    ratios = [b.sample.iops / a.sample.iops for a, b in zip(off, on)]
    cpu_off, cpu_on = (statistics.median(s.cpu_us for s in got[m]) for m in MODES)
    return (f"| {w.name} | {statistics.median(s.sample.iops for s in off):,.0f} | "
            f"{statistics.median(s.sample.iops for s in on):,.0f} | "
            f"{statistics.median(ratios):.3f} | "
            f"{min(ratios):.2f}–{max(ratios):.2f} | {cpu_off:.1f} | {cpu_on:.1f} | "
            f"{statistics.median(b.cpu_us - a.cpu_us for a, b in zip(off, on)):+.1f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=16, help="pairs per workload (default 16)")
    p.add_argument("--runtime", type=int, default=4, help="seconds per fio run (default 4)")
    p.add_argument("--size-mib", type=int, default=512, help="each image (default 512)")
    p.add_argument("--dir", default="/dev/shm", help="the images (default %(default)s)")
    p.add_argument("--control", action="store_true", help="both daemons without --metrics")
    a = p.parse_args(argv)
    got: dict[tuple[str, str], list[Measurement]] = {}
    work = tempfile.mkdtemp(dir=a.dir, prefix="metrics-cost-")
    runs = tempfile.mkdtemp(prefix="mc-")  # short paths for the sockets
    try:
        with contextlib.ExitStack() as stack:
            daemons = {}
            for mode in MODES:
                image = os.path.join(work, f"{mode}.img")
                make_image(image, a.size_mib * MiB)
                extra = ["--metrics", f"127.0.0.1:{free_tcp_port()}"] if mode == "on" and \
                    not a.control else []
                daemons[mode] = stack.enter_context(daemon(
                    os.path.join(runs, mode), [(image, ORIGIN_NAME)], extra, verbose=False))
            for r in range(a.repeat):
                for w in WORKLOADS:
                    for mode in pair_order(r, MODES):
                        d = daemons[mode]
                        got.setdefault((w.name, mode), []).append(
                            measure(d.pid, Job(d.uri(ORIGIN_NAME), w, a.runtime)))
                print(f"[{r + 1}/{a.repeat}] done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(runs, ignore_errors=True)
    print(f"{'control: both without --metrics' if a.control else '--metrics off / on'}, "
          f"{a.repeat} pairs of {a.runtime} s per row\n")
    print("| workload | IOPS off | IOPS on | on / off (median of pairs) | range | "
          "user CPU µs/request off | on | paired difference |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for w in WORKLOADS:
        print(row(w, {m: got[(w.name, m)] for m in MODES}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
