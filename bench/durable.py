#!/usr/bin/env python3
"""What `snapengine serve --durable` costs: first-touch writes with and without it.

With --durable, the old data and index entries of every first touch are fdatasync'ed
(group commit: concurrent writers share one fdatasync) before the origin is overwritten,
so an active snapshot survives a power cut (docs/persistence.md). Re-touch writes and
reads cost the same either way: only first touches are measured.

Method: one image (random data), two daemons on it in turn (plain, durable), each
measured on a fresh snapshot: a 4k randwrite first-touch pass over --touch-mib, and a
1M seqwrite first-touch pass over the whole image; repeated, interleaved, medians.
By default the files live on /var/tmp (a real disk: fdatasync is the point); --dir
/dev/shm shows the CPU cost alone.

    .venv/bin/python bench/durable.py [--dir DIR] [--size-mib N] [--touch-mib N] [--repeat N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile

import run as bench  # bench/run.py: fio, servers, images

ROWS = ((bench.RANDWRITE_4K, "touch"), (bench.SEQWRITE_1M, "size"))


def serve(stack: contextlib.ExitStack, image: str, run_dir: str, durable: bool) -> str:
    os.makedirs(run_dir)
    cmd = [str(bench.VENV_BIN / "snapengine"), "serve", "--run-dir", run_dir,
           "--origin", f"{image}={bench.ORIGIN_NAME}"] + (["--durable"] if durable else [])
    socks = [os.path.join(run_dir, "ctl.sock"), os.path.join(run_dir, "nbd.sock")]
    stack.enter_context(bench.server("snapengine", cmd, socks, run_dir + ".log"))
    return run_dir


def first_touch(run_dir: str, work: str, w: bench.Workload, pass_bytes: int, size: int,
                repeat: int) -> float:
    """IOPS of one first-touch pass on a fresh snapshot (destroyed afterwards)."""
    elioctl = [str(bench.VENV_BIN / "elioctl"), "--run-dir", run_dir]
    cow = os.path.join(work, f"cow-{os.path.basename(run_dir)}-{w.bs}-{repeat}")
    bench.run_checked(elioctl + ["setup-snapshot", "-f", str(size // bench.MiB + 1),
                                 bench.ORIGIN_NAME, cow, bench.MINOR])
    try:
        uri = f"nbd+unix:///{bench.ORIGIN_NAME}?socket={run_dir}/nbd.sock"
        return bench.run_fio(uri, w, 0, pass_bytes, repeat).iops
    finally:
        bench.run_checked(elioctl + ["destroy", bench.MINOR])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--touch-mib", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    size, passes = a.size_mib * bench.MiB, {"touch": a.touch_mib * bench.MiB}
    passes["size"] = size
    results: dict[tuple[str, bool], list[float]] = {}
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="snapengine-durable-") as work:
        image = os.path.join(work, "image.raw")
        bench.make_image(image, size)
        for r in range(a.repeat):
            for durable in (False, True) if r % 2 == 0 else (True, False):
                with contextlib.ExitStack() as daemon:
                    run_dir = serve(daemon, image, os.path.join(work, f"run-{durable}-{r}"),
                                    durable)
                    for w, region in ROWS:
                        iops = first_touch(run_dir, work, w, passes[region], size, r)
                        results.setdefault((w.name, durable), []).append(iops)
                        print(f"[{r + 1}/{a.repeat}] {w.name} {'durable' if durable else 'plain'}:"
                              f" {iops:,.0f} IOPS", file=sys.stderr, flush=True)
    print(f"cost of --durable on first touches ({a.dir}, image {a.size_mib} MiB, 4k pass over "
          f"{a.touch_mib} MiB, median of {a.repeat})\n")
    print("| workload | plain IOPS | durable IOPS | durable / plain |\n|---|---:|---:|---:|")
    for w, _ in ROWS:
        plain = statistics.median(results[(w.name, False)])
        durable = statistics.median(results[(w.name, True)])
        print(f"| {w.name} first touch | {plain:,.0f} | {durable:,.0f} | {durable / plain:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
