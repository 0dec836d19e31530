"""Ratios and added latency between rows, and the performance targets with verdicts.

Every comparison pairs samples of the same repeat (measured minutes apart at most)
and takes the median over the repeats: a ratio is the median of per-repeat IOPS
ratios, an added latency the median of per-repeat differences of a percentile.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Union

from bench.fio import (RANDREAD_4K, RANDREAD_4K_QD1, RANDWRITE_4K, RANDWRITE_4K_QD1,
                       SEQREAD_1M, SEQWRITE_1M, Sample)
from bench.rows import (FIRST, INCREMENTAL, MINIMAL, MINIMAL_KEPT, PLAIN, QEMU, RETOUCH,
                        SNAPENGINE, SNAPREAD, RowKey)

Samples = dict[RowKey, list[Sample]]
MET, MISSED, NA, MEASURED = "met", "missed", "n/a", "measured"
LATENCY_FIELDS = {"p50": "p50_us", "p99": "p99_us", "p99.9": "p999_us"}


def paired(rows: list[Sample], peers: list[Sample]) -> list[tuple[Sample, Sample]]:
    """(row sample, peer sample) of the same repeat."""
    by_repeat = {p.repeat: p for p in peers}
    return [(s, by_repeat[s.repeat]) for s in rows if s.repeat in by_repeat]


def median_ratio(rows: list[Sample], peers: list[Sample]) -> float | None:
    """Median over repeats of row IOPS / peer IOPS."""
    ratios = [s.iops / p.iops for s, p in paired(rows, peers) if p.iops]
    return statistics.median(ratios) if ratios else None


def peer_key(key: RowKey, peer: str) -> RowKey | None:
    """The peer row a row is compared with: same workload (and same phase for qemu)."""
    if key.system == peer:
        return None
    phase = key.phase if peer == QEMU else PLAIN
    if peer == QEMU and phase not in (FIRST, RETOUCH, SNAPREAD):
        return None
    return RowKey(key.workload, peer, phase)


def ratio(samples: Samples, key: RowKey, peer: str) -> float | None:
    other = peer_key(key, peer)
    if other is None or key not in samples or other not in samples:
        return None
    return median_ratio(samples[key], samples[other])


def added_latency(samples: Samples, key: RowKey, percentile: str,
                  peer: str = MINIMAL) -> float | None:
    """Median over repeats of the row's ``percentile`` ("p50", "p99"...) minus the
    peer's (minimal-python's by default), same workload, same repeat; µs."""
    other = peer_key(key, peer)
    if other is None or key not in samples or other not in samples:
        return None
    field = LATENCY_FIELDS[percentile]
    diffs = [getattr(s, field) - getattr(p, field) for s, p in paired(samples[key], samples[other])]
    return statistics.median(diffs) if diffs else None


def median_latency(got: list[Sample], percentile: str) -> float | None:
    field = LATENCY_FIELDS[percentile]
    return statistics.median(getattr(s, field) for s in got) if got else None


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def fmt_us(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.1f}" if sign else f"{value:.1f}"


def name(key: RowKey) -> str:
    return f"{key.workload.name}: {key.mode}"


def result(target: str, required: str, measured: Any, shown: str, verdict: str) -> dict[str, Any]:
    return {"target": target, "required": required, "measured": measured, "shown": shown,
            "result": verdict}


def verdict(value: float | None, ok: bool) -> str:
    return NA if value is None else (MET if ok else MISSED)


@dataclass(frozen=True)
class RatioTarget:
    """The row's IOPS at least ``minimum`` × the peer's."""

    key: RowKey
    peer: str
    minimum: float

    def check(self, samples: Samples) -> dict[str, Any]:
        value = ratio(samples, self.key, self.peer)
        return result(name(self.key), f"≥ {self.minimum} × {self.peer}", value,
                      fmt_ratio(value), verdict(value, value is not None and value >= self.minimum))


@dataclass(frozen=True)
class LatencyTarget:
    """The row's percentile at most ``maximum_us`` above the peer's."""

    key: RowKey
    percentile: str
    maximum_us: float
    peer: str = MINIMAL

    def check(self, samples: Samples) -> dict[str, Any]:
        value = added_latency(samples, self.key, self.percentile, self.peer)
        return result(f"{name(self.key)}, added {self.percentile}",
                      f"≤ +{self.maximum_us:g} µs over {self.peer}", value,
                      fmt_us(value, sign=True) + ("" if value is None else " µs"),
                      verdict(value, value is not None and value <= self.maximum_us))


@dataclass(frozen=True)
class Measured:
    """No limit: the row's latency percentiles, for the record."""

    key: RowKey

    def check(self, samples: Samples) -> dict[str, Any]:
        got = samples.get(self.key, [])
        values = {p: median_latency(got, p) for p in LATENCY_FIELDS}
        shown = " / ".join(f"{p} {fmt_us(v)}" for p, v in values.items()) + " µs"
        return result(name(self.key), "measured (no limit)",
                      values if got else None, shown if got else "—",
                      MEASURED if got else NA)


Target = Union[RatioTarget, LatencyTarget, Measured]

LATENCY_ROWS = (RowKey(RANDWRITE_4K_QD1, SNAPENGINE, PLAIN),
                RowKey(RANDWRITE_4K_QD1, SNAPENGINE, INCREMENTAL),
                RowKey(RANDWRITE_4K_QD1, SNAPENGINE, RETOUCH),
                RowKey(RANDREAD_4K_QD1, SNAPENGINE, SNAPREAD))
MINIMAL_RATIOS = ((RowKey(RANDWRITE_4K, SNAPENGINE, PLAIN), 0.9),
                  (RowKey(RANDWRITE_4K, SNAPENGINE, INCREMENTAL), 0.9),
                  (RowKey(RANDWRITE_4K, SNAPENGINE, RETOUCH), 0.9),
                  (RowKey(RANDWRITE_4K, SNAPENGINE, FIRST), 0.7),
                  (RowKey(RANDREAD_4K, SNAPENGINE, SNAPREAD), 0.9))
LATENCY_LIMITS = (("p50", 10.0), ("p99", 30.0))
# The targets are against minimal-python as nbdkit runs any Python plugin.
# minimal-python-kept is the same plugin with snapengine's thread-state keeping: the
# same limits against it say what snapengine's own code costs ("stretch" lines).
TARGETS: tuple[Target, ...] = (
    *(RatioTarget(k, MINIMAL, limit) for k, limit in MINIMAL_RATIOS),
    RatioTarget(RowKey(SEQWRITE_1M, SNAPENGINE, FIRST), QEMU, 1.5),
    RatioTarget(RowKey(SEQREAD_1M, SNAPENGINE, SNAPREAD), QEMU, 1.2),
    *(LatencyTarget(k, p, limit) for k in LATENCY_ROWS for p, limit in LATENCY_LIMITS),
    Measured(RowKey(RANDWRITE_4K_QD1, SNAPENGINE, FIRST)),
)
STRETCH: tuple[Target, ...] = (
    *(RatioTarget(k, MINIMAL_KEPT, limit) for k, limit in MINIMAL_RATIOS),
    *(LatencyTarget(k, p, limit, MINIMAL_KEPT) for k in LATENCY_ROWS
      for p, limit in LATENCY_LIMITS),
)


def target_results(samples: Samples, targets: tuple[Target, ...] = TARGETS) -> list[dict[str, Any]]:
    return [t.check(samples) for t in targets]
