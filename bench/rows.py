"""The rows of bench.run: which system, in which phase, runs which workload.

A row is (workload, system, phase); a scenario is a list of steps (one fio job each)
run in order inside one context (a server, a snapshot...); its rows' samples, one per
repeat, are what the tables and targets are computed from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager

from bench.fio import WORKLOADS, Workload

NBDKIT_FILE = "nbdkit-file"
MINIMAL = "minimal-python"
MINIMAL_KEPT = "minimal-python-kept"  # the same plugin, thread states kept (keep=1)
QEMU = "qemu-fleecing"
SNAPENGINE = "snapengine"
PEERS = (NBDKIT_FILE, MINIMAL, MINIMAL_KEPT, QEMU)
SYSTEM_ORDER = (NBDKIT_FILE, MINIMAL, MINIMAL_KEPT, QEMU, SNAPENGINE)

# Phases: what state the origin or snapshot is in during the row. Ratios to qemu
# compare rows of the same phase; ratios to the two plain peers compare workloads.
PLAIN, INCREMENTAL, RETOUCH = "plain", "incremental", "re-touch"
FIRST, SNAPREAD = "first", "snapread"
PHASE_ORDER = (PLAIN, INCREMENTAL, RETOUCH, FIRST, SNAPREAD)
MODES = {
    (PLAIN, NBDKIT_FILE): "origin",
    (PLAIN, MINIMAL): "origin",
    (PLAIN, MINIMAL_KEPT): "origin, thread states kept",
    (PLAIN, SNAPENGINE): "origin, no snapshot",
    (INCREMENTAL, SNAPENGINE): "origin, incremental mode",
    (RETOUCH, SNAPENGINE): "origin, active snapshot, re-touch",
    (RETOUCH, QEMU): "origin, fleecing, re-touch",
    (FIRST, SNAPENGINE): "origin, active snapshot, first touch",
    (FIRST, QEMU): "origin, fleecing, first touch",
    (SNAPREAD, SNAPENGINE): "snapshot export",
    (SNAPREAD, QEMU): "snapshot export",
}


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
