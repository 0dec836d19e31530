"""Group snapshots (INTERFACE.md §9) against a model, in-process (no nbdkit).

One engine serves two origins, A and B (small sparse files, partly filled), each with one
client kept open, so its minor stays active. A hypothesis ``RuleBasedStateMachine``
writes, zeroes and trims either origin (or writes A then B, in rounds), closes and
reopens a client (dormant and active again), sets up a group snapshot of both (minors 0
and 1, in either order), transitions both to incremental and both to the next snapshot
as one group, sets up, transitions or destroys one minor alone now and then (a group
need not stay together), and runs group commands that must fail: they give their errno
and change nothing, neither the minors nor the COW files (a part that fails after the
first part's COW file was made included).

The model is a bytearray per origin and, per minor, the origin frozen at its snapshot
point (a group freezes both copies at the same step) plus the blocks touched since then,
by the rule of test_model_engine.py (whole 64 KiB clusters saved on a first touch, only
the blocks written marked, less those a first-touch write-zeroes finds zero or in a hole;
a trim during a snapshot is dropped; a zero or a trim while incremental marks only the
blocks that held data). After every step: each origin
equals its model, each live snapshot export equals its frozen copy, and info shows the
states, seq_ids and counts of the model. A transition to snapshot (group or single)
checks each old COW file's closed change list block for block.

The -f limit (2 MB) holds all of either origin: no snapshot overflows here, that path
is test_model_engine's.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, settings
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
from snapengine.engine import Engine
from snapengine.snapshot import COPY_BLOCKS, ZERO_CHUNK
from snapengine.units import BLOCK_SIZE, MiB, blocks_spanning, nr_blocks
from tests.test_model_engine import (first_difference, hole_blocks, lengths, offsets,
                                     payload, read_all)

NAMES = ("A", "B")  # the two origins; NAMES[i] is tracked by minor i
SIZES = (2 * MiB, 2 * MiB - 3000)  # bytes; B's last block is partial
MAX_MINORS = 4
MAX_IO = 64 * 1024  # bytes of one write
FALLOCATE_MB = 2  # -f of every snapshot: room for every block of either origin
PREFILL_MAX = 6  # extents of data written into each origin before the engine starts
SNAPSHOT_STATE, ACTIVE_STATE = 1, 2  # info state: +1 in snapshot mode, +2 while active

# Examples: 200 take about 30 s (2 CPUs); SNAPENGINE_GROUP_EXAMPLES sets more for a soak.
EXAMPLES = int(os.environ.get("SNAPENGINE_GROUP_EXAMPLES", "200"))
SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
EXAMPLE_S = 1.0  # seconds one example takes at most, measured, times 3


def snapshot_export(minor: int) -> str:
    return f"elastio-snap{minor}"


def listed_blocks(path: str) -> tuple[set[int], changes.ChangeList]:
    """The changed blocks of a closed COW file, from its byte extents."""
    found = changes.read_closed(path)
    blocks: set[int] = set()
    for offset, length in found.byte_extents():
        blocks |= set(range(*blocks_spanning(offset, length)))
    return blocks, found


@dataclass
class MinorModel:
    """One minor: its COW file, its snapshot point (None: incremental), what changed."""

    number: int
    cow_path: str
    uuid: str
    frozen: bytes | None  # the origin at the snapshot point; None in incremental mode
    point: int  # the step of the snapshot point
    seq_id: int = 1
    active: bool = True  # "setup-snapshot -> 3 at once"; dormant after the last client
    touched: set[int] = field(default_factory=set)  # blocks changed since the point
    saved: set[int] = field(default_factory=set)  # blocks whose old content is kept

    @property
    def snapshot(self) -> bool:
        return self.frozen is not None

    @property
    def state(self) -> int:
        return (SNAPSHOT_STATE if self.snapshot else 0) + (ACTIVE_STATE if self.active else 0)


@dataclass
class OriginModel:
    name: str
    path: str
    size: int
    content: bytearray
    handle: object | None = None  # the one client
    minor: MinorModel | None = None


class GroupModel(RuleBasedStateMachine):
    """Two origins, minors 0 and 1 on them, set up and transitioned together or alone."""

    base_dir = ""  # set by the test: where each example makes its directory

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="group-", dir=self.base_dir or None)
        self.cows = os.path.join(self.dir, "cows")
        os.mkdir(self.cows)
        self.existing = os.path.join(self.cows, "existing")  # a file not ours to replace
        with open(self.existing, "wb") as f:
            f.write(b"a changed-block list")
        self.link = os.path.join(self.cows, "link")  # the same directory by another path
        os.symlink(self.cows, self.link)
        self.engine: Engine | None = None
        self.origins: list[OriginModel] = []
        self.step = 0
        self.nr_cows = 0

    @initialize(data=st.data(), begin=st.sampled_from(["incrementals", "snapshots", "nothing"]))
    def start(self, data, begin: str) -> None:
        """Two new origins, one client each; most examples start with a group set up
        (both in snapshot mode, or both incremental), so more steps are group transitions."""
        for name, size in zip(NAMES, SIZES):
            path = os.path.join(self.dir, f"{name}.img")
            content = bytearray(size)
            with open(path, "wb") as f:
                f.truncate(size)
                for _ in range(data.draw(st.integers(0, PREFILL_MAX), label=f"{name} extents")):
                    offset = data.draw(st.integers(0, size - 1), label="prefill offset")
                    length = min(data.draw(st.integers(1, 256 * 1024), label="prefill length"),
                                 size - offset)
                    buf = random.Random(offset).randbytes(length)
                    f.seek(offset)
                    f.write(buf)
                    content[offset:offset + length] = buf
            self.origins.append(OriginModel(name, path, size, content))
        self.engine = Engine(self.dir, [(o.path, o.name) for o in self.origins],
                             max_minors=MAX_MINORS)
        self.engine.start()
        for o in self.origins:
            self.open_client(o)
        if begin != "nothing":
            self.group_setup(data)
        if begin == "incrementals":
            self.group_transition(data)

    def teardown(self) -> None:
        try:
            for o in self.origins:
                if o.handle is not None:
                    o.handle.close()
            if self.engine is not None:
                self.engine.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------------
    def new_cow_path(self, name: str) -> str:
        self.nr_cows += 1
        return os.path.join(self.cows, f"cow{self.nr_cows}-{name}")

    def side(self, data, label: str = "origin") -> OriginModel:
        return self.origins[data.draw(st.integers(0, 1), label=label)]

    def expect_error(self, err: int, func, *args, **kw) -> None:
        with pytest.raises(OSError) as e:
            func(*args, **kw)
        assert e.value.errno == err, f"expected {errno.errorcode[err]}, got {e.value!r}"

    def open_client(self, o: OriginModel) -> None:
        o.handle = self.engine.open_export(o.name, readonly=False)
        if o.minor is not None:
            o.minor.active = True

    def draw_range(self, o: OriginModel, data, max_length: int) -> tuple[int, int]:
        offset = data.draw(offsets(o.size), label="offset")
        length = data.draw(lengths(max_length), label="length")
        return offset, min(length, o.size - offset)

    def change(self, o: OriginModel, offset: int, length: int, content: bytes | None,
               kind: str = "write") -> None:
        """Record a write (``content``), a zero or a trim (``kind``) in the model, before it
        is sent: test_model_engine's rule, without its overflows."""
        m = o.minor
        if kind == "trim" and m is not None and m.snapshot:
            return  # dropped during a snapshot: the content stays, nothing changes
        first, end = blocks_spanning(offset, length)
        if m is not None and m.snapshot:
            step = ZERO_CHUNK if kind == "zero" else end - first  # a write-zeroes: by chunks
            for lo in range(first, end, step):
                hi = min(lo + step, end)
                if set(range(lo, hi)) - m.saved:
                    m.touched |= self.save(o, lo, hi, kind)
                else:
                    m.touched |= set(range(lo, hi))
        elif m is not None:  # incremental: a trim or a zero marks the blocks that held data
            m.touched |= set(range(first, end)) - (hole_blocks(o.path, o.size, first, end)
                                                    if kind != "write" else set())
        o.content[offset:offset + length] = content if content is not None else bytes(length)

    def save(self, o: OriginModel, first: int, end: int, kind: str) -> set[int]:
        """A first touch during a snapshot: the whole cluster of each block is saved; for a
        write-zeroes, blocks that were holes or zeros (and are saved now) are not marked."""
        m = o.minor
        lo = first // COPY_BLOCKS * COPY_BLOCKS
        hi = min(-(-end // COPY_BLOCKS) * COPY_BLOCKS, nr_blocks(o.size))
        new = set(range(lo, hi)) - m.saved
        m.saved |= new
        touched = set(range(first, end))
        if kind != "zero":
            return touched
        zeros = hole_blocks(o.path, o.size, lo, hi) & new
        zeros |= {b for b in new if not any(o.content[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE])}
        return touched - zeros

    def check_closed_cow(self, path: str, m: MinorModel) -> None:
        """The old COW file lists exactly the blocks touched since its snapshot point."""
        listed, found = listed_blocks(path)
        assert listed == m.touched, \
            f"{path}: missed {sorted(m.touched - listed)[:10]}, " \
            f"extra {sorted(listed - m.touched)[:10]}"
        h = found.header
        assert h.clean and h.incremental and not h.error
        assert (h.nr_changed_blocks, h.seq_id, h.uuid.hex()) == (len(listed), m.seq_id, m.uuid)

    def begin(self, o: OriginModel, cow_path: str) -> None:
        """``o``'s minor was just set up in ``cow_path``: frozen at this step."""
        n = self.origins.index(o)
        o.minor = MinorModel(n, cow_path, self.engine.info(n)["uuid"], bytes(o.content),
                             self.step)

    def next_snapshot(self, o: OriginModel, cow_path: str) -> None:
        """``o``'s minor just went to the next snapshot in ``cow_path``: its old list is
        checked, and the model starts again from this step."""
        m = o.minor
        self.check_closed_cow(m.cow_path, m)
        os.unlink(m.cow_path)  # it stays by design; the model is done with it
        m.cow_path = cow_path
        m.seq_id += 1
        m.frozen = bytes(o.content)
        m.point = self.step
        m.touched, m.saved = set(), set()

    def order(self, data) -> list[OriginModel]:
        """Both origins, in the order the command names them."""
        return self.origins[::-1] if data.draw(st.booleans(), label="B first") else self.origins

    # -- the data path --------------------------------------------------------------------
    @rule(data=st.data(), seed=st.integers(0, 2**32 - 1),
          fill=st.none() | st.integers(0, 255), fua=st.booleans())
    def write(self, data, seed: int, fill: int | None, fua: bool) -> None:
        self.step += 1
        o = self.side(data)
        if o.handle is None:
            return
        offset, length = self.draw_range(o, data, MAX_IO)
        buf = payload(seed, fill, length)
        self.change(o, offset, length, buf)
        o.handle.pwrite(buf, offset, fua)

    @rule(data=st.data(), seed=st.integers(0, 2**32 - 1), count=st.integers(1, 8))
    def write_both(self, data, seed: int, count: int) -> None:
        """``count`` rounds of a write to A, then one to B: a database's data and log."""
        self.step += 1
        for i in range(count):
            for o in self.origins:
                if o.handle is None:
                    continue
                offset, length = self.draw_range(o, data, MAX_IO)
                buf = payload(seed + i, None, length)
                self.change(o, offset, length, buf)
                o.handle.pwrite(buf, offset, False)

    @rule(data=st.data(), may_trim=st.booleans(), fua=st.booleans())
    def zero(self, data, may_trim: bool, fua: bool) -> None:
        self.step += 1
        o = self.side(data)
        if o.handle is None:
            return
        offset, length = self.draw_range(o, data, o.size)
        self.change(o, offset, length, None, "zero")
        o.handle.zero(length, offset, may_trim, fua)

    @rule(data=st.data(), fua=st.booleans())
    def trim(self, data, fua: bool) -> None:
        self.step += 1
        o = self.side(data)
        if o.handle is None:
            return
        offset, length = self.draw_range(o, data, o.size)
        self.change(o, offset, length, None, "trim")
        o.handle.trim(length, offset, fua)

    # -- the client: the minor goes dormant with it -----------------------------------
    @rule(data=st.data(), reopen=st.booleans())
    def close_client(self, data, reopen: bool) -> None:
        """Close the client (dormant) and, if ``reopen``, open it again (active)."""
        self.step += 1
        o = self.side(data)
        if o.handle is None:
            self.open_client(o)
            return
        o.handle.close()
        o.handle = None
        if o.minor is not None:
            o.minor.active = False
            event("dormant minor")
        if reopen:
            self.open_client(o)

    # -- group commands -------------------------------------------------------------------
    @precondition(lambda self: all(o.minor is None for o in self.origins))
    @rule(data=st.data())
    def group_setup(self, data) -> None:
        self.step += 1
        parts = self.order(data)
        cows = [self.new_cow_path(o.name) for o in parts]
        self.engine.setup_snapshot([o.name for o in parts], cows,
                                   [self.origins.index(o) for o in parts],
                                   fallocate_mb=FALLOCATE_MB)
        for o, cow in zip(parts, cows):
            self.begin(o, cow)
        event("group setup")

    def same_mode(self) -> bool:
        """Both minors set up, both in snapshot mode or both incremental."""
        a, b = (o.minor for o in self.origins)
        return a is not None and b is not None and a.snapshot == b.snapshot

    @precondition(same_mode)
    @rule(data=st.data())
    def group_transition(self, data) -> None:
        """Both to incremental (one minor at a time: the command takes one), or both to
        the next snapshot as one group, at one snapshot point."""
        self.step += 1
        if self.origins[0].minor.snapshot:
            for o in self.origins:
                self.to_incremental(o)
            event("group transition to incremental")
            return
        parts = self.order(data)
        cows = [self.new_cow_path(o.name) for o in parts]
        self.engine.transition_to_snapshot(cows, [o.minor.number for o in parts],
                                           fallocate_mb=FALLOCATE_MB)
        event("group transition to snapshot" + (" after changes" if any(
            o.minor.touched for o in parts) else ""))
        for o, cow in zip(parts, cows):
            self.next_snapshot(o, cow)

    @precondition(lambda self: any(o.minor is not None for o in self.origins))
    @rule(data=st.data())
    def destroy(self, data) -> None:
        """Destroy both minors, or one (the other goes on alone)."""
        self.step += 1
        chosen = [o for o in self.origins if o.minor is not None]
        if len(chosen) == 2 and data.draw(st.booleans(), label="only one"):
            chosen = [self.side(data)]
        for o in chosen:
            self.forget(o)
        event("destroy both" if len(chosen) == 2 else "destroy one")

    # -- one minor alone --------------------------------------------------------------------
    @rule(data=st.data())
    def single(self, data) -> None:
        """Set up, or transition, one minor alone."""
        self.step += 1
        o = self.side(data)
        m = o.minor
        if m is None:
            cow = self.new_cow_path(o.name)
            self.engine.setup_snapshot(o.name, cow, self.origins.index(o),
                                       fallocate_mb=FALLOCATE_MB)
            self.begin(o, cow)
            event("single setup")
        elif m.snapshot:
            self.to_incremental(o)
            event("single transition to incremental")
        else:
            cow = self.new_cow_path(o.name)
            self.engine.transition_to_snapshot(cow, m.number, fallocate_mb=FALLOCATE_MB)
            self.next_snapshot(o, cow)
            event("single transition to snapshot")

    def to_incremental(self, o: OriginModel) -> None:
        m = o.minor
        self.engine.transition_to_incremental(m.number)
        m.frozen = None
        self.expect_error(errno.ENOENT, self.engine.open_export, snapshot_export(m.number), True)

    def forget(self, o: OriginModel) -> None:
        """Destroy ``o``'s minor: its COW file, info entry and export are gone."""
        m = o.minor
        self.engine.destroy(m.number)
        assert not os.path.exists(m.cow_path)
        self.expect_error(errno.ENOENT, self.engine.info, m.number)
        self.expect_error(errno.ENOENT, self.engine.open_export, snapshot_export(m.number), True)
        o.minor = None

    # -- group commands that fail --------------------------------------------------------
    @rule(data=st.data())
    def failing_group(self, data) -> None:
        """A group command with a bad part gives its errno and changes nothing: the same
        minors in info, the same files (no new COW file left behind)."""
        self.step += 1
        err, func, args, name = data.draw(st.sampled_from(self.failing_cases()), label="case")
        event(f"failing group: {name}")
        devices = self.engine.info()["devices"]
        files = sorted(os.listdir(self.cows))
        self.expect_error(err, func, *args, fallocate_mb=FALLOCATE_MB)
        assert self.engine.info()["devices"] == devices, name
        assert sorted(os.listdir(self.cows)) == files, f"{name}: a COW file left behind"
        with open(self.existing, "rb") as f:
            assert f.read() == b"a changed-block list"

    def failing_cases(self) -> list[tuple]:
        """(errno, command, arguments, id) of group commands that must fail now."""
        a, b = self.origins
        setup, transition = self.engine.setup_snapshot, self.engine.transition_to_snapshot
        cow = self.new_cow_path
        missing = os.path.join(self.cows, "nodir", "b")
        first = cow("A")
        linked = os.path.join(self.link, os.path.basename(first))  # passes the path check;
        # its create fails (EEXIST) after the first part's file was made: undone
        if a.minor is None and b.minor is None:
            return [
                (errno.EEXIST, setup, (["A", "B"], [first, linked], [0, 1]),
                 "same-cow-through-a-link"),
                (errno.EINVAL, setup, (["A", "B"], [cow("A"), b.path], [0, 1]),
                 "cow-is-an-origin"),
                (errno.ENOENT, setup, (["A", "B"], [cow("A"), missing], [0, 1]), "cow-dir-missing"),
                (errno.EINVAL, setup, (["A", "B"], [cow("A"), cow("B")], [0, 0]), "same-minor"),
                (errno.EINVAL, setup, (["A", "A"], [cow("A"), cow("B")], [0, 1]), "same-origin"),
                (errno.EINVAL, setup, (["A", "B"], [cow("A")] * 2, [0, 1]), "same-cow"),
                (errno.EEXIST, setup, (["A", "B"], [cow("A"), self.existing], [0, 1]),
                 "cow-exists"),
                (errno.EINVAL, setup, (["A", "B"], [cow("A"), cow("B")], [0, MAX_MINORS]),
                 "minor-out-of-range"),
                (errno.ENODEV, setup, (["A", "nosuch"], [cow("A"), cow("B")], [0, 1]),
                 "origin-not-served"),
            ]
        cases = []
        for o, other in ((a, b), (b, a)):  # ``o`` has a minor: a later part on it is busy
            if o.minor is not None:
                cases.append((errno.EBUSY, setup,
                              ([other.name, o.name], [cow(other.name), cow(o.name)],
                               [self.origins.index(other), self.origins.index(o)]),
                              "later-origin-in-use"))
        incrementals = [o for o in self.origins if o.minor is not None and not o.minor.snapshot]
        for o in incrementals:
            n = o.minor.number
            other = b if o is a else a
            if other.minor is None:
                cases.append((errno.ENOENT, transition, ([cow(o.name), cow(other.name)],
                                                         [n, 1 - n]), "later-not-set-up"))
            elif other.minor.snapshot:
                cases.append((errno.EINVAL, transition, ([cow(o.name), cow(other.name)],
                                                         [n, 1 - n]), "later-not-incremental"))
            else:
                cases += [
                    (errno.ENOENT, transition, ([cow(o.name), missing], [n, 1 - n]),
                     "transition-cow-dir-missing"),
                    (errno.EINVAL, transition, ([cow(o.name), cow(other.name)], [n, n]),
                     "transition-same-minor"),
                    (errno.EINVAL, transition, ([cow(o.name)] * 2, [n, 1 - n]),
                     "transition-same-cow"),
                    (errno.EEXIST, transition, ([cow(o.name), self.existing], [n, 1 - n]),
                     "transition-cow-exists"),
                    (errno.EEXIST, transition, ([cow(o.name), o.minor.cow_path], [n, 1 - n]),
                     "transition-cow-is-current"),
                    (errno.EEXIST, transition, ([first, linked], [n, 1 - n]),
                     "transition-same-cow-through-a-link"),
                    (errno.EINVAL, transition, ([cow(o.name), a.path], [n, 1 - n]),
                     "transition-cow-is-an-origin"),
                ]
        return cases

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def origins_match(self) -> None:
        for o in self.origins:
            if o.handle is not None:
                actual = read_all(o.handle, o.size)
            else:
                with open(o.path, "rb") as f:
                    actual = f.read()
            assert actual == o.content, f"origin {o.name}: {first_difference(actual, o.content)}"

    @invariant()
    def snapshots_match(self) -> None:
        """Each live snapshot export reads as its origin at the step of its point."""
        for o in self.origins:
            m = o.minor
            if m is None or not m.snapshot:
                continue
            export = self.engine.open_export(snapshot_export(m.number), True)
            try:
                actual = read_all(export, o.size)
            finally:
                export.close()
            assert actual == m.frozen, \
                f"{snapshot_export(m.number)} (point at step {m.point}): " \
                f"{first_difference(actual, m.frozen)}"

    @invariant()
    def info_matches(self) -> None:
        devices = self.engine.info()["devices"]
        expected = [(m.number, m.cow_path, o.path, m.state, m.seq_id, m.uuid, len(m.touched),
                     FALLOCATE_MB * MiB)
                    for o in self.origins if (m := o.minor) is not None]
        actual = [(d["minor"], d["cow_file"], d["block_device"], d["state"], d["seq_id"],
                   d["uuid"], d["nr_changed_blocks"], d["fallocate"]) for d in devices]
        assert actual == expected, "info (minor, cow_file, block_device, state, seq_id, uuid, " \
            "nr_changed_blocks, fallocate) differs from the model"
        assert not [d for d in devices if "error" in d], devices
        a, b = self.origins
        if a.minor and b.minor and a.minor.snapshot and b.minor.snapshot and \
                a.minor.point == b.minor.point:
            event("a group snapshot point is live")


@pytest.mark.timeout(60 + EXAMPLE_S * EXAMPLES)
def test_group_model(tmp_path):
    model = type(GroupModel.__name__, (GroupModel,), {"base_dir": str(tmp_path)})
    run_state_machine_as_test(model, settings=SETTINGS)
