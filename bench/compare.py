"""Two revisions of snapengine side by side: is B faster or slower than A, and by how much?

    .venv/bin/python -m bench.compare REV_A REV_B [--repeat N] [--runtime S]
        [--only SUBSTRING]... [--dir DIR] [--pin] [--json FILE]

REV is a git commit (``HEAD``, ``HEAD~3``, a branch...; checked out with ``git worktree
add --detach`` in a temporary directory, removed on the way out) or ``WORKTREE``, this
checkout with its uncommitted changes. One daemon per revision runs that tree's code
(bench/trees.py; the report prints the plugin path nbdkit runs), both at the same time,
each on its own image of random data in --dir. For each scenario, fio pairs alternate
between A and B, the order flipping every pair (bench/pairs.py), so each pair is
measured seconds apart and slow drift of the machine cancels in its B/A ratio.

Per scenario: median IOPS of A and of B, the median of the paired B/A ratios and a
distribution-free 95 % interval of that median (order statistics; with fewer than 6
pairs only [min, max], with the coverage it has), and the user CPU time the nbdkit
process spent per request (/proc/PID/stat). The qd1 scenarios also give p50 and p99
completion latency and the median of the paired B - A differences, with its interval.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator

from bench import BenchError, MiB
from bench.fio import (RANDREAD_4K, RANDREAD_4K_QD1, RANDWRITE_4K, RANDWRITE_4K_QD1,
                       SEQWRITE_1M, Job, Workload, run_fio)
from bench.minor import MINOR, ORIGIN_NAME, SNAPSHOT_EXPORT, snapshot_minor, state_text
from bench.pairs import Measurement, alternate, measure, median_interval
from bench.rows import FIRST, INCREMENTAL, PLAIN, RETOUCH, SNAPREAD
from bench.run import raise_on_sigterm
from bench.scenarios import progress
from bench.servers import FIO_CPU, SERVER_CPU, check_can_pin, check_pinned, make_image
from bench.trees import Tree, TreeDaemon, check_tree, tree_daemon, trees
from tests.harness import CommandFailed, ServerStartError

KIND_NAMES = {PLAIN: "no snapshot", INCREMENTAL: "incremental", RETOUCH: "re-touch",
              FIRST: "first touch", SNAPREAD: "snapshot export"}


@dataclass(frozen=True)
class Scenario:
    workload: Workload
    kind: str  # a phase of bench.rows: PLAIN, INCREMENTAL, RETOUCH, FIRST, SNAPREAD

    @property
    def name(self) -> str:
        return f"{self.workload.name} {KIND_NAMES[self.kind]}"

    @property
    def qd1(self) -> bool:
        return self.workload.iodepth == 1


SCENARIOS = tuple(Scenario(w, kind) for w, kinds in (
    (RANDWRITE_4K, (PLAIN, INCREMENTAL, RETOUCH, FIRST)), (RANDREAD_4K, (SNAPREAD,)),
    (RANDWRITE_4K_QD1, (PLAIN, INCREMENTAL, RETOUCH, FIRST)), (RANDREAD_4K_QD1, (SNAPREAD,)),
) for kind in kinds)


@dataclass
class Side:
    tree: Tree
    daemon: TreeDaemon
    plugin: str  # the nbd_plugin.py its nbdkit runs


@dataclass
class Options:
    rev_a: str
    rev_b: str
    repeat: int
    runtime: int
    only: list[str]
    dir: str
    size: int
    touch: int  # one pass of the 4k first-touch scenario (qd1: a quarter of it)
    retouch: int  # region of the re-touch scenario (a 1M pass first)
    pin: bool
    json_path: str

    def scenarios(self) -> list[Scenario]:
        subs = [s.lower() for s in self.only]
        return [sc for sc in SCENARIOS if not subs or any(s in sc.name.lower() for s in subs)]


class Comparison:
    """Runs the scenarios on the sides' daemons, pairs alternating."""

    def __init__(self, o: Options, sides: dict[str, Side], work: str) -> None:
        self.o = o
        self.sides = sides
        self.work = work  # COW files
        self._serial = 0

    @contextlib.contextmanager
    def minor(self, label: str, incremental: bool = False) -> Iterator[None]:
        """A fresh snapshot (or incremental) of side ``label``; checked not failed."""
        d = self.sides[label].daemon
        self._serial += 1
        cow = os.path.join(self.work, f"cow-{label}-{self._serial}")
        with snapshot_minor(d, cow, self.o.size, incremental):
            yield
            info = d.info(int(MINOR))
            if "error" in info:
                raise BenchError(f"{label}: minor {MINOR} failed: {state_text(info)}")

    def job(self, sc: Scenario, label: str) -> Job:
        d = self.sides[label].daemon
        export = SNAPSHOT_EXPORT if sc.kind == SNAPREAD else ORIGIN_NAME
        pass_bytes = 0
        if sc.kind == FIRST:
            pass_bytes = self.o.touch // 4 if sc.qd1 else self.o.touch
        region = self.o.retouch if sc.kind == RETOUCH else 0
        return Job(d.uri(export), sc.workload, self.o.runtime, pass_bytes, region,
                   FIO_CPU if self.o.pin else None)

    def once(self, sc: Scenario, label: str, r: int) -> Measurement:
        """One measurement of ``sc`` on side ``label`` (a fresh minor if it needs one)."""
        pid = self.sides[label].daemon.pid
        if sc.kind in (INCREMENTAL, FIRST):
            with self.minor(label, incremental=sc.kind == INCREMENTAL):
                m = measure(pid, self.job(sc, label), r)
        else:
            m = measure(pid, self.job(sc, label), r)
        progress(f"[{r + 1}/{self.o.repeat}] {sc.name} {label}: {m.sample.iops:,.0f} IOPS, "
                 f"p50 {m.sample.p50_us:.1f} p99 {m.sample.p99_us:.1f} µs, "
                 f"{m.cpu_us:.1f} µs CPU/request")
        return m

    @contextlib.contextmanager
    def prepared(self, sc: Scenario) -> Iterator[None]:
        """Re-touch and snapshot export: one snapshot per side for all the pairs, with
        the pass that prepares it (1M over the re-touch region; 4k over --touch-mib)."""
        if sc.kind not in (RETOUCH, SNAPREAD):
            yield
            return
        w, region = (SEQWRITE_1M, self.o.retouch) if sc.kind == RETOUCH else \
            (RANDWRITE_4K, self.o.touch)
        with contextlib.ExitStack() as stack:
            for label, side in self.sides.items():
                stack.enter_context(self.minor(label))
                run_fio(Job(side.daemon.uri(ORIGIN_NAME), w, pass_bytes=region,
                            cpu=FIO_CPU if self.o.pin else None))
            yield

    def run(self, sc: Scenario) -> dict[str, list[Measurement]]:
        with self.prepared(sc):
            return alternate(self.o.repeat, list(self.sides),
                             lambda label, r: self.once(sc, label, r))


# -- report ---------------------------------------------------------------------------

def interval_text(values: list[float], fmt: str) -> str:
    low, high, coverage = median_interval(values)
    return f"{low:{fmt}} – {high:{fmt}} ({coverage * 100:.0f} %)"


def throughput_row(sc: Scenario, a: list[Measurement], b: list[Measurement]) -> str:
    ratios = [y.sample.iops / x.sample.iops for x, y in zip(a, b) if x.sample.iops]
    cpu = [y.cpu_us - x.cpu_us for x, y in zip(a, b)]
    med = statistics.median
    return (f"| {sc.name} | {med(m.sample.iops for m in a):,.0f} | "
            f"{med(m.sample.iops for m in b):,.0f} | {med(ratios):.3f} | "
            f"{interval_text(ratios, '.3f')} | {med(m.cpu_us for m in a):.1f} | "
            f"{med(m.cpu_us for m in b):.1f} | {med(cpu):+.1f} |")


def latency_row(sc: Scenario, a: list[Measurement], b: list[Measurement]) -> str:
    cells = []
    for field in ("p50_us", "p99_us"):
        xs = [getattr(m.sample, field) for m in a]
        ys = [getattr(m.sample, field) for m in b]
        diffs = [y - x for x, y in zip(xs, ys)]
        cells += [f"{statistics.median(xs):.1f}", f"{statistics.median(ys):.1f}",
                  f"{statistics.median(diffs):+.1f}", interval_text(diffs, "+.1f")]
    return f"| {sc.name} | " + " | ".join(cells) + " |"


def report(o: Options, sides: dict[str, Side],
           results: list[tuple[Scenario, dict[str, list[Measurement]]]]) -> list[str]:
    lines = [f"snapengine compare: {o.repeat} pairs per scenario, {o.runtime} s per "
             f"time-based run, images of {o.size // MiB} MiB in {o.dir}"
             + ("; daemons pinned to CPU 0, fio to CPU 1" if o.pin else ""), ""]
    for label, s in sides.items():
        lines.append(f"* {label} = {s.tree.rev} ({s.tree.commit}): nbdkit runs {s.plugin}")
    lines += ["", "| scenario | IOPS A | IOPS B | B / A (median of pairs) | 95 % interval "
              "(coverage) | user CPU µs/request A | B | B − A (paired) |",
              "|---|---:|---:|---:|---|---:|---:|---:|"]
    lines += [throughput_row(sc, got["A"], got["B"]) for sc, got in results]
    qd1 = [(sc, got) for sc, got in results if sc.qd1]
    if qd1:
        lines += ["", "| scenario | p50 µs A | B | B − A | 95 % interval | p99 µs A | B | "
                  "B − A | 95 % interval |", "|---|---:|---:|---:|---|---:|---:|---:|---|"]
        lines += [latency_row(sc, got["A"], got["B"]) for sc, got in qd1]
    return lines


def results_json(o: Options, sides: dict[str, Side],
                 results: list[tuple[Scenario, dict[str, list[Measurement]]]]) -> dict[str, Any]:
    return {"options": vars(o),
            "sides": {k: {**vars(s.tree), "plugin": s.plugin} for k, s in sides.items()},
            "scenarios": [{"name": sc.name, **{label: [{**vars(m.sample), "cpu_us": m.cpu_us}
                                                       for m in got[label]] for label in got}}
                          for sc, got in results]}


# -- command line ---------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev_a", metavar="REV_A", help="a commit, or WORKTREE (uncommitted work tree)")
    p.add_argument("rev_b", metavar="REV_B", help="the same; ratios are B / A")
    p.add_argument("--repeat", type=int, default=10, help="pairs per scenario (default 10)")
    p.add_argument("--runtime", type=int, default=3, help="seconds per time-based run (default 3)")
    p.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                   help="only scenarios whose name contains SUBSTRING (case-insensitive; "
                   "repeatable); names: " + "; ".join(sc.name for sc in SCENARIOS))
    p.add_argument("--dir", default="/dev/shm",
                   help="the images and COW files (default %(default)s)")
    p.add_argument("--size-mib", type=int, default=512, help="each image (default 512)")
    p.add_argument("--touch-mib", type=int, default=64, help="first-touch pass (qd1: a quarter "
                   "of it) and the snapshot-export scenario's 4k pass (default 64)")
    p.add_argument("--retouch-mib", type=int, default=128, help="region of the re-touch "
                   "scenario, written once in 1M first (default 128)")
    p.add_argument("--pin", action="store_true", help="daemons on CPU 0, fio on CPU 1")
    p.add_argument("--json", default="", metavar="FILE", help="also write every sample as JSON")
    a = p.parse_args(argv)
    size = a.size_mib * MiB
    o = Options(a.rev_a, a.rev_b, a.repeat, a.runtime, a.only, a.dir, size,
                min(size, a.touch_mib * MiB), min(size, a.retouch_mib * MiB), a.pin, a.json)
    if o.repeat <= 0 or o.runtime <= 0 or o.touch < 4 * 4096 or o.retouch < MiB:
        p.error("--repeat, --runtime and the sizes must be positive")
    if not o.scenarios():
        p.error(f"no scenario matches {o.only}")
    return o


def start_sides(o: Options, ts: list[Tree], work: str, runs: str,
                stack: contextlib.ExitStack) -> dict[str, Side]:
    """One daemon per tree, each on its own image; checked to run its tree's plugin."""
    sides: dict[str, Side] = {}
    for t in ts:
        image = os.path.join(work, f"{t.label}.img")
        progress(f"{t.label} = {t.rev} ({t.commit}) at {t.path}: a {o.size // MiB} MiB image")
        make_image(image, o.size)
        d = stack.enter_context(tree_daemon(t, os.path.join(runs, f"run-{t.label}"),
                                            [(image, ORIGIN_NAME)], SERVER_CPU if o.pin else None))
        if o.pin:
            check_pinned(d.pid, SERVER_CPU)
        sides[t.label] = Side(t, d, check_tree(d))
        progress(f"{t.label}: nbdkit {d.pid} runs {sides[t.label].plugin}")
    return sides


def compare(o: Options) -> list[str]:
    runs = tempfile.mkdtemp(prefix="snapengine-compare-")  # worktrees, run dirs (sockets)
    work = tempfile.mkdtemp(prefix="snapengine-compare-", dir=o.dir)
    try:
        with trees([o.rev_a, o.rev_b], runs) as ts, contextlib.ExitStack() as stack:
            sides = start_sides(o, ts, work, runs, stack)
            comparison = Comparison(o, sides, work)
            results = [(sc, comparison.run(sc)) for sc in o.scenarios()]
            if o.json_path:
                with open(o.json_path, "w") as f:
                    json.dump(results_json(o, sides, results), f, indent=2)
            return report(o, sides, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(runs, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    o = parse_args(argv)
    raise_on_sigterm()
    try:
        if o.pin:
            check_can_pin()
        need = 2 * o.size + 2 * max(o.touch, o.retouch) + 64 * MiB
        if shutil.disk_usage(o.dir).free < need:
            raise BenchError(f"{o.dir} has less than the {need // MiB} MiB the run needs")
        print("\n".join(compare(o)))
    except (BenchError, CommandFailed, ServerStartError, OSError, subprocess.TimeoutExpired) as e:
        print(f"bench.compare: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench.compare: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
