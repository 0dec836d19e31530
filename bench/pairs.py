"""Side-by-side measurements: fio pairs alternating between two servers, the server's
CPU time per request, and the interval of a median of paired ratios.

Two servers run at the same time; each pair measures one then the other, seconds
apart, the order flipping every pair, so slow drift of a shared machine cancels in the
per-pair ratio (bench.compare, bench.metrics_cost).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from math import comb
from typing import Callable, Sequence, TypeVar

from bench.fio import Job, Sample, run_fio

T = TypeVar("T")


def user_seconds(pid: int) -> float:
    """User CPU time of process ``pid``, its exited threads included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Measurement:
    sample: Sample
    cpu_us: float  # user CPU µs per request of the server process during the job


def measure(pid: int, job: Job, repeat: int = 0) -> Measurement:
    """One fio job, and the user CPU time server process ``pid`` spent per request."""
    before = user_seconds(pid)
    sample = run_fio(job, repeat)
    return Measurement(sample, (user_seconds(pid) - before) / max(sample.ios, 1) * 1e6)


def pair_order(r: int, sides: Sequence[T]) -> list[T]:
    """The order of pair ``r``: as given on even pairs, reversed on odd ones."""
    return list(sides) if r % 2 == 0 else list(reversed(sides))


def alternate(pairs: int, sides: Sequence[str],
              one: Callable[[str, int], Measurement]) -> dict[str, list[Measurement]]:
    """``pairs`` pairs of ``one(side, r)``, the order flipping every pair."""
    got: dict[str, list[Measurement]] = {side: [] for side in sides}
    for r in range(pairs):
        for side in pair_order(r, sides):
            got[side].append(one(side, r))
    return got


def binom_cdf(k: int, n: int) -> float:
    """P(X ≤ k), X ~ Binomial(n, 1/2)."""
    return sum(comb(n, i) for i in range(k + 1)) / 2 ** n


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free interval for the median of ``values``: (low, high, coverage).

    The order-statistic interval [x(k), x(n+1-k)] (sorted values, 1-based) with the
    largest k whose coverage 1 - 2 P(Binomial(n, 1/2) ≤ k-1) is at least ``level``.
    Too few values for ``level`` (fewer than 6 for 95 %): [min, max] and the coverage
    it has."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    k = 1
    while k < n // 2 + 1 and 1 - 2 * binom_cdf(k, n) >= level:
        k += 1
    return xs[k - 1], xs[n - k], 1 - 2 * binom_cdf(k - 1, n)
