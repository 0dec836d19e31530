"""The life of a minor: the state table holds on the real engine, and a transition that
fails at any of its steps changes nothing (or, when its minor's own COW file failed,
fails that minor, and nothing else).

Each case drives ``Engine`` in process over a 4 MiB origin, with every file under
``fs/`` (COW files, registry, info) opened through a fault plan. A transition is run once
clean to count its writes and syncs; then once per write and per sync with that one
failing (EIO), each time on a fresh engine brought to the same state.
"""

from __future__ import annotations

import errno
import os
import random

import pytest

from snapengine.cowfile import CowFile
from snapengine.engine import Engine
from snapengine.lifecycle import (
    DESTROY,
    FIRST_CLIENT,
    LAST_CLIENT,
    RECONFIGURE,
    RESTART,
    TABLE,
    TO_INCREMENTAL,
    TO_SNAPSHOT,
)
from tests.harness.faults import FaultPlan

SIZE = 4 << 20
BLOCK = 4096


class World:
    """An engine over a random origin; minor 0 brought to a state on demand."""

    def __init__(self, top) -> None:
        self.top = top
        self.fs = top / "fs"
        self.fs.mkdir(parents=True, exist_ok=True)
        self.origin = str(top / "origin.img")
        self.rng = random.Random(5)
        if not os.path.exists(self.origin):
            with open(self.origin, "wb") as f:
                f.write(self.rng.randbytes(SIZE))
        self.plan = FaultPlan(f"{self.fs}/*")
        self.run_dir = str(self.fs / "run")
        self.engine = self._engine()
        self.client = None
        self.cows = 0

    def _engine(self) -> Engine:
        e = Engine(self.run_dir, [(self.origin, "disk")], opener=self.plan.opener)
        e.start()
        return e

    def cow(self) -> str:
        self.cows += 1
        return str(self.fs / f"cow{self.cows}")

    def write(self, count: int = 8) -> None:
        h = self.client or self.engine.open_export("disk", False)
        for _ in range(count):
            h.pwrite(self.rng.randbytes(BLOCK), self.rng.randrange(SIZE // BLOCK) * BLOCK, False)
        if h is not self.client:
            h.close()

    def attach(self) -> None:
        assert self.client is None
        self.client = self.engine.open_export("disk", False)

    def detach(self) -> None:
        self.client.close()
        self.client = None

    def restart(self, keep_registry: bool = True) -> None:
        if self.client is not None:
            self.detach()
        self.engine.close()
        if not keep_registry:
            os.unlink(os.path.join(self.run_dir, "registry.json"))
        self.engine = self._engine()

    def bring(self, state: int) -> None:
        """Minor 0 in ``state``: 2 and 3 with one client attached, the others with none."""
        if state in (4, 5):
            self.bring(1 if state == 5 else 0)
            path = self.engine.info(0)["cow_file"]
            self.restart(keep_registry=False)
            reload = self.engine.reload_snapshot if state == 5 else self.engine.reload_incremental
            reload("disk", path, 0)
        else:
            self.attach()
            self.engine.setup_snapshot("disk", self.cow(), 0, fallocate_mb=4)
            self.write()
            if state in (0, 2):
                self.engine.transition_to_incremental(0)
                self.write()
            if state in (0, 1):
                self.detach()
        assert self.state() == state

    def state(self) -> int | None:
        try:
            return self.engine.info(0)["state"]
        except OSError as e:
            assert e.errno == errno.ENOENT
            return None

    def close(self) -> None:
        self.plan.clear()
        if self.client is not None:
            self.detach()
        self.engine.close()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


OPERATIONS = {
    TO_INCREMENTAL: lambda w: w.engine.transition_to_incremental(0),
    TO_SNAPSHOT: lambda w: w.engine.transition_to_snapshot(w.cow(), 0, 4),
    DESTROY: lambda w: w.engine.destroy(0),
    RECONFIGURE: lambda w: w.engine.reconfigure(0, 20),
    FIRST_CLIENT: lambda w: w.attach() if w.client is None else None,
    LAST_CLIENT: lambda w: w.detach() if w.client is not None else None,
    RESTART: lambda w: w.restart(),
}


@pytest.mark.parametrize("op", list(OPERATIONS))
@pytest.mark.parametrize("state", range(6))
def test_the_state_table_is_what_the_engine_does(world, op, state):
    world.bring(state)
    target = TABLE[op][state]
    if isinstance(target, tuple):
        with pytest.raises(OSError) as e:
            OPERATIONS[op](world)
        assert e.value.errno == target[0]
        assert world.state() == state, "a refused operation changed the state"
        return
    OPERATIONS[op](world)
    assert world.state() == (None if target == -1 else target)
    assert "error" not in (world.engine.info(0) if target != -1 else {})


# -- a failure at each step --------------------------------------------------------------

def header_facts(path: str) -> tuple:
    with CowFile.open(path, writable=False) as cow:
        h = cow.header
        return h.flags, h.uuid, h.seq_id, h.nr_slots, h.error, h.fallocate


def snapshot_bytes(w: World) -> bytes | None:
    try:
        snap = w.engine.open_export("elastio-snap0", True)
    except OSError:
        return None
    buf = bytearray(SIZE)
    try:
        snap.pread(buf, 0)
    except OSError as e:  # a failed snapshot: every read fails
        return f"errno {e.errno}".encode()
    return bytes(buf)


def look(w: World) -> dict:
    """What a failed transition must leave as it was."""
    files = sorted(n for n in os.listdir(w.fs) if n.startswith("cow"))
    try:
        with open(os.path.join(w.run_dir, "registry.json"), "rb") as f:
            registry = f.read()
    except FileNotFoundError:
        registry = None
    try:
        info = w.engine.info(0)
        info.pop("cow_size_current", None)  # disk space: a failed step may have used some
    except OSError:
        info = None
    return {"files": files, "registry": registry, "info": info, "snapshot": snapshot_bytes(w),
            "headers": {n: header_facts(str(w.fs / n)) for n in files}}


TRANSITIONS = {  # name: (state before, the transition)
    "setup-snapshot": (None, lambda w: w.engine.setup_snapshot("disk", w.cow(), 0, 0, 4)),
    "reload-snapshot": (None, lambda w: w.engine.reload_snapshot("disk", w.reload_path, 0)),
    "transition-to-incremental, active": (3, OPERATIONS[TO_INCREMENTAL]),
    "transition-to-incremental, dormant": (1, OPERATIONS[TO_INCREMENTAL]),
    "transition-to-snapshot, active": (2, OPERATIONS[TO_SNAPSHOT]),
    "transition-to-snapshot, dormant": (0, OPERATIONS[TO_SNAPSHOT]),
    "destroy": (3, OPERATIONS[DESTROY]),
    "reconfigure": (3, OPERATIONS[RECONFIGURE]),
    "first client of a reloaded minor": (5, OPERATIONS[FIRST_CLIENT]),
}


def prepared(top, name: str) -> World:
    w = World(top)
    state, _ = TRANSITIONS[name]
    if name == "reload-snapshot":  # a clean COW file of an earlier daemon
        w.bring(1)
        w.reload_path = w.engine.info(0)["cow_file"]
        w.restart(keep_registry=False)
    elif state is not None:
        w.bring(state)
    return w


def state_of(name: str) -> int | None:
    return TRANSITIONS[name][0]


def count_steps(top, name: str) -> dict[str, int]:
    w = prepared(top / "count", name)
    try:
        before = dict(w.plan.counts)
        TRANSITIONS[name][1](w)
        return {op: w.plan.counts[op] - before[op] for op in ("pwrite", "fsync")}
    finally:
        w.close()


@pytest.mark.parametrize("name", list(TRANSITIONS))
def test_a_transition_failing_at_any_step_changes_nothing(tmp_path, name):
    steps = count_steps(tmp_path, name)
    assert sum(steps.values()) >= 2, steps
    cases = [(op, k) for op, n in steps.items() for k in range(n)]
    for i, (op, k) in enumerate(cases):
        w = prepared(tmp_path / f"case{i}", name)
        try:
            own = w.engine.info(0)["cow_file"] if state_of(name) is not None else None
            before = look(w)
            w.plan.inject(op, errno.EIO, after=k)
            try:
                TRANSITIONS[name][1](w)
                failed = None
            except OSError as e:
                failed = e
            where = w.plan.fired[0].path if w.plan.fired else ""
            w.plan.clear()
            check_outcome(w, name, f"{op} #{k} on {where}", where, own, failed, before)
        finally:
            w.close()


def check_outcome(w: World, name: str, case: str, where: str, own: str | None,
                  failed: OSError | None, before: dict) -> None:
    if where.endswith("elastio-snap-info.tmp." + str(os.getpid())):
        assert failed is None, f"{name}, {case}: the info file is a view: {failed}"
        return
    if name.startswith("first client"):  # the client's connection is never refused
        assert failed is None, f"{name}, {case}: {failed!r}"
        info = w.engine.info(0)
        if where == own:  # the minor fails, the client goes on
            assert info["error"] == -errno.EIO, f"{name}, {case}: {info}"
        else:  # the registry is only logged: a restart needs reload-* again
            assert info["state"] == 3 and "error" not in info, f"{name}, {case}: {info}"
        return
    assert failed is not None and failed.errno == errno.EIO, f"{name}, {case}: {failed!r}"
    after = look(w)
    if where == own:  # the minor's own COW file failed: the minor fails, nothing else
        assert after["info"]["error"] == -errno.EIO, f"{name}, {case}: {after['info']}"
        assert after["info"]["state"] == before["info"]["state"], f"{name}, {case}"
        for key in ("files", "registry"):
            assert after[key] == before[key], f"{name}, {case}: {key} changed"
        return
    for key, value in before.items():
        assert after[key] == value, f"{name}, {case}: {key} changed"


# -- the registry cannot be written ------------------------------------------------------

@pytest.mark.parametrize("op", ["destroy", "reconfigure"])
def test_a_registry_that_cannot_be_written_changes_nothing(world, op):
    world.bring(3)
    before = look(world)
    world.plan.pattern = os.path.join(world.run_dir, "registry.json*")
    world.plan.inject("fsync", errno.ENOSPC)
    with pytest.raises(OSError) as e:
        world.engine.destroy(0) if op == "destroy" else world.engine.reconfigure(0, 20)
    assert e.value.errno == errno.ENOSPC
    assert look(world) == before
    world.plan.clear()
    world.write()  # still tracking, and the operation works once the disk does
    world.engine.destroy(0) if op == "destroy" else world.engine.reconfigure(0, 20)


# -- the documented table is the code's ----------------------------------------------------

def test_design_doc_prints_the_state_table():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "design.md")).read()
    rows = doc.split("<!-- state-table -->")[1].split("<!-- /state-table -->")[0]
    printed = {}
    for line in rows.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        printed[cells[0]] = cells[1:]

    def cell(target) -> str:
        if isinstance(target, tuple):
            return errno.errorcode[target[0]]
        return "gone" if target == -1 else str(target)

    assert printed == {op: [cell(TABLE[op][s]) for s in range(6)] for op in TABLE}


def test_an_undo_that_fails_elsewhere_does_not_fail_the_old_list(world, monkeypatch):
    """transition-to-snapshot fails at the registry, and removing the new COW file fails
    too: that costs a stray file (logged), not the change list that goes on."""
    from snapengine import transitions

    def cannot_remove(cow) -> None:
        cow.close()
        raise OSError(errno.EIO, f"cannot unlink {cow.path}")
    world.plan.pattern = os.path.join(world.run_dir, "registry.json*")  # faults: there only
    world.bring(2)
    monkeypatch.setattr(transitions, "discard_cow", cannot_remove)
    world.plan.inject("fsync", errno.ENOSPC)
    with pytest.raises(OSError) as e:
        world.engine.transition_to_snapshot(world.cow(), 0, 4)
    assert e.value.errno == errno.ENOSPC
    info = world.engine.info(0)
    assert info["state"] == 2 and "error" not in info, info
