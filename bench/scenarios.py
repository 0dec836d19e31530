"""One directory's run of bench.run: its servers, its scenarios, and running them.

Every system serves the same image in the directory; nbdkit-file, minimal-python and
snapengine stay up for the whole run, qemu-storage-daemon is started per scenario (a
fresh fleecing target each time). Scenario groups are interleaved: within a group the
order flips on odd repeats.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from bench import BLOCK, MiB
from bench.fio import (LATENCY_WORKLOADS, RANDREAD_4K_QD1, RANDWRITE_4K, RANDWRITE_4K_QD1,
                       READS, SEQWRITE_1M, WORKLOADS, WRITES, Job, Sample, Workload, run_fio)
from bench.minor import MINOR, ORIGIN_NAME, SNAPSHOT_EXPORT, snapshot_minor, state_text
from bench.rows import (FIRST, INCREMENTAL, MINIMAL, MINIMAL_KEPT, NBDKIT_FILE, PLAIN, QEMU,
                        RETOUCH, SNAPENGINE, SNAPREAD, Counters, Endpoint, RowKey, Scenario,
                        Step)
from bench.servers import (FIO_CPU, SERVER_CPU, check_pinned, file_sizes, nbdkit_cmd,
                           pinned_start, qemu_fleecing_cmd, server)
from tests.harness import Daemon, ServerStartError, daemon, sparse_file
from tests.harness.sockets import free_tcp_port

MINIMAL_PLUGIN = Path(__file__).resolve().parent / "minimal_plugin.py"


@dataclass
class Settings:
    size: int
    touch: int  # region of the 4k (iodepth 32) first-touch pass
    qd1_touch: int  # region of the 4k qd1 first-touch pass
    runtime: int
    repeat: int
    dirs: list[str]
    only: list[str]  # substrings: a row runs if its label contains any (none: all rows)
    json_path: str
    metrics: bool = False  # snapengine serves --metrics (its recorders on the data path)
    pin: bool = False  # servers on SERVER_CPU, fio on FIO_CPU
    threads: int = 0  # snapengine serve --threads (0: its default)

    @property
    def server_cpu(self) -> int | None:
        return SERVER_CPU if self.pin else None

    @property
    def fio_cpu(self) -> int | None:
        return FIO_CPU if self.pin else None


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def describe(s: Sample) -> str:
    """A progress line's numbers for one sample."""
    return (f"{s.iops:,.0f} IOPS, {s.bw_bytes / 1e6:,.0f} MB/s ({s.ios} I/Os in "
            f"{s.runtime_ms} ms), p50 {s.p50_us:.1f} p99 {s.p99_us:.1f} µs")


class Bench:
    """Servers, scenarios and results of one directory's run."""

    def __init__(self, s: Settings, dir: str, work: str, run: str,
                 stack: contextlib.ExitStack) -> None:
        self.s = s
        self.dir = dir  # the --dir this run is for
        self.work = work  # image, COW files, fleecing targets (inside dir)
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
        self.endpoints[MINIMAL_KEPT] = self._nbdkit(MINIMAL_KEPT, [
            "python", str(MINIMAL_PLUGIN), f"file={self.image}", "keep=1"])
        self.endpoints[SNAPENGINE] = self._snapengine()

    def _nbdkit(self, name: str, plugin: list[str]) -> Endpoint:
        sock = os.path.join(self.run, f"{name}.sock")
        self.stack.enter_context(server(name, nbdkit_cmd(sock, plugin, self.s.server_cpu),
                                        [sock], os.path.join(self.run, f"{name}.log")))
        return Endpoint(sock, "")

    def _snapengine(self) -> Endpoint:
        extra = ["--metrics", f"127.0.0.1:{free_tcp_port()}"] if self.s.metrics else []
        extra += ["--threads", str(self.s.threads)] if self.s.threads else []
        with pinned_start(self.s.server_cpu):
            self.daemon = self.stack.enter_context(daemon(
                os.path.join(self.run, "snapengine"), [(self.image, ORIGIN_NAME)], extra,
                verbose=False))
        if self.s.pin:
            tasks = check_pinned(self.daemon.pid, SERVER_CPU)
            assert self.daemon.proc is not None
            check_pinned(self.daemon.proc.pid, SERVER_CPU)
            progress(f"snapengine pinned to CPU {SERVER_CPU}: supervisor and nbdkit "
                     f"({tasks} threads)")
        return Endpoint(self.daemon.nbd_socket, ORIGIN_NAME, SNAPSHOT_EXPORT)

    @property
    def snapengine(self) -> Daemon:
        assert self.daemon is not None, "start_servers() first"
        return self.daemon

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
        with snapshot_minor(self.snapengine, cow, self.s.size, incremental):
            yield self.endpoints[SNAPENGINE]
            self.counters[name] = self._snapengine_counters(name, cow, expected)

    def _snapengine_counters(self, name: str, cow: str, expected: int | None) -> Counters:
        info = self.snapengine.info(int(MINOR))
        apparent, real = file_sizes(cow)
        return Counters(name, state_text(info), str(info.get("nr_changed_blocks", "?")),
                        "—" if expected is None else str(expected), apparent, real)

    @contextlib.contextmanager
    def fleecing(self, name: str) -> Iterator[Endpoint]:
        """A fresh qemu-storage-daemon with a new, empty fleecing target."""
        fleece = self._next_path("fleece")
        sparse_file(fleece, self.s.size)
        sock = os.path.join(self.run, "qemu.sock")
        cmd = qemu_fleecing_cmd(self.image, fleece, sock, self.s.server_cpu)
        try:
            with server(QEMU, cmd, [sock], os.path.join(self.run, "qemu.log")):
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
            out.append([self._plain(system, w)
                        for system in (NBDKIT_FILE, MINIMAL, MINIMAL_KEPT, SNAPENGINE)])
        out.append([self._incremental(w) for w in WRITES + (RANDWRITE_4K_QD1,)])
        out.append([self._touch_and_read(QEMU), self._touch_and_read(SNAPENGINE)])
        out.append([self._pass_and_retouch(QEMU), self._pass_and_retouch(SNAPENGINE)])
        out.append([self._first_touch_qd1(QEMU), self._first_touch_qd1(SNAPENGINE)])
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
        steps += [Step(RowKey(w, system, SNAPREAD), "snapshot") for w in READS + (RANDREAD_4K_QD1,)]
        name = f"{system}: 4k first touch of {self.s.touch // MiB} MiB, snapshot reads"
        return Scenario(name, system, steps, self._snapshot_context(system, name, self.s.touch))

    def _pass_and_retouch(self, system: str) -> Scenario:
        """1M first touch of the whole image, then re-touch writes on that snapshot."""
        steps = [Step(RowKey(SEQWRITE_1M, system, FIRST), "origin", self.s.size, prepares=True)]
        steps += [Step(RowKey(w, system, RETOUCH), "origin") for w in WRITES + (RANDWRITE_4K_QD1,)]
        name = f"{system}: 1M first touch of the whole image, re-touch writes"
        return Scenario(name, system, steps, self._snapshot_context(system, name, self.s.size))

    def _first_touch_qd1(self, system: str) -> Scenario:
        """4k qd1 first touch of a small region, on a fresh snapshot."""
        region = self.s.qd1_touch
        steps = [Step(RowKey(RANDWRITE_4K_QD1, system, FIRST), "origin", region)]
        name = f"{system}: 4k qd1 first touch of {region / MiB:g} MiB"
        return Scenario(name, system, steps, self._snapshot_context(system, name, region))

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
        job = Job(ep.uri(step.export), step.key.workload, self.s.runtime, step.pass_bytes,
                  cpu=self.s.fio_cpu)
        s = run_fio(job, repeat)
        if record:
            self.samples.setdefault(step.key, []).append(s)
        progress(f"[{self.dir} {repeat + 1}/{self.s.repeat}] {step.key.label}: {describe(s)}"
                 + ("" if record else " (preparation)"))

    def all_keys(self) -> list[RowKey]:
        keys = {step.key for group in self.groups() for sc in group for step in sc.steps}
        return sorted((k for k in keys if self.selected(k)), key=RowKey.sort_key)

    def latency_keys(self) -> list[RowKey]:
        return [k for k in self.all_keys() if k.workload in LATENCY_WORKLOADS]
