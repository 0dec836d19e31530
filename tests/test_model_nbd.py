"""The model of test_model_engine.py, through the real daemon: nbdkit, libnbd, elioctl.

One daemon per test. Several libnbd connections to the origin stay open the whole
test (so the minor stays active) and send writes, zeroes and trims in parallel, on
byte-disjoint ranges so that the model does not depend on their order, while another
thread reads the snapshot export. Snapshot setup, transitions and destroy go through
``elioctl``; ``elioctl info`` and the old COW files are checked against the model.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from dataclasses import dataclass
from typing import ClassVar

import nbd
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from snapengine import changes
from snapengine.cowfile import CowFile
from snapengine.units import BLOCK_SIZE, MiB, blocks_spanning, nr_blocks
from tests.harness import connect, daemon, require, shutdown_quietly, sparse_file, wait_for

pytestmark = pytest.mark.e2e

ORIGIN = "disk"
SIZE = 2 * MiB + 1000  # unaligned: the last block is partial
NR_CLIENTS = 3  # origin connections, all used at once
FALLOCATE_MB = "3"  # room for every block (the origin, in whole MB): EFBIG is the in-process model's business
MAX_MINORS = 4
MAX_IO = 128 * 1024

SETTINGS = settings(max_examples=30, stateful_step_count=15, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def snapshot_export(minor: int) -> str:
    return f"elastio-snap{minor}"


def blocks_of(offset: int, length: int) -> set[int]:
    return set(range(*blocks_spanning(offset, length)))


def differing_blocks(actual: bytes, expected: bytes) -> list[int]:
    return [b for b in range(nr_blocks(len(expected)))
            if actual[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE] !=
            expected[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE]]


@dataclass
class Op:
    """One request of a parallel batch: write (with ``seed``), zero or trim."""

    kind: str
    offset: int
    length: int
    seed: int = 0
    fua: bool = False

    def content(self) -> bytes:
        return random.Random(self.seed).randbytes(self.length) if self.kind == "write" \
            else bytes(self.length)

    def send(self, h: nbd.NBD) -> None:
        flags = nbd.CMD_FLAG_FUA if self.fua else 0
        if self.kind == "write":
            h.pwrite(self.content(), self.offset, flags)
        elif self.kind == "zero":
            h.zero(self.length, self.offset, flags)
        else:
            h.trim(self.length, self.offset, flags)


@st.composite
def batches(draw) -> list[Op]:
    """1 to NR_CLIENTS requests on byte-disjoint ranges, often adjacent (sharing a block)."""
    offset = draw(st.integers(0, SIZE - 1) | st.integers(0, nr_blocks(SIZE)).map(
        lambda b: min(b * BLOCK_SIZE, SIZE - 1)))
    ops = []
    for _ in range(draw(st.integers(1, NR_CLIENTS))):
        if offset >= SIZE:
            break
        length = min(draw(st.integers(1, MAX_IO) | st.sampled_from([1, 4095, 4096, 4097])),
                     SIZE - offset)
        kind = draw(st.sampled_from(["write", "write", "zero", "trim"]))
        ops.append(Op(kind, offset, length, draw(st.integers(0, 2**32 - 1)), draw(st.booleans())))
        offset += length + draw(st.integers(0, 2 * BLOCK_SIZE) | st.just(0))
    return ops


class NbdModel(RuleBasedStateMachine):
    """Class attributes, set by the test: the daemon, its origin connections, a directory."""

    d = None
    clients: ClassVar[list[nbd.NBD]] = []
    dir = ""
    nr_examples = 0

    def __init__(self) -> None:
        super().__init__()
        type(self).nr_examples += 1
        self.example = type(self).nr_examples
        self.nr_cows = 0
        self.snap_minor: int | None = None
        self.snap_conn: nbd.NBD | None = None  # connection to elastio-snapN in snapshot mode
        self.stale: list[nbd.NBD] = []  # connections to snapshots that are gone
        self.frozen: bytes | None = None  # the snapshot image; None in incremental mode
        self.touched: set[int] = set()  # written: listed and counted
        self.maybe: set[int] = set()  # zeroed or trimmed: counted if their content changed
        self.seq_id = 0
        self.uuid = ""
        self.cow_path = ""

    @initialize()
    def reset(self) -> None:
        """A new example starts from what the origin holds now, with no minor."""
        for dev in self.d.info()["devices"]:
            self.d.elioctl("destroy", str(dev["minor"]))
        for i, h in enumerate(self.clients):  # a failed example may have left one closed
            if not h.aio_is_ready():
                self.clients[i] = connect(self.d.uri(ORIGIN))
        self.model = bytearray(self.clients[0].pread(SIZE, 0))

    def teardown(self) -> None:
        for h in self.stale + ([self.snap_conn] if self.snap_conn else []):
            shutdown_quietly(h)
        if self.snap_minor is not None:
            self.d.elioctl("destroy", str(self.snap_minor), check=False)

    def new_cow_path(self) -> str:
        self.nr_cows += 1
        return os.path.join(self.dir, f"cow-{self.example}-{self.nr_cows}")

    def retire_snapshot_connection(self) -> None:
        if self.snap_conn is not None:
            self.stale.append(self.snap_conn)
            self.snap_conn = None

    def check_snapshot_range(self, buf: bytes, offset: int) -> None:
        expected = self.frozen[offset:offset + len(buf)]
        assert buf == expected, \
            f"snapshot [{offset}, +{len(buf)}): blocks {differing_blocks(buf, expected)[:10]} " \
            f"(relative to {offset}) differ"

    # -- the data path: parallel requests on several connections ---------------------------
    @rule(ops=batches(), read_seed=st.integers(0, 2**32 - 1))
    def parallel_requests(self, ops: list[Op], read_seed: int) -> None:
        """Each request on its own connection, all at once, with a snapshot reader."""
        lo = max(ops[0].offset - BLOCK_SIZE, 0)
        hi = min(ops[-1].offset + ops[-1].length + BLOCK_SIZE, SIZE)
        self.run_parallel([[op] for op in ops], lo, hi, read_seed, nr_readers=1,
                          max_read=2 * MAX_IO)

    @rule(seed=st.integers(0, 2**32 - 1), nr_ops=st.integers(5, 40))
    def request_storm(self, seed: int, nr_ops: int) -> None:
        """Every connection sends a run of small requests in its own third of the origin
        (so the result does not depend on the interleaving) while two threads read the
        snapshot: many first writes of a block race with reads of it."""
        rng = random.Random(seed)
        region = SIZE // NR_CLIENTS
        runs = []
        for i in range(NR_CLIENTS):
            ops = []
            for _ in range(nr_ops):
                offset = i * region + rng.randrange(region)
                length = min(rng.choice([1, 512, 4096, 5000, 3 * BLOCK_SIZE, 40000]),
                             (i + 1) * region - offset)
                kind = rng.choice(["write", "write", "write", "zero", "trim"])
                ops.append(Op(kind, offset, length, rng.getrandbits(32)))
            runs.append(ops)
        self.run_parallel(runs, 0, SIZE, seed, nr_readers=2, max_read=8 * MAX_IO)

    def run_parallel(self, runs: list[list[Op]], lo: int, hi: int, read_seed: int,
                     nr_readers: int, max_read: int) -> None:
        """Send ``runs[i]`` in order on connection i, all connections at once, while
        ``nr_readers`` threads check snapshot reads of [lo, hi) (long reads: a long
        window for a write to overtake them); then update the model."""
        errors: list[BaseException] = []
        writers_done = threading.Event()
        readers = nr_readers if self.frozen is not None else 0
        barrier = threading.Barrier(len(runs) + readers)

        def send(ops: list[Op], h: nbd.NBD) -> None:
            try:
                barrier.wait()
                for op in ops:
                    op.send(h)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        def read_snapshot(rng: random.Random) -> None:
            try:
                barrier.wait()
                while not errors:  # and once more after the writers are done
                    last = writers_done.is_set()
                    offset = rng.randrange(lo, hi)
                    length = rng.randint(1, min(hi - offset, max_read))
                    self.check_snapshot_range(self.snap_conn.pread(length, offset), offset)
                    if last:
                        break
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        writers = [threading.Thread(target=send, args=(ops, h))
                   for ops, h in zip(runs, self.clients)]
        reader_threads = [threading.Thread(target=read_snapshot,
                                           args=(random.Random(read_seed + i),))
                          for i in range(readers)]
        for t in writers + reader_threads:
            t.start()
        for t in writers:
            t.join(60)
        writers_done.set()
        for t in reader_threads:
            t.join(60)
        assert not any(t.is_alive() for t in writers + reader_threads), "a thread hung"
        if errors:
            raise errors[0]
        for op in (op for ops in runs for op in ops):
            if op.kind == "trim" and self.frozen is not None:
                continue  # dropped during a snapshot: the content stays, nothing changes
            self.model[op.offset:op.offset + op.length] = op.content()
            if self.snap_minor is not None:
                changed = self.touched if op.kind == "write" else self.maybe
                changed |= blocks_of(op.offset, op.length)

    @rule(client=st.integers(0, NR_CLIENTS - 1))
    def flush(self, client: int) -> None:
        self.clients[client].flush()

    @rule(client=st.integers(0, NR_CLIENTS - 1))
    def reconnect_one(self, client: int) -> None:
        """The others stay connected: the minor stays active."""
        shutdown_quietly(self.clients[client])
        self.clients[client] = connect(self.d.uri(ORIGIN))

    @precondition(lambda self: self.snap_minor is not None)
    @rule()
    def reconnect_all(self) -> None:
        """The last client leaves: dormant (1/0), and a snapshot stays readable."""
        for h in self.clients:
            shutdown_quietly(h)
        dormant = 1 if self.frozen is not None else 0
        wait_for(lambda: self.d.info(self.snap_minor)["state"] == dormant, timeout=10,
                 what=f"minor {self.snap_minor} to go dormant")
        if self.frozen is not None:
            self.check_snapshot_range(self.snap_conn.pread(SIZE, 0), 0)
        for i in range(NR_CLIENTS):
            self.clients[i] = connect(self.d.uri(ORIGIN))

    # -- control operations through elioctl ------------------------------------------------
    @precondition(lambda self: self.snap_minor is None)
    @rule(minor=st.integers(0, MAX_MINORS - 1), cache=st.sampled_from([[], ["-c", "1"]]))
    def setup(self, minor: int, cache: list[str]) -> None:
        self.cow_path = self.new_cow_path()
        self.d.elioctl("setup-snapshot", *cache, "-f", FALLOCATE_MB, ORIGIN, self.cow_path,
                       str(minor))
        self.snap_minor, self.seq_id, self.touched, self.maybe = minor, 1, set(), set()
        self.uuid = self.d.info(minor)["uuid"]
        self.frozen = bytes(self.model)
        self.snap_conn = connect(self.d.uri(snapshot_export(minor)))
        assert self.snap_conn.is_read_only()

    @precondition(lambda self: self.snap_minor is not None)
    @rule()
    def destroy(self) -> None:
        self.d.elioctl("destroy", str(self.snap_minor))
        assert not os.path.exists(self.cow_path)
        assert self.d.elioctl("info", str(self.snap_minor), check=False).returncode == errno.ENOENT
        self.retire_snapshot_connection()
        self.snap_minor, self.frozen, self.touched, self.maybe = None, None, set(), set()

    @precondition(lambda self: self.frozen is not None)
    @rule()
    def transition_to_incremental(self) -> None:
        self.d.elioctl("transition-to-incremental", str(self.snap_minor))
        self.frozen = None
        self.retire_snapshot_connection()
        with pytest.raises(nbd.Error):
            connect(self.d.uri(snapshot_export(self.snap_minor)))

    @precondition(lambda self: self.snap_minor is not None and self.frozen is None)
    @rule()
    def transition_to_snapshot(self) -> None:
        old, new = self.cow_path, self.new_cow_path()
        self.d.elioctl("transition-to-snapshot", "-f", FALLOCATE_MB, new, str(self.snap_minor))
        cow = CowFile.open(old, writable=False)
        try:
            listed = list(changes.changed_blocks(cow))
            assert cow.header.clean and cow.header.seq_id == self.seq_id
        finally:
            cow.close()
        extra, missed = set(listed) - self.touched - self.maybe, self.touched - set(listed)
        assert not extra and not missed, (
            f"{old}: listed, not touched: {sorted(extra)[:10]}; "
            f"touched, not listed: {sorted(missed)[:10]}")
        os.unlink(old)
        self.cow_path, self.seq_id, self.touched, self.maybe = new, self.seq_id + 1, set(), set()
        self.frozen = bytes(self.model)
        self.snap_conn = connect(self.d.uri(snapshot_export(self.snap_minor)))

    @precondition(lambda self: self.frozen is not None)
    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 4 * MAX_IO))
    def read_snapshot(self, offset: int, length: int) -> None:
        length = min(length, SIZE - offset)
        self.check_snapshot_range(self.snap_conn.pread(length, offset), offset)

    @precondition(lambda self: self.stale)
    @rule()
    def read_stale_snapshot(self) -> None:
        """A connection to a snapshot that is gone never returns data."""
        with pytest.raises(nbd.Error):
            self.stale[-1].pread(BLOCK_SIZE, 0)

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def origin_matches(self) -> None:
        if not hasattr(self, "model"):
            return
        actual = self.clients[0].pread(SIZE, 0)
        assert actual == self.model, f"origin blocks {differing_blocks(actual, bytes(self.model))[:10]}"

    @invariant()
    def snapshot_matches(self) -> None:
        if self.frozen is not None:
            self.check_snapshot_range(self.snap_conn.pread(SIZE, 0), 0)

    @invariant()
    def info_matches(self) -> None:
        if self.snap_minor is None:
            return
        info = self.d.info(self.snap_minor)
        assert "error" not in info, info
        expected = {"state": 3 if self.frozen is not None else 2, "seq_id": self.seq_id,
                    "uuid": self.uuid, "cow_file": self.cow_path}
        assert {k: info[k] for k in expected} == expected
        assert len(self.touched) <= info["nr_changed_blocks"] <= \
            len(self.touched | self.maybe), info


def test_nbd_model(tmp_path):
    require("nbdkit")
    origin = sparse_file(str(tmp_path / "origin.img"), SIZE)
    with open(origin, "r+b") as f:
        f.write(random.Random(1).randbytes(SIZE))
    with daemon(str(tmp_path / "run"), [(origin, ORIGIN)],
                ["--max-minors", str(MAX_MINORS)]) as d:
        clients = [connect(d.uri(ORIGIN)) for _ in range(NR_CLIENTS)]
        model = type("NbdModel", (NbdModel,), {"d": d, "clients": clients, "dir": str(tmp_path)})
        try:
            run_state_machine_as_test(model, settings=SETTINGS)
        finally:
            for h in clients:
                shutdown_quietly(h)
        errors = [line for line in d.log().splitlines() if " ERROR " in line]
        assert not errors, errors[:5]
