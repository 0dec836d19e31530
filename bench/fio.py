"""fio: the workloads, one job's command line, and its JSON output as a ``Sample``.

Every job uses the ``nbd`` engine over a Unix socket with ``numjobs=1``. A job is
either time-based (``runtime`` seconds, plain uniform random offsets) or one pass
(``pass_bytes``: every block of ``[0, pass_bytes)`` exactly once). Completion latency
percentiles (``--percentile_list=50:99:99.9``, JSON ``clat_ns.percentile``) are kept
for every job, in µs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bench import BenchError, MiB
from tests.harness import run

PASS_TIMEOUT = 1800.0  # seconds for one one-pass job
PERCENTILES = (50.0, 99.0, 99.9)


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str  # fio --rw
    bs: int  # bytes
    iodepth: int

    @property
    def is_read(self) -> bool:
        return "read" in self.rw


RANDWRITE_4K = Workload("4k randwrite", "randwrite", 4096, 32)
SEQWRITE_1M = Workload("1M seqwrite", "write", MiB, 8)
RANDREAD_4K = Workload("4k randread", "randread", 4096, 32)
SEQREAD_1M = Workload("1M seqread", "read", MiB, 8)
RANDWRITE_4K_QD1 = Workload("4k randwrite qd1", "randwrite", 4096, 1)
RANDREAD_4K_QD1 = Workload("4k randread qd1", "randread", 4096, 1)
WORKLOADS = (RANDWRITE_4K, SEQWRITE_1M, RANDREAD_4K, SEQREAD_1M, RANDWRITE_4K_QD1,
             RANDREAD_4K_QD1)
WRITES = (RANDWRITE_4K, SEQWRITE_1M)
READS = (RANDREAD_4K, SEQREAD_1M)
LATENCY_WORKLOADS = (RANDWRITE_4K_QD1, RANDREAD_4K_QD1)  # the latency table's rows


@dataclass(frozen=True)
class Job:
    """One fio run."""

    uri: str
    workload: Workload
    runtime: int = 0  # seconds of a time-based job (when pass_bytes is 0)
    pass_bytes: int = 0  # > 0: one pass over [0, pass_bytes), every block once
    region: int = 0  # time-based: only offsets in [0, region) (0: the whole export)
    cpu: int | None = None  # run fio under `taskset -c CPU`


@dataclass(frozen=True)
class Sample:
    repeat: int
    iops: float
    bw_bytes: float  # bytes per second
    ios: int
    runtime_ms: int
    p50_us: float  # completion latency percentiles
    p99_us: float
    p999_us: float


def fio_cmd(job: Job) -> list[str]:
    w = job.workload
    cmd = [] if job.cpu is None else ["taskset", "-c", str(job.cpu)]
    cmd += ["fio", "--name=bench", "--ioengine=nbd", f"--uri={job.uri}", f"--rw={w.rw}",
            f"--bs={w.bs}", f"--iodepth={w.iodepth}", "--numjobs=1", "--output-format=json",
            "--percentile_list=" + ":".join(f"{p:g}" for p in PERCENTILES)]
    if job.pass_bytes:  # one pass, every block exactly once
        return cmd + [f"--size={job.pass_bytes}", f"--io_size={job.pass_bytes}",
                      "--randrepeat=1", "--norandommap=0"]
    cmd += ["--time_based", f"--runtime={job.runtime}", "--norandommap", "--randrepeat=0"]
    return cmd + ([f"--size={job.region}"] if job.region else [])


def parse_fio(stdout: str, w: Workload) -> dict[str, Any]:
    """fio prints "fio: connected to NBD server" before its JSON: parse from the first '{'."""
    start = stdout.find("{")
    if start < 0:
        raise BenchError(f"fio printed no JSON: {stdout[-500:]}")
    job = json.loads(stdout[start:])["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}")
    return job["read" if w.is_read else "write"]


def clat_us(stats: dict[str, Any]) -> tuple[float, float, float]:
    """The completion latency percentiles of PERCENTILES, in µs (0 if fio gave none)."""
    got = {float(k): v for k, v in stats.get("clat_ns", {}).get("percentile", {}).items()}
    p50, p99, p999 = (got.get(p, 0) / 1000.0 for p in PERCENTILES)
    return p50, p99, p999


def run_fio(job: Job, repeat: int = 0) -> Sample:
    timeout = PASS_TIMEOUT if job.pass_bytes else job.runtime + 120.0
    stats = parse_fio(run(fio_cmd(job), timeout=timeout).stdout, job.workload)
    sample = Sample(repeat, float(stats["iops"]), float(stats["bw_bytes"]),
                    int(stats["total_ios"]), int(stats["runtime"]), *clat_us(stats))
    expected = job.pass_bytes // job.workload.bs
    if job.pass_bytes and sample.ios != expected:
        raise BenchError(f"one-pass job did {sample.ios} I/Os, expected {expected}")
    return sample
