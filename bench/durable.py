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

    .venv/bin/python -m bench.durable [--dir DIR] [--size-mib N] [--touch-mib N] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

from bench import MiB
from bench.fio import RANDWRITE_4K, SEQWRITE_1M, Job, Workload, run_fio
from bench.minor import MINOR, ORIGIN_NAME
from bench.servers import make_image
from tests.harness import Daemon, daemon

ROWS = ((RANDWRITE_4K, "touch"), (SEQWRITE_1M, "size"))


def first_touch(d: Daemon, work: str, w: Workload, pass_bytes: int, size: int,
                repeat: int) -> float:
    """IOPS of one first-touch pass on a fresh snapshot (destroyed afterwards)."""
    cow = os.path.join(work, f"cow-{os.path.basename(d.run_dir)}-{w.bs}-{repeat}")
    d.elioctl("setup-snapshot", "-f", str(-(-size // MiB)), ORIGIN_NAME, cow, MINOR)
    try:
        return run_fio(Job(d.uri(ORIGIN_NAME), w, pass_bytes=pass_bytes), repeat).iops
    finally:
        d.elioctl("destroy", MINOR)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--touch-mib", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    size, passes = a.size_mib * MiB, {"touch": a.touch_mib * MiB}
    passes["size"] = size
    results: dict[tuple[str, bool], list[float]] = {}
    with tempfile.TemporaryDirectory(dir=a.dir, prefix="snapengine-durable-") as work:
        image = os.path.join(work, "image.raw")
        make_image(image, size)
        for r in range(a.repeat):
            for durable in (False, True) if r % 2 == 0 else (True, False):
                with daemon(os.path.join(work, f"run-{durable}-{r}"), [(image, ORIGIN_NAME)],
                            ["--durable"] if durable else [], verbose=False) as d:
                    for w, region in ROWS:
                        iops = first_touch(d, work, w, passes[region], size, r)
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
