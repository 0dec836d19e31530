"""snapengine benchmark: snapengine beside three peers, in one run, on one image per
directory.

Method
------
For each ``--dir`` (default /dev/shm; ``make bench`` gives /dev/shm and /var/tmp), one
sparse raw image (default 2 GiB) is created there and filled with random data once, so
every read returns real data; the COW files and qemu's fleecing targets go there too,
and every server is started afresh for the directory. On /dev/shm everything is
page-cache resident and the numbers measure the servers, not a disk; on a disk they
include the page cache's writeback (caches are not dropped).

Every measurement is one fio job with the ``nbd`` engine over a Unix socket,
``numjobs=1``: 4k requests at iodepth 32, 1M requests at iodepth 8, and the latency
workloads "4k randwrite qd1" / "4k randread qd1" at iodepth 1 (completion latency
p50 / p99 / p99.9 recorded).

* Time-based rows run ``--runtime`` seconds (default 5) over the whole image, with
  ``norandommap`` (plain uniform random offsets).
* "First touch" rows are one pass over fresh blocks, not time-based: ``io_size``
  equals the region, ``randrepeat=1`` and fio's random map on (``norandommap=0``),
  so every block of the region is written exactly once. 4k randwrite covers the
  first ``--touch-mib`` MiB of the image (default: a quarter of it); 4k randwrite qd1
  the first ``--qd1-touch-mib`` (default: min(64, touch / 4)); 1M seqwrite covers the
  whole image once. Each runs on a fresh snapshot (a fresh fleecing target for
  qemu): nothing is copied yet when it starts.
* "Re-touch" rows run, time-based, on the snapshot of the 1M first-touch pass:
  every block is already copied.
* Snapshot-export rows read the snapshot (time-based) right after the 4k
  first-touch pass: blocks of the touched region come from the COW file (saved in
  random order), the rest from the origin.

Systems: ``nbdkit file`` (C, the ceiling); bench/minimal_plugin.py (the floor of a
Python plugin); qemu-storage-daemon image fleecing (copy-before-write node + a
snapshot-access node, the reference for snapshot costs); snapengine (one daemon per
directory, minor 0 set up and destroyed around each scenario).

Noise: every scenario is repeated ``--repeat`` times (default 3), interleaved (the
order within a group flips on odd repeats). A row's numbers are medians over the
repeats; a ratio (or an added latency) is the median of the per-repeat ratios
(differences). ``--pin`` runs the servers on CPU 0 and fio on CPU 1.

Output, per directory: the rows table (IOPS, MB/s, ratios), the latency table, the
targets (met / missed / n/a) and snapengine's counters after each snapshot scenario.
Progress goes to stderr; ``--json FILE`` also saves all. The modules: bench.fio (fio
jobs), bench.servers (peers, images, pinning), bench.rows (rows), bench.scenarios (one
directory's run), bench.targets (ratios, targets), bench.report (tables);
bench.compare compares two revisions side by side.

    .venv/bin/python -m bench.run [--quick] [--dir DIR]... [--only SUBSTRING] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench import BLOCK, BenchError, MiB
from bench.report import dir_report, settings_lines
from bench.scenarios import Bench, Settings, progress
from bench.servers import check_can_pin, fs_type, make_image
from tests.harness import BIN, CommandFailed, ServerStartError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark snapengine against nbdkit file, a "
                                "minimal nbdkit Python plugin and qemu image fleecing (see "
                                "bench/README.md).")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 repeat, 2 s runs, 512 MiB image")
    p.add_argument("--size-mib", type=int, help="image size in MiB (default 2048; --quick 512)")
    p.add_argument("--touch-mib", type=int, help="region of the 4k first-touch pass, in MiB "
                   "(default: a quarter of the image)")
    p.add_argument("--qd1-touch-mib", type=float, help="region of the 4k qd1 first-touch "
                   "pass, in MiB (default: min(64, touch / 4))")
    p.add_argument("--runtime", type=int, help="seconds per time-based run (default 5; --quick 2)")
    p.add_argument("--repeat", type=int, help="repeats, interleaved; medians reported "
                   "(default 3; --quick 1)")
    p.add_argument("--dir", action="append", metavar="DIR",
                   help="where the image, COW files and fleecing targets go; repeatable: the whole "
                   "run is done per directory (default /dev/shm: page-cache resident)")
    p.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                   help="run only rows whose 'workload system mode' contains SUBSTRING "
                   "(case-insensitive; repeatable: any of them); ratios need the peer rows too")
    p.add_argument("--json", default="", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--metrics", action="store_true", help="run snapengine with --metrics "
                   "127.0.0.1:<a free port>: the rows then include the recorders' cost")
    p.add_argument("--pin", action="store_true", help="run the servers on CPU 0 (taskset / "
                   "affinity) and fio on CPU 1")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="snapengine serve --threads N (nbdkit worker threads per connection; "
                   "default: serve's own)")
    return p


def parse_args(argv: list[str] | None) -> Settings:
    p = build_parser()
    a = p.parse_args(argv)
    size = (a.size_mib or (512 if a.quick else 2048)) * MiB
    touch = min(size, a.touch_mib * MiB if a.touch_mib else size // 4)
    qd1 = int(a.qd1_touch_mib * MiB) if a.qd1_touch_mib else min(64 * MiB, touch // 4)
    qd1 = min(size, qd1 // BLOCK * BLOCK)
    dirs = list(dict.fromkeys(a.dir or ["/dev/shm"]))
    s = Settings(size=size, touch=touch, qd1_touch=qd1,
                 runtime=a.runtime or (2 if a.quick else 5),
                 repeat=a.repeat or (1 if a.quick else 3), dirs=dirs, only=a.only,
                 json_path=a.json, metrics=a.metrics, pin=a.pin, threads=a.threads)
    if min(s.touch, s.qd1_touch) < BLOCK or min(s.size, s.runtime, s.repeat) <= 0:
        p.error("sizes, --runtime and --repeat must be positive")
    return s


def check_tools(s: Settings) -> None:
    tools = ("fio", "nbdkit") + (("taskset",) if s.pin else ())
    missing = [t for t in tools if shutil.which(t) is None]
    missing += [p for p in (os.path.join(BIN, "snapengine"), os.path.join(BIN, "elioctl"))
                if not os.path.exists(p)]
    if missing:
        raise BenchError(f"missing: {', '.join(missing)} (run `make setup`, and run this "
                         "script with .venv/bin/python -m bench.run)")
    if s.pin:
        check_can_pin()


def check_space(s: Settings, dir: str) -> None:
    """The image, one full COW file and one full fleecing target exist at once."""
    need = 3 * s.size + s.size // 128 + 64 * MiB  # + snapengine's index and slack
    free = shutil.disk_usage(dir).free
    if free < need:
        raise BenchError(f"{dir} has {free // MiB} MiB free, the run needs {need // MiB} MiB "
                         "(use --dir or a smaller --size-mib)")


def raise_on_sigterm() -> None:
    """SIGTERM ends the run through the ``finally`` clauses, like Ctrl-C."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def run_dir(s: Settings, dir: str) -> dict[str, Any]:
    """The whole run in ``dir``: its own image and servers; prints its report."""
    started = time.monotonic()
    fstype = fs_type(dir)
    with contextlib.ExitStack() as stack:
        work = tempfile.mkdtemp(prefix="snapengine-bench-", dir=dir)
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        run = tempfile.mkdtemp(prefix="seb-")  # short paths for the sockets
        stack.callback(shutil.rmtree, run, ignore_errors=True)
        bench = Bench(s, dir, work, run, stack)
        progress(f"{dir} ({fstype}): creating a {s.size // MiB} MiB image of random data "
                 f"in {work}")
        make_image(bench.image, s.size)
        bench.start_servers()
        bench.run_all()
        lines, data = dir_report(bench, fstype, time.monotonic() - started)
    print("\n".join(lines), flush=True)
    return data


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    raise_on_sigterm()
    done: list[dict[str, Any]] = []
    code = 0
    try:
        check_tools(s)
        for d in s.dirs:
            check_space(s, d)
        print("\n".join(settings_lines(s)), flush=True)
        for d in s.dirs:
            done.append(run_dir(s, d))
    except (BenchError, CommandFailed, ServerStartError, OSError, subprocess.TimeoutExpired) as e:
        print(f"bench: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        code = 130
    if s.json_path and done:  # the directories done, even if a later one failed
        with open(s.json_path, "w") as f:
            json.dump({"settings": vars(s), "dirs": done}, f, indent=2)
    return code


if __name__ == "__main__":
    sys.exit(main())
