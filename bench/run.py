"""snapengine benchmark: snapengine beside three peers, in one run, on one image.

Method
------
One sparse raw image (default 2 GiB) is created and filled with random data once,
so every read returns real data. The image, the COW files and qemu's fleecing
targets live on /dev/shm by default (``--dir``): everything is page-cache
resident and the numbers measure the servers, not a disk.

Every measurement is one fio job with the ``nbd`` engine over a Unix socket,
``numjobs=1``: 4k requests at iodepth 32, 1M requests at iodepth 8. Workloads:
4k randwrite, 1M seqwrite (``rw=write``), 4k randread, 1M seqread (``rw=read``).

* Time-based rows run ``--runtime`` seconds (default 5) over the whole image, with
  ``norandommap`` (plain uniform random offsets).
* "First touch" rows are one pass over fresh blocks, not time-based: ``io_size``
  equals the region, ``randrepeat=1`` and fio's random map on (``norandommap=0``),
  so every block of the region is written exactly once. 4k randwrite covers the
  first ``--touch-mib`` MiB of the image (default: a quarter of it); 1M seqwrite
  covers the whole image once. Each runs on a fresh snapshot (a fresh fleecing
  target for qemu): nothing is copied yet when it starts.
* "Re-touch" rows run, time-based, on the snapshot of the 1M first-touch pass:
  every block is already copied.
* Snapshot-export rows read the snapshot (time-based) right after the 4k
  first-touch pass: blocks of the touched region come from the COW file (saved in
  random order), the rest from the origin.

Systems: ``nbdkit file`` (C, the ceiling); bench/minimal_plugin.py (the floor of a
Python plugin); qemu-storage-daemon image fleecing (copy-before-write node + a
snapshot-access node, the reference for snapshot costs); snapengine (one daemon for
the whole run, minor 0 set up and destroyed around each scenario).

Noise: every scenario is repeated ``--repeat`` times (default 3); the repeats are
interleaved (peer and snapengine rows alternate, their order flips on odd
repeats). A row's IOPS and MB/s are medians over the repeats; a ratio is the median
of the per-repeat ratios (each pair measured minutes apart at most).

Output: one markdown table (rows and ratios), the targets with PASS/MISS, and
snapengine's counters (``elioctl info``) and COW file sizes after each snapshot
scenario (last repeat). Progress goes to stderr; ``--json FILE`` also saves all.

    .venv/bin/python -m bench.run [--quick] [--only SUBSTRING] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

from bench import BLOCK, MiB
from tests.harness.sockets import free_tcp_port
from tests.harness import (
    BIN,
    CommandFailed,
    Daemon,
    ServerStartError,
    daemon,
    remove_stale_socket,
    run,
    sparse_file,
    stop_process,
    wait_socket,
)

MINIMAL_PLUGIN = Path(__file__).resolve().parent / "minimal_plugin.py"
ORIGIN_NAME = "disk"  # snapengine's export name of the image
MINOR = "0"
PASS_TIMEOUT = 1800.0  # seconds for one first-touch pass
STATES = {0: "dormant incremental", 1: "dormant snapshot", 2: "active incremental",
          3: "active snapshot", 4: "unverified incremental", 5: "unverified snapshot"}

NBDKIT_FILE = "nbdkit-file"
MINIMAL = "minimal-python"
QEMU = "qemu-fleecing"
SNAPENGINE = "snapengine"
PEERS = (NBDKIT_FILE, MINIMAL, QEMU)
SYSTEM_ORDER = (NBDKIT_FILE, MINIMAL, QEMU, SNAPENGINE)

# Phases: what state the origin or snapshot is in during the row. Ratios to qemu
# compare rows of the same phase; ratios to the two plain peers compare workloads.
PLAIN, INCREMENTAL, RETOUCH, FIRST, SNAPREAD = "plain", "incremental", "re-touch", "first", "snapread"
PHASE_ORDER = (PLAIN, INCREMENTAL, RETOUCH, FIRST, SNAPREAD)
MODES = {
    (PLAIN, NBDKIT_FILE): "origin",
    (PLAIN, MINIMAL): "origin",
    (PLAIN, SNAPENGINE): "origin, no snapshot",
    (INCREMENTAL, SNAPENGINE): "origin, incremental mode",
    (RETOUCH, SNAPENGINE): "origin, active snapshot, re-touch",
    (RETOUCH, QEMU): "origin, fleecing, re-touch",
    (FIRST, SNAPENGINE): "origin, active snapshot, first touch",
    (FIRST, QEMU): "origin, fleecing, first touch",
    (SNAPREAD, SNAPENGINE): "snapshot export",
    (SNAPREAD, QEMU): "snapshot export",
}


class BenchError(Exception):
    """A step of the benchmark failed: the message says which and why."""


# -- workloads, rows, samples ---------------------------------------------------------

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
WORKLOADS = (RANDWRITE_4K, SEQWRITE_1M, RANDREAD_4K, SEQREAD_1M)
WRITES = (RANDWRITE_4K, SEQWRITE_1M)
READS = (RANDREAD_4K, SEQREAD_1M)


@dataclass(frozen=True)
class RowKey:
    workload: Workload
    system: str
    phase: str

    @property
    def mode(self) -> str:
        return MODES[(self.phase, self.system)]

    @property
    def label(self) -> str:
        return f"{self.workload.name} {self.system} {self.mode}"

    def sort_key(self) -> tuple[int, int, int]:
        return (WORKLOADS.index(self.workload), PHASE_ORDER.index(self.phase),
                SYSTEM_ORDER.index(self.system))


@dataclass(frozen=True)
class Sample:
    repeat: int
    iops: float
    bw_bytes: float  # bytes per second
    ios: int
    runtime_ms: int


@dataclass(frozen=True)
class Step:
    """One fio job of a scenario."""

    key: RowKey
    export: str  # "origin" or "snapshot"
    pass_bytes: int = 0  # > 0: one pass over [0, pass_bytes); else time-based
    prepares: bool = False  # later steps of the scenario need its effect


@dataclass(frozen=True)
class Endpoint:
    """Where fio connects: a Unix socket and the names of the two exports."""

    socket: str
    origin: str
    snapshot: str = ""

    def uri(self, export: str) -> str:
        name = self.origin if export == "origin" else self.snapshot
        return f"nbd+unix:///{name}?socket={self.socket}"


@dataclass
class Scenario:
    """Steps run in order inside one context (a server, a snapshot...)."""

    name: str
    system: str
    steps: list[Step]
    open: Callable[[], ContextManager[Endpoint]]


@dataclass
class Counters:
    """State of a snapshot scenario after its rows (snapengine or qemu)."""

    scenario: str
    state: str
    nr_changed_blocks: str
    expected: str
    apparent_bytes: int
    real_bytes: int


@dataclass
class Settings:
    size: int
    touch: int
    runtime: int
    repeat: int
    dir: str
    only: list[str]  # substrings: a row runs if its label contains any (none: all rows)
    json_path: str
    metrics: bool = False  # snapengine serves --metrics (its recorders on the data path)


# -- processes ------------------------------------------------------------------------

@contextlib.contextmanager
def server(name: str, cmd: list[str], socks: list[str], log: str) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` (a foreground server: nbdkit, qemu), wait until every socket of
    ``socks`` answers; SIGTERM it and wait for it on the way out."""
    for sock in socks:
        remove_stale_socket(sock)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        for sock in socks:
            wait_socket(sock, proc, name, log)
        yield proc
    finally:
        try:
            stop_process(proc)
        finally:
            for sock in socks:
                remove_stale_socket(sock)


def run_checked(cmd: list[str], timeout: float = 120.0) -> str:
    return run(cmd, timeout=timeout).stdout


def nbdkit_cmd(sock: str, plugin: list[str]) -> list[str]:
    return ["nbdkit", "-f", "--exit-with-parent", "-U", sock, *plugin]


def qemu_fleecing_cmd(image: str, fleece: str, sock: str) -> list[str]:
    """Origin through a copy-before-write node (target: ``fleece``), snapshot through
    a snapshot-access node: QEMU's image fleecing (7.x)."""
    blockdevs = [
        f"driver=file,filename={image},node-name=disk-file",
        "driver=raw,file=disk-file,node-name=disk",
        f"driver=file,filename={fleece},node-name=tmp-file",
        "driver=raw,file=tmp-file,node-name=tmp",
        "driver=copy-before-write,file=disk,target=tmp,node-name=cbw",
        "driver=snapshot-access,file=cbw,node-name=acc",
    ]
    cmd = ["qemu-storage-daemon"]
    for b in blockdevs:
        cmd += ["--blockdev", b]
    return cmd + ["--nbd-server", f"addr.type=unix,addr.path={sock}",
                  "--export", "type=nbd,id=e1,node-name=cbw,name=origin,writable=on",
                  "--export", "type=nbd,id=e2,node-name=acc,name=snap"]


# -- fio ------------------------------------------------------------------------------

def fio_cmd(uri: str, w: Workload, runtime: int, pass_bytes: int) -> list[str]:
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={w.rw}",
           f"--bs={w.bs}", f"--iodepth={w.iodepth}", "--numjobs=1", "--output-format=json"]
    if pass_bytes:  # one pass, every block exactly once
        return cmd + [f"--size={pass_bytes}", f"--io_size={pass_bytes}", "--randrepeat=1",
                      "--norandommap=0"]
    return cmd + ["--time_based", f"--runtime={runtime}", "--norandommap", "--randrepeat=0"]


def parse_fio(stdout: str, w: Workload) -> dict[str, Any]:
    """fio prints "fio: connected to NBD server" before its JSON: parse from the first '{'."""
    start = stdout.find("{")
    if start < 0:
        raise BenchError(f"fio printed no JSON: {stdout[-500:]}")
    job = json.loads(stdout[start:])["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}")
    return job["read" if w.is_read else "write"]


def run_fio(uri: str, w: Workload, runtime: int, pass_bytes: int, repeat: int) -> Sample:
    cmd = fio_cmd(uri, w, runtime, pass_bytes)
    timeout = PASS_TIMEOUT if pass_bytes else runtime + 120.0
    stats = parse_fio(run_checked(cmd, timeout), w)
    sample = Sample(repeat, float(stats["iops"]), float(stats["bw_bytes"]),
                    int(stats["total_ios"]), int(stats["runtime"]))
    if pass_bytes and sample.ios != pass_bytes // w.bs:
        raise BenchError(f"first-touch pass did {sample.ios} I/Os, expected {pass_bytes // w.bs}")
    return sample


# -- files ----------------------------------------------------------------------------

def make_image(path: str, size: int) -> None:
    """A sparse raw file, then random data written over all of it (reads are real)."""
    chunk = 4 * MiB
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, chunk):
            f.write(os.urandom(min(chunk, size - offset)))


def file_sizes(path: str) -> tuple[int, int]:
    """(apparent, real) bytes: what ``du --apparent-size -B1`` and ``du -B1`` say."""
    st = os.stat(path)
    return st.st_size, st.st_blocks * 512


# -- the benchmark --------------------------------------------------------------------

class Bench:
    """Servers, scenarios and results of one run."""

    def __init__(self, s: Settings, work: str, run: str, stack: contextlib.ExitStack) -> None:
        self.s = s
        self.work = work  # image, COW files, fleecing targets
        self.run = run  # sockets, snapengine's run dir, logs
        self.stack = stack
        self.image = os.path.join(work, "image.raw")
        self.samples: dict[RowKey, list[Sample]] = {}
        self.counters: dict[str, Counters] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self.daemon: Daemon | None = None  # snapengine, once started
        self.qemu_reason = "" if shutil.which("qemu-storage-daemon") else \
            "qemu-storage-daemon is not installed (apt-get install qemu-system-common)"
        self._serial = 0

    # -- set-up ---------------------------------------------------------------------
    def start_servers(self) -> None:
        """nbdkit file, the minimal Python plugin and snapengine: up for the whole run."""
        self.endpoints[NBDKIT_FILE] = self._nbdkit(NBDKIT_FILE, ["file", self.image])
        self.endpoints[MINIMAL] = self._nbdkit(MINIMAL, ["python", str(MINIMAL_PLUGIN),
                                                         f"file={self.image}"])
        self.endpoints[SNAPENGINE] = self._snapengine()

    def _nbdkit(self, name: str, plugin: list[str]) -> Endpoint:
        sock = os.path.join(self.run, f"{name}.sock")
        self.stack.enter_context(server(name, nbdkit_cmd(sock, plugin), [sock],
                                        os.path.join(self.run, f"{name}.log")))
        return Endpoint(sock, "")

    def _snapengine(self) -> Endpoint:
        extra = ["--metrics", f"127.0.0.1:{free_tcp_port()}"] if self.s.metrics else []
        self.daemon = self.stack.enter_context(daemon(
            os.path.join(self.run, "snapengine"), [(self.image, ORIGIN_NAME)], extra,
            verbose=False))
        return Endpoint(self.daemon.nbd_socket, ORIGIN_NAME, f"elastio-snap{MINOR}")

    def elioctl(self, *args: str) -> str:
        return self.daemon.elioctl(*args).stdout

    def _next_path(self, prefix: str) -> str:
        self._serial += 1
        return os.path.join(self.work, f"{prefix}-{self._serial}")

    # -- contexts of the scenarios -----------------------------------------------------
    @contextlib.contextmanager
    def running(self, system: str) -> Iterator[Endpoint]:
        yield self.endpoints[system]

    @contextlib.contextmanager
    def snapshot(self, name: str, incremental: bool = False,
                 expected: int | None = None) -> Iterator[Endpoint]:
        """snapengine minor 0 on the image: a fresh snapshot (or incremental) for the
        scenario, its counters recorded after, destroyed (COW file unlinked)."""
        cow = self._next_path("cow")
        limit_mb = str(-(-self.s.size // MiB))  # room to copy every block
        self.elioctl("setup-snapshot", "-f", limit_mb, ORIGIN_NAME, cow, MINOR)
        try:
            if incremental:
                self.elioctl("transition-to-incremental", MINOR)
            yield self.endpoints[SNAPENGINE]
            self.counters[name] = self._snapengine_counters(name, cow, expected)
        finally:
            self.elioctl("destroy", MINOR)

    def _snapengine_counters(self, name: str, cow: str, expected: int | None) -> Counters:
        info = self.daemon.info(MINOR)
        state = f"{info.get('state')} ({STATES.get(info.get('state', -1), '?')})"
        if "error" in info:
            state += f" error {info['error']}"
        apparent, real = file_sizes(cow)
        return Counters(name, state, str(info.get("nr_changed_blocks", "?")),
                        "—" if expected is None else str(expected), apparent, real)

    @contextlib.contextmanager
    def fleecing(self, name: str) -> Iterator[Endpoint]:
        """A fresh qemu-storage-daemon with a new, empty fleecing target."""
        fleece = self._next_path("fleece")
        sparse_file(fleece, self.s.size)
        sock = os.path.join(self.run, "qemu.sock")
        try:
            with server(QEMU, qemu_fleecing_cmd(self.image, fleece, sock), [sock],
                        os.path.join(self.run, "qemu.log")):
                yield Endpoint(sock, "origin", "snap")
            apparent, real = file_sizes(fleece)
            self.counters[name] = Counters(name, "—", "—", "—", apparent, real)
        finally:
            os.unlink(fleece)

    # -- scenarios ------------------------------------------------------------------
    def groups(self) -> list[list[Scenario]]:
        """Scenarios in run order; each inner list is interleaved (peer, snapengine)."""
        out: list[list[Scenario]] = []
        for w in WORKLOADS:
            out.append([self._plain(system, w) for system in (NBDKIT_FILE, MINIMAL, SNAPENGINE)])
        out.append([self._incremental(w) for w in WRITES])
        out.append([self._touch_and_read(QEMU), self._touch_and_read(SNAPENGINE)])
        out.append([self._pass_and_retouch(QEMU), self._pass_and_retouch(SNAPENGINE)])
        return out

    def _plain(self, system: str, w: Workload) -> Scenario:
        return Scenario(f"{system} {w.name}", system, [Step(RowKey(w, system, PLAIN), "origin")],
                        lambda: self.running(system))

    def _incremental(self, w: Workload) -> Scenario:
        name = f"snapengine incremental, after {w.name}"
        return Scenario(name, SNAPENGINE, [Step(RowKey(w, SNAPENGINE, INCREMENTAL), "origin")],
                        lambda: self.snapshot(name, incremental=True))

    def _touch_and_read(self, system: str) -> Scenario:
        """4k first touch of the region, then reads of the snapshot it left."""
        steps = [Step(RowKey(RANDWRITE_4K, system, FIRST), "origin", self.s.touch, prepares=True)]
        steps += [Step(RowKey(w, system, SNAPREAD), "snapshot") for w in READS]
        name = f"{system}: 4k first touch of {self.s.touch // MiB} MiB, snapshot reads"
        return Scenario(name, system, steps, self._snapshot_context(system, name, self.s.touch))

    def _pass_and_retouch(self, system: str) -> Scenario:
        """1M first touch of the whole image, then re-touch writes on that snapshot."""
        steps = [Step(RowKey(SEQWRITE_1M, system, FIRST), "origin", self.s.size, prepares=True)]
        steps += [Step(RowKey(w, system, RETOUCH), "origin") for w in WRITES]
        name = f"{system}: 1M first touch of the whole image, re-touch writes"
        return Scenario(name, system, steps, self._snapshot_context(system, name, self.s.size))

    def _snapshot_context(self, system: str, name: str,
                          touched: int) -> Callable[[], ContextManager[Endpoint]]:
        if system == QEMU:
            return lambda: self.fleecing(name)
        return lambda: self.snapshot(name, expected=touched // BLOCK)

    # -- running --------------------------------------------------------------------
    def selected(self, key: RowKey) -> bool:
        label = key.label.lower()
        return not self.s.only or any(sub.lower() in label for sub in self.s.only)

    def steps_to_run(self, sc: Scenario) -> list[tuple[Step, bool]]:
        """(step, record it): selected steps, and the preparing steps they need."""
        out: list[tuple[Step, bool]] = []
        for i, step in enumerate(sc.steps):
            wanted = self.selected(step.key)
            needed = step.prepares and any(self.selected(s.key) for s in sc.steps[i + 1:])
            if wanted or needed:
                out.append((step, wanted))
        return out

    def run_all(self) -> None:
        groups = self.groups()
        for r in range(self.s.repeat):
            for group in groups:
                for sc in group if r % 2 == 0 else reversed(group):
                    self.run_scenario(sc, r)

    def run_scenario(self, sc: Scenario, repeat: int) -> None:
        todo = self.steps_to_run(sc)
        if not todo or (sc.system == QEMU and self.qemu_reason):
            return
        try:
            with sc.open() as ep:
                for step, record in todo:
                    self.run_step(step, ep, repeat, record)
        except ServerStartError as e:
            if sc.system != QEMU:
                raise
            self.qemu_reason = f"qemu-storage-daemon failed to start: {e}"
            progress(f"{self.qemu_reason}; qemu rows are n/a")

    def run_step(self, step: Step, ep: Endpoint, repeat: int, record: bool) -> None:
        s = run_fio(ep.uri(step.export), step.key.workload, self.s.runtime, step.pass_bytes, repeat)
        if record:
            self.samples.setdefault(step.key, []).append(s)
        progress(f"[{repeat + 1}/{self.s.repeat}] {step.key.label}: {s.iops:,.0f} IOPS, "
                 f"{s.bw_bytes / 1e6:,.0f} MB/s ({s.ios} I/Os in {s.runtime_ms} ms)"
                 + ("" if record else " (preparation)"))

    def all_keys(self) -> list[RowKey]:
        keys = {step.key for group in self.groups() for sc in group for step in sc.steps}
        return sorted((k for k in keys if self.selected(k)), key=RowKey.sort_key)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- results --------------------------------------------------------------------------

def median_ratio(rows: list[Sample], peers: list[Sample]) -> float | None:
    """Median over repeats of row IOPS / peer IOPS, pairing samples of the same repeat."""
    by_repeat = {p.repeat: p.iops for p in peers}
    ratios = [s.iops / by_repeat[s.repeat] for s in rows if by_repeat.get(s.repeat)]
    return statistics.median(ratios) if ratios else None


def peer_key(key: RowKey, peer: str) -> RowKey | None:
    """The peer row a row is compared with: same workload (and same phase for qemu)."""
    if key.system == peer:
        return None
    phase = key.phase if peer == QEMU else PLAIN
    if peer == QEMU and phase not in (FIRST, RETOUCH, SNAPREAD):
        return None
    return RowKey(key.workload, peer, phase)


def ratio(samples: dict[RowKey, list[Sample]], key: RowKey, peer: str) -> float | None:
    other = peer_key(key, peer)
    if other is None or key not in samples or other not in samples:
        return None
    return median_ratio(samples[key], samples[other])


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def medians(got: list[Sample]) -> tuple[float, float] | None:
    """(IOPS, MB/s) medians over the repeats; MB = 10**6 bytes."""
    if not got:
        return None
    return (statistics.median(s.iops for s in got),
            statistics.median(s.bw_bytes for s in got) / 1e6)


def rows_table(keys: list[RowKey], samples: dict[RowKey, list[Sample]]) -> list[str]:
    out = ["| workload | system | mode | IOPS | MB/s | × nbdkit-file | × minimal-python | × qemu-fleecing |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for k in keys:
        m = medians(samples.get(k, []))
        iops, mbs = (f"{m[0]:,.0f}", f"{m[1]:,.0f}") if m else ("n/a", "n/a")
        ratios = " | ".join(fmt_ratio(ratio(samples, k, p)) for p in PEERS)
        out.append(f"| {k.workload.name} | {k.system} | {k.mode} | {iops} | {mbs} | {ratios} |")
    return out


@dataclass(frozen=True)
class Target:
    text: str
    key: RowKey
    peer: str
    minimum: float


TARGETS = (
    Target("origin 4k randwrite, no snapshot", RowKey(RANDWRITE_4K, SNAPENGINE, PLAIN), MINIMAL, 0.9),
    Target("origin 4k randwrite, incremental mode", RowKey(RANDWRITE_4K, SNAPENGINE, INCREMENTAL),
           MINIMAL, 0.9),
    Target("origin 4k randwrite, active snapshot, re-touch", RowKey(RANDWRITE_4K, SNAPENGINE, RETOUCH),
           MINIMAL, 0.9),
    Target("origin 4k randwrite, active snapshot, first touch", RowKey(RANDWRITE_4K, SNAPENGINE, FIRST),
           QEMU, 1.0),
    Target("origin 1M seqwrite, active snapshot, first touch", RowKey(SEQWRITE_1M, SNAPENGINE, FIRST),
           QEMU, 1.5),
    Target("snapshot export 1M seqread", RowKey(SEQREAD_1M, SNAPENGINE, SNAPREAD), QEMU, 1.2),
    Target("snapshot export 4k randread", RowKey(RANDREAD_4K, SNAPENGINE, SNAPREAD), MINIMAL, 0.9),
)


def target_results(samples: dict[RowKey, list[Sample]]) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        value = ratio(samples, t.key, t.peer)
        verdict = "n/a" if value is None else ("PASS" if value >= t.minimum else "MISS")
        out.append({"target": t.text, "required": f"≥ {t.minimum} × {t.peer}",
                    "measured": value, "result": verdict})
    return out


def targets_table(results: list[dict[str, Any]]) -> list[str]:
    out = ["| target | required | measured | result |", "|---|---|---:|---|"]
    for r in results:
        out.append(f"| {r['target']} | {r['required']} | {fmt_ratio(r['measured'])} | {r['result']} |")
    return out


def counters_table(counters: dict[str, Counters]) -> list[str]:
    out = ["| after scenario (last repeat) | state | nr_changed_blocks | expected | "
           "file apparent | file real |", "|---|---|---:|---:|---:|---:|"]
    for c in counters.values():
        out.append(f"| {c.scenario} | {c.state} | {c.nr_changed_blocks} | {c.expected} | "
                   f"{c.apparent_bytes / MiB:,.1f} MiB | {c.real_bytes / MiB:,.1f} MiB |")
    return out


def report(bench: Bench, elapsed: float) -> dict[str, Any]:
    s = bench.s
    keys = bench.all_keys()
    targets = target_results(bench.samples)
    lines = [f"snapengine benchmark: image {s.size // MiB} MiB in {s.dir}, {s.runtime} s per "
             f"time-based run, median of {s.repeat} repeat(s), 4k first touch over the first "
             f"{s.touch // MiB} MiB; snapengine metrics {'on' if s.metrics else 'off'}; run "
             f"took {elapsed:.0f} s", ""]
    if s.only:
        lines += [f"only rows matching: {', '.join(map(repr, s.only))}", ""]
    if bench.qemu_reason:
        lines += [f"qemu-fleecing rows are n/a: {bench.qemu_reason}", ""]
    lines += rows_table(keys, bench.samples) + [""] + targets_table(targets) + [""]
    lines += counters_table(bench.counters)
    print("\n".join(lines))
    return {
        "settings": vars(s), "elapsed_s": elapsed, "qemu": bench.qemu_reason or "ok",
        "rows": [{"workload": k.workload.name, "system": k.system, "mode": k.mode,
                  "phase": k.phase, "medians": medians(bench.samples.get(k, [])),
                  "samples": [vars(x) for x in bench.samples.get(k, [])],
                  "ratios": {p: ratio(bench.samples, k, p) for p in PEERS}} for k in keys],
        "targets": targets, "counters": [vars(c) for c in bench.counters.values()],
    }


# -- command line ---------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(description="Benchmark snapengine against nbdkit file, a minimal "
                                "nbdkit Python plugin and qemu image fleecing (see bench/README.md).")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 2 s runs, 512 MiB image")
    p.add_argument("--size-mib", type=int, help="image size in MiB (default 2048; --quick 512)")
    p.add_argument("--touch-mib", type=int,
                   help="region of the 4k first-touch pass, in MiB (default: a quarter of the image)")
    p.add_argument("--runtime", type=int, help="seconds per time-based run (default 5; --quick 2)")
    p.add_argument("--repeat", type=int, help="repeats, interleaved; medians reported (default 3; --quick 1)")
    p.add_argument("--dir", default="/dev/shm", help="where the image, COW files and fleecing targets go "
                   "(default %(default)s: page-cache resident)")
    p.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                   help="run only rows whose 'workload system mode' contains SUBSTRING "
                   "(case-insensitive; repeatable: any of them); ratios need the peer rows too")
    p.add_argument("--json", default="", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--metrics", action="store_true", help="run snapengine with --metrics "
                   "127.0.0.1:<a free port>: the rows then include the recorders' cost")
    a = p.parse_args(argv)
    size = (a.size_mib or (512 if a.quick else 2048)) * MiB
    touch = min(size, a.touch_mib * MiB if a.touch_mib else size // 4)
    s = Settings(size=size, touch=touch, runtime=a.runtime or (2 if a.quick else 5),
                 repeat=a.repeat or (1 if a.quick else 3), dir=a.dir, only=a.only, json_path=a.json,
                 metrics=a.metrics)
    if s.size <= 0 or s.touch < BLOCK or s.runtime <= 0 or s.repeat <= 0:
        p.error("sizes, --runtime and --repeat must be positive")
    return s


def check_tools() -> None:
    missing = [t for t in ("fio", "nbdkit") if shutil.which(t) is None]
    missing += [p for p in (os.path.join(BIN, "snapengine"), os.path.join(BIN, "elioctl"))
                if not os.path.exists(p)]
    if missing:
        raise BenchError(f"missing: {', '.join(missing)} (run `make setup`, and run this "
                         "script with .venv/bin/python -m bench.run)")


def check_space(s: Settings) -> None:
    """The image, one full COW file and one full fleecing target exist at once."""
    need = 3 * s.size + s.size // 128 + 64 * MiB  # + snapengine's index and slack
    free = shutil.disk_usage(s.dir).free
    if free < need:
        raise BenchError(f"{s.dir} has {free // MiB} MiB free, the run needs {need // MiB} MiB "
                         "(use --dir or a smaller --size-mib)")


def raise_on_sigterm() -> None:
    """SIGTERM ends the run through the ``finally`` clauses, like Ctrl-C."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    raise_on_sigterm()
    started = time.monotonic()
    try:
        check_tools()
        check_space(s)
        with contextlib.ExitStack() as stack:
            work = tempfile.mkdtemp(prefix="snapengine-bench-", dir=s.dir)
            stack.callback(shutil.rmtree, work, ignore_errors=True)
            run = tempfile.mkdtemp(prefix="seb-")  # short paths for the sockets
            stack.callback(shutil.rmtree, run, ignore_errors=True)
            bench = Bench(s, work, run, stack)
            progress(f"creating a {s.size // MiB} MiB image of random data in {work}")
            make_image(bench.image, s.size)
            bench.start_servers()
            bench.run_all()
            result = report(bench, time.monotonic() - started)
        if s.json_path:
            with open(s.json_path, "w") as f:
                json.dump(result, f, indent=2)
    except (BenchError, CommandFailed, ServerStartError, OSError, subprocess.TimeoutExpired) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
