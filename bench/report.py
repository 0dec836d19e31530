"""bench.run's report: per directory, the rows, latency, targets and counters tables
(markdown on stdout) and the same data as a JSON-ready dict."""

from __future__ import annotations

import statistics
from typing import Any

from bench import MiB
from bench.fio import Sample
from bench.rows import MINIMAL, MINIMAL_KEPT, PEERS, Counters, RowKey
from bench.scenarios import Bench, Settings
from bench.targets import (LATENCY_FIELDS, STRETCH, Samples, added_latency, fmt_ratio,
                           fmt_us, median_latency, ratio, target_results)


def medians(got: list[Sample]) -> tuple[float, float] | None:
    """(IOPS, MB/s) medians over the repeats; MB = 10**6 bytes."""
    if not got:
        return None
    return (statistics.median(s.iops for s in got),
            statistics.median(s.bw_bytes for s in got) / 1e6)


def rows_table(keys: list[RowKey], samples: Samples) -> list[str]:
    out = ["| workload | system | mode | IOPS | MB/s | " + " | ".join(f"× {p}" for p in PEERS)
           + " |", "|---|---|---|---:|---:|" + "---:|" * len(PEERS)]
    for k in keys:
        m = medians(samples.get(k, []))
        iops, mbs = (f"{m[0]:,.0f}", f"{m[1]:,.0f}") if m else ("n/a", "n/a")
        ratios = " | ".join(fmt_ratio(ratio(samples, k, p)) for p in PEERS)
        out.append(f"| {k.workload.name} | {k.system} | {k.mode} | {iops} | {mbs} | {ratios} |")
    return out


def latency_table(keys: list[RowKey], samples: Samples) -> list[str]:
    """Completion latency at iodepth 1: percentiles, and what the row adds over
    minimal-python's row of the same workload (median of same-repeat differences)."""
    out = ["| workload | system | mode | IOPS | p50 µs | p99 µs | p99.9 µs | "
           f"p50 over {MINIMAL} | p99 over {MINIMAL} | p50 over {MINIMAL_KEPT} | "
           f"p99 over {MINIMAL_KEPT} |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in keys:
        got = samples.get(k, [])
        m = medians(got)
        lat = " | ".join(fmt_us(median_latency(got, p)) for p in LATENCY_FIELDS)
        added = " | ".join(fmt_us(added_latency(samples, k, p, peer), sign=True)
                           for peer in (MINIMAL, MINIMAL_KEPT) for p in ("p50", "p99"))
        out.append(f"| {k.workload.name} | {k.system} | {k.mode} | "
                   f"{f'{m[0]:,.0f}' if m else 'n/a'} | {lat} | {added} |")
    return out


def targets_table(results: list[dict[str, Any]]) -> list[str]:
    out = ["| target | required | measured | result |", "|---|---|---:|---|"]
    for r in results:
        out.append(f"| {r['target']} | {r['required']} | {r['shown']} | {r['result']} |")
    return out


def counters_table(counters: dict[str, Counters]) -> list[str]:
    out = ["| after scenario (last repeat) | state | nr_changed_blocks | expected | "
           "file apparent | file real |", "|---|---|---:|---:|---:|---:|"]
    for c in counters.values():
        out.append(f"| {c.scenario} | {c.state} | {c.nr_changed_blocks} | {c.expected} | "
                   f"{c.apparent_bytes / MiB:,.1f} MiB | {c.real_bytes / MiB:,.1f} MiB |")
    return out


def settings_lines(s: Settings) -> list[str]:
    lines = [f"snapengine benchmark: image {s.size // MiB} MiB, {s.runtime} s per time-based "
             f"run, median of {s.repeat} repeat(s), 4k first touch over the first "
             f"{s.touch // MiB} MiB (qd1: {s.qd1_touch / MiB:g} MiB); snapengine metrics "
             f"{'on' if s.metrics else 'off'}; "
             + (f"snapengine --threads {s.threads}; " if s.threads else "")
             + ("servers pinned to CPU 0, fio to CPU 1" if s.pin else "no CPU pinning"), ""]
    if s.only:
        lines += [f"only rows matching: {', '.join(map(repr, s.only))}", ""]
    return lines


def row_json(k: RowKey, samples: Samples) -> dict[str, Any]:
    got = samples.get(k, [])
    return {"workload": k.workload.name, "system": k.system, "mode": k.mode, "phase": k.phase,
            "medians": medians(got), "samples": [vars(x) for x in got],
            "ratios": {p: ratio(samples, k, p) for p in PEERS},
            "latency_us": {p: median_latency(got, p) for p in LATENCY_FIELDS},
            "added_latency_us": {peer: {p: added_latency(samples, k, p, peer)
                                        for p in ("p50", "p99")}
                                 for peer in (MINIMAL, MINIMAL_KEPT)}}


def dir_report(bench: Bench, fstype: str, elapsed: float) -> tuple[list[str], dict[str, Any]]:
    """The markdown lines of one directory's run, and its JSON."""
    keys = bench.all_keys()
    targets = target_results(bench.samples)
    lines = [f"## {bench.dir} ({fstype})", "",
             f"run took {elapsed:.0f} s" + ("; on a disk the rows include page-cache "
                                          "writeback" if fstype != "tmpfs" else ""), ""]
    if bench.qemu_reason:
        lines += [f"qemu-fleecing rows are n/a: {bench.qemu_reason}", ""]
    lines += ["### rows", ""] + rows_table(keys, bench.samples) + [""]
    if bench.latency_keys():
        lines += ["### latency at iodepth 1", ""]
        lines += latency_table(bench.latency_keys(), bench.samples) + [""]
    stretch = target_results(bench.samples, STRETCH)
    lines += ["### targets", ""] + targets_table(targets) + [""]
    lines += ["### stretch: the same limits against minimal-python-kept", ""]
    lines += targets_table(stretch) + [""]
    if bench.counters:
        lines += ["### counters", ""] + counters_table(bench.counters) + [""]
    data = {"dir": bench.dir, "fstype": fstype, "elapsed_s": elapsed,
            "qemu": bench.qemu_reason or "ok", "rows": [row_json(k, bench.samples) for k in keys],
            "targets": targets, "stretch": stretch,
            "counters": [vars(c) for c in bench.counters.values()]}
    return lines, data
