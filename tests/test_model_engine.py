"""The engine against a model, in-process (no nbdkit).

The model is a bytearray for the origin and, for the one minor tracking it, the origin
frozen at the current snapshot point plus the set of blocks touched since then. A
hypothesis ``RuleBasedStateMachine`` drives writes, zeroes, trims, flushes, client
reopens (active <-> dormant), setup, both transitions, destroy, expand-cow-file,
reconfigure-auto-expand, snapshot reads, clean restarts and crashes, and checks after
every step that the origin, the snapshot image, ``info`` and the index cache agree with
the model. A transition to snapshot also checks the old COW file's changed-block list
block for block.

The -f limits are small, so the COW store overflows often (INTERFACE.md §8, "Overflow
keeps the chain"): unless auto-expand raises the limit (by whole steps; the model's file
system has room, and its reserve is either small or more than the file system holds),
the snapshot fails with EFBIG, its export reads EIO, its saved data is released, and the
minor goes on counting the changed blocks as an incremental list would.
Transition-to-incremental then clears the failure, and the chain's next closed list
holds exactly the blocks changed since the snapshot point, overflow or not.

A restart closes the engine (clients gone first) and starts a new one on the same run
directory. A crash is kill -9 simulated in-process, as test_kill9 does it for real: the
files are taken as the dead process would leave them (powercut.crash_image: everything
the kernel took), the engine is let go (its locks released), the files are put back as
taken, and a new engine recovers them. After either, the minor resumes dormant and the
snapshot still reads as the model; after a crash of an active minor the change list may
over-count (the write-intent record), never miss a block.

Plain tests below race writers against snapshot readers and against
transition-to-snapshot, where the per-block ordering of tracker.py matters.
"""

from __future__ import annotations

import errno
import functools
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import ClassVar

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
from snapengine import engine as engine_module
from snapengine import index as index_module
from snapengine import space as space_module
from snapengine.cowfile import CowFile, data_offset_for
from snapengine.engine import Engine
from snapengine.index import PAGE_COST
from snapengine.snapshot import COPY_BLOCKS, ZERO_CHUNK
from snapengine.units import BLOCK_SIZE, MiB, blocks_spanning, nr_blocks
from tests.harness.powercut import crash_image, restore_image

ORIGIN = "disk"
MAX_MINORS = 4
MAX_IO = 64 * 1024  # bytes of one write
# Unaligned sizes: the last block is partial; the second spans three index pages.
ORIGIN_SIZES = (MiB + 1000, 2 * MiB + 3 * BLOCK_SIZE + 17)
EFBIG = -errno.EFBIG  # info "error" of a snapshot that reached its -f limit
# error_text of an overflowed snapshot brought back by a restart (or a crash)
KEPT_AT_RESTART = f"{os.strerror(errno.EFBIG)}: the snapshot had already failed (error {EFBIG}, " \
    "its change list kept)"
MIN_FREE = 64 * MiB  # bytes free the model needs: an auto-expand (at most the origin) fits

# Examples per model test: 500 in CI; `make soak` sets SNAPENGINE_MODEL_EXAMPLES higher.
EXAMPLES = int(os.environ.get("SNAPENGINE_MODEL_EXAMPLES", "500"))
SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
EXAMPLE_S = 0.5  # seconds one example takes at most, measured (tiny cache), times 3


def touched_blocks(offset: int, length: int) -> set[int]:
    return set(range(*blocks_spanning(offset, length)))


def snapshot_export(minor: int) -> str:
    return f"elastio-snap{minor}"


def read_all(handle, size: int, chunk: int | None = None) -> bytes:
    """The whole export, in requests of at most ``chunk`` bytes."""
    buf = bytearray(size)
    view = memoryview(buf)
    chunk = chunk or size
    for offset in range(0, size, chunk):
        handle.pread(view[offset:offset + chunk], offset)
    return bytes(buf)


def first_difference(actual: bytes, expected: bytes) -> str:
    """Where two images differ, in blocks, for assertion messages."""
    if len(actual) != len(expected):
        return f"size {len(actual)} != {len(expected)}"
    bad = [b for b in range(nr_blocks(len(expected)))
           if actual[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE] !=
           expected[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE]]
    return f"{len(bad)} blocks differ, first {bad[:10]}"


def payload(seed: int, fill: int | None, length: int) -> bytes:
    if fill is not None:
        return bytes([fill]) * length
    return random.Random(seed).randbytes(length)


@functools.cache
def offsets(size: int) -> st.SearchStrategy[int]:
    """Anywhere, near a block boundary, or near the (unaligned) end of the origin."""
    last = size - 1
    return st.one_of(
        st.integers(0, last),
        st.builds(lambda b, d: min(max(b * BLOCK_SIZE + d, 0), last),
                  st.integers(0, nr_blocks(size)), st.integers(-2, 2)),
        st.integers(1, 3 * BLOCK_SIZE).map(lambda k: max(size - k, 0)),
    )


@functools.cache
def lengths(max_length: int) -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(1, max_length),
        st.sampled_from([1, 511, 4095, 4096, 4097, 8191, 8192, 8193, MAX_IO]),
        st.builds(lambda n, d: max(n * BLOCK_SIZE + d, 1), st.integers(1, max_length // BLOCK_SIZE),
                  st.integers(-1, 1)),
    )


@functools.cache
def indexes(n: int) -> st.SearchStrategy[int]:
    return st.integers(0, n - 1)


def hole_blocks(path: str, size: int, first: int, end: int) -> set[int]:
    """Blocks of [first, end) wholly in a hole of the file ``path`` (``size`` bytes), as
    SEEK_DATA says."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data: set[int] = set()
        pos, stop = first * BLOCK_SIZE, min(end * BLOCK_SIZE, size)
        while pos < stop:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data from pos on
                break
            if start >= stop:
                break
            pos = min(os.lseek(fd, start, os.SEEK_HOLE), stop)
            data |= set(range(start // BLOCK_SIZE, -(-pos // BLOCK_SIZE)))
        return set(range(first, end)) - data
    finally:
        os.close(fd)


@dataclass
class SnapModel:
    """The model of the one minor tracking the origin."""

    minor: int
    cow_path: str
    max_cache: int  # bytes, as info reports it
    fallocate: int  # bytes, the limit of the current COW file: -f, raised by expand-cow-file
    # and auto-expand
    uuid: str
    frozen: bytes | None  # the origin at the snapshot point; None in incremental mode
    touched: set[int]  # blocks changed since the current snapshot point (overflow or not)
    saved: set[int]  # blocks whose old content the current snapshot keeps
    slots: int = 0  # of those, the ones kept as data (the others are holes or zeros)
    export: object | None = None  # an open elastio-snapN connection in snapshot mode
    seq_id: int = 1
    failed: bool = False  # the snapshot overflowed (EFBIG); its change list goes on
    failed_before_restart: bool = False  # info's error_text is the resumed file's
    overflowed: bool = False  # the current change list went through an overflow
    over_count: bool = False  # a crash presumed blocks changed: the list is a superset
    step_mb: int = 0  # auto-expand: the minor's policy (it outlives transitions)
    reserved_mb: int = 0

    @property
    def snapshot(self) -> bool:
        return self.frozen is not None


class EngineModel(RuleBasedStateMachine):
    """One origin, at most one minor on it, and 0 to 3 origin clients."""

    base_dir = ""  # set by the test: where each example makes its directory
    origin_sizes = ORIGIN_SIZES
    max_request: int | None = None  # bytes of the longest request; None: the whole origin
    mb = MiB  # bytes of one "MB" of -c / -f as the engine counts them
    cache_mb: tuple = (None, 1, 300)
    fallocate_mb: tuple = (None, 1, 3)
    expand_mb: tuple = (1, 2)  # expand-cow-file by this many MB
    step_mb: tuple = (0, 1, 2)  # reconfigure-auto-expand steps (0: off)
    page_loads: ClassVar[list[int]] = []  # per example: pages read again after eviction

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="model-", dir=self.base_dir or None)
        self.origin_path = os.path.join(self.dir, "origin.img")
        self.engine: Engine | None = None
        self.handles: list = []  # open origin clients
        self.stale: list = []  # snapshot connections whose snapshot is gone
        self.snap: SnapModel | None = None
        self.active = False  # the minor's active flag (state 3/2 versus 1/0)
        self.nr_cows = 0
        self.loads = 0
        st_fs = os.statvfs(self.dir)
        # more "MB" than the file system holds: expand-cow-file by it is ENOSPC, a reserve
        # of it refuses every auto-expand
        self.beyond_fs_mb = st_fs.f_blocks * st_fs.f_frsize // self.mb + 1

    # -- set-up and helpers ---------------------------------------------------------------
    @initialize(data=st.data(), sparse=st.booleans(), seed=st.integers(0, 2**32 - 1),
                snapshot=st.booleans())
    def start(self, data, sparse: bool, seed: int, snapshot: bool) -> None:
        """A new origin, one client; half the examples start with a snapshot set up
        (more steps in snapshot mode: more overflows)."""
        self.size = size = data.draw(st.sampled_from(self.origin_sizes), label="size")
        self.model = bytearray(size) if sparse else bytearray(random.Random(seed).randbytes(size))
        with open(self.origin_path, "wb") as f:
            f.truncate(size)
            if not sparse:
                f.write(self.model)
        self.open_engine()
        self.handles.append(self.engine.open_export(ORIGIN, readonly=False))
        if snapshot:
            self.setup(data.draw(st.integers(0, MAX_MINORS - 1), label="minor"), data)
            if self.snap is not None and data.draw(st.booleans(), label="auto-expand at once"):
                self.auto_expand(data)

    def open_engine(self) -> None:
        self.engine = Engine(self.dir, [(self.origin_path, ORIGIN)], max_minors=MAX_MINORS)
        self.engine.start()

    def teardown(self) -> None:
        try:
            if self.snap is not None and self.engine is not None:
                self._count_loads()
            for h in self.handles:
                h.close()
            if self.engine is not None:
                self.engine.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.page_loads.append(self.loads)

    def _count_loads(self) -> None:
        """Before a tracker goes: count the index pages it read more than once."""
        loads = self.engine.minors[self.snap.minor].tracker.index.loads
        self.loads += max(0, loads - (nr_blocks(self.size) + 255) // 256)

    def new_cow_path(self) -> str:
        self.nr_cows += 1
        return os.path.join(self.dir, f"cow{self.nr_cows}")

    def draw_range(self, data, max_length: int) -> tuple[int, int]:
        max_length = min(max_length, self.max_request or max_length)
        offset = data.draw(offsets(self.size), label="offset")
        length = data.draw(lengths(max_length), label="length")
        return offset, min(length, self.size - offset)

    def draw_handle(self, data):
        return self.handles[data.draw(indexes(len(self.handles)), label="client")]

    def holes(self, first: int, end: int) -> set[int]:
        return hole_blocks(self.origin_path, self.size, first, end)

    def zeros(self, blocks) -> set[int]:
        """Of ``blocks``, those whose content (in the model) is all zeros."""
        return {b for b in blocks
                if not any(self.model[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE])}

    def change(self, offset: int, length: int, content: bytes | None, kind: str = "write") -> None:
        """Record a write (``content``), a zero or a trim (``kind``) in the model, before it
        is sent (the model's origin is still the old one)."""
        s = self.snap
        saving = s is not None and s.snapshot and not s.failed
        if kind == "trim" and saving:
            return  # dropped during a snapshot: the content stays, nothing changes
        first, end = blocks_spanning(offset, length)
        if saving:
            step = ZERO_CHUNK if kind == "zero" else end - first  # a write-zeroes: by chunks
            for lo in range(first, end, step):
                hi = min(lo + step, end)
                if s.failed:  # overflowed on an earlier chunk: the rest is only marked
                    s.touched |= set(range(lo, hi))
                    continue
                touched = self.save(s, lo, hi, kind) if kind == "zero" or \
                    set(range(lo, hi)) - s.saved else set(range(lo, hi))
                s.touched |= set(range(lo, hi)) if touched is None else touched
        elif s is not None:
            # incremental, or a snapshot lost to an overflow (its list goes on as an
            # incremental one): a trim or write-zeroes marks the blocks that held data
            s.touched |= set(range(first, end)) - (self.holes(first, end) if kind != "write"
                                                   else set())
        self.model[offset:offset + length] = content if content is not None else bytes(length)

    def save(self, s: SnapModel, first: int, end: int, kind: str) -> set[int] | None:
        """A first touch during a snapshot: the whole 64 KiB cluster (COPY_BLOCKS) of each
        block is saved; holes (and, for a write-zeroes, blocks of zeros) without a slot.
        Return the blocks it changes; None if it needs more slots than -f allows and
        auto-expand cannot raise the limit: the snapshot fails (EFBIG) and, as every
        change after it, the change marks all of [first, end)."""
        lo = first // COPY_BLOCKS * COPY_BLOCKS
        hi = min(-(-end // COPY_BLOCKS) * COPY_BLOCKS, nr_blocks(self.size))
        new = set(range(lo, hi)) - s.saved
        zeros = self.holes(lo, hi) & new
        if kind == "zero":
            zeros |= self.zeros(new)
        slots = s.slots + len(new - zeros)
        if slots * BLOCK_SIZE > s.fallocate and not self.auto_expand_to(s, slots * BLOCK_SIZE):
            s.failed = s.overflowed = True
            event("snapshot overflowed (EFBIG), its change list kept")
            return None
        s.saved |= new
        s.slots = slots
        event("first touch saved a hole or zeros" if zeros else "first touch saved data")
        touched = set(range(first, end))
        return touched - zeros if kind == "zero" else touched

    def auto_expand_to(self, s: SnapModel, needed: int) -> bool:
        """At the limit: raise it by whole steps to hold ``needed`` bytes of data, if
        auto-expand is on and its reserve stays free (the model's reserves are either
        far below the free space or beyond the file system's size)."""
        step = s.step_mb * self.mb
        if not step or s.reserved_mb >= self.beyond_fs_mb:
            if step:
                event("auto-expand refused: the reserve is not free")
            return False
        s.fallocate += -(-(needed - s.fallocate) // step) * step
        event("auto-expand raised the limit")
        return True

    def expect_error(self, err: int, func, *args, **kw) -> None:
        with pytest.raises(OSError) as e:
            func(*args, **kw)
        assert e.value.errno == err, f"expected {errno.errorcode[err]}, got {e.value!r}"

    def too_large(self, fallocate_mb: int | None) -> bool:
        """-f above the origin (in whole MB) is refused: the unit is MB, not bytes."""
        return bool(fallocate_mb) and fallocate_mb > -(-self.size // self.mb)

    def default_fallocate(self) -> int:
        return max(MiB, int(self.size * 10 / 100))  # 10 % of the origin, at least 1 MB

    def open_snapshot_export(self) -> None:
        self.snap.export = self.engine.open_export(snapshot_export(self.snap.minor), True)

    def retire_snapshot_export(self) -> None:
        if self.snap.export is not None:
            self.stale.append(self.snap.export)
            self.snap.export = None

    # -- the data path ----------------------------------------------------------------------
    @precondition(lambda self: self.handles)
    @rule(data=st.data(), seed=st.integers(0, 2**32 - 1),
          fill=st.none() | st.integers(0, 255), fua=st.booleans())
    def write(self, data, seed: int, fill: int | None, fua: bool) -> None:
        offset, length = self.draw_range(data, MAX_IO)
        buf = payload(seed, fill, length)
        self.change(offset, length, buf)
        self.draw_handle(data).pwrite(buf, offset, fua)

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), seed=st.integers(0, 2**32 - 1), count=st.integers(2, 24))
    def write_run(self, data, seed: int, count: int) -> None:
        """``count`` writes of MAX_IO end to end: many first touches at once, so the COW
        store fills up (and overflows) within a few steps."""
        offset = data.draw(offsets(self.size), label="offset")
        h = self.draw_handle(data)
        for i in range(count):
            length = min(MAX_IO, self.size - offset)
            if length <= 0:
                break
            buf = payload(seed + i, None, length)
            self.change(offset, length, buf)
            h.pwrite(buf, offset, False)
            offset += length

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), may_trim=st.booleans(), fua=st.booleans())
    def zero(self, data, may_trim: bool, fua: bool) -> None:
        offset, length = self.draw_range(data, self.size)
        self.change(offset, length, None, "zero")
        self.draw_handle(data).zero(length, offset, may_trim, fua)

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), fua=st.booleans())
    def trim(self, data, fua: bool) -> None:
        offset, length = self.draw_range(data, self.size)
        self.change(offset, length, None, "trim")  # applied: a punched hole reads zeroes
        self.draw_handle(data).trim(length, offset, fua)

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def flush(self, data) -> None:
        self.draw_handle(data).flush()

    # -- origin clients: the minor goes dormant with the last one -----------------------
    @precondition(lambda self: len(self.handles) < 3)
    @rule()
    def open_client(self) -> None:
        self.handles.append(self.engine.open_export(ORIGIN, readonly=False))
        if self.snap is not None:  # an overflowed minor too: its list goes on
            self.active = True

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def close_client(self, data) -> None:
        h = self.draw_handle(data)
        self.handles.remove(h)
        h.close()
        if not self.handles:
            self.active = False

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def reopen_client(self, data) -> None:
        """Close and open one client: with only one, dormant then active again."""
        self.close_client(data)
        self.open_client()

    # -- control operations -------------------------------------------------------------------
    @precondition(lambda self: self.snap is None)
    @rule(minor=st.integers(0, MAX_MINORS - 1), data=st.data())
    def setup(self, minor: int, data) -> None:
        cache_mb = data.draw(st.sampled_from(self.cache_mb), label="cache_mb")
        fallocate_mb = data.draw(st.sampled_from(self.fallocate_mb), label="fallocate_mb")
        path = self.new_cow_path()
        if self.too_large(fallocate_mb):
            self.expect_error(errno.EINVAL, self.engine.setup_snapshot, ORIGIN, path, minor,
                              cache_mb=cache_mb, fallocate_mb=fallocate_mb)
            return
        self.engine.setup_snapshot(ORIGIN, path, minor, cache_mb=cache_mb,
                                   fallocate_mb=fallocate_mb)
        self.snap = SnapModel(
            minor, path, (cache_mb or 300) * self.mb,
            fallocate_mb * self.mb if fallocate_mb else self.default_fallocate(),
            self.engine.info(minor)["uuid"], bytes(self.model), set(), set())
        self.active = True  # "setup-snapshot -> 3 at once"
        self.open_snapshot_export()

    @precondition(lambda self: self.snap is not None)
    @rule()
    def destroy(self) -> None:
        s = self.snap
        self._count_loads()
        self.engine.destroy(s.minor)
        assert not os.path.exists(s.cow_path)
        self.expect_error(errno.ENOENT, self.engine.info, s.minor)
        self.expect_error(errno.ENOENT, self.engine.open_export, snapshot_export(s.minor), True)
        self.retire_snapshot_export()
        self.snap = None
        self.active = False

    @precondition(lambda self: self.snap is not None and self.snap.snapshot)
    @rule()
    def transition_to_incremental(self) -> None:
        """Also after an overflow: the change list was kept, the failure is cleared."""
        s = self.snap
        self._count_loads()
        self.engine.transition_to_incremental(s.minor)
        if s.failed:
            event("transition to incremental after an overflow")
        s.frozen = None
        s.failed = s.failed_before_restart = False
        self.retire_snapshot_export()
        self.expect_error(errno.ENOENT, self.engine.open_export, snapshot_export(s.minor), True)

    @precondition(lambda self: self.snap is not None and not self.snap.snapshot)
    @rule(data=st.data())
    def transition_to_snapshot(self, data) -> None:
        s = self.snap
        fallocate_mb = data.draw(st.sampled_from(self.fallocate_mb), label="fallocate_mb")
        old_path, path = s.cow_path, self.new_cow_path()
        if self.too_large(fallocate_mb):
            self.expect_error(errno.EINVAL, self.engine.transition_to_snapshot, path, s.minor,
                              fallocate_mb=fallocate_mb)
            return
        self._count_loads()
        self.engine.transition_to_snapshot(path, s.minor, fallocate_mb=fallocate_mb)
        self.check_closed_cow(old_path, s)
        os.unlink(old_path)  # it stays by design; the model is done with it
        s.cow_path = path
        s.fallocate = fallocate_mb * self.mb if fallocate_mb else self.default_fallocate()
        s.seq_id += 1
        s.frozen = bytes(self.model)
        s.touched, s.saved, s.slots = set(), set(), 0
        s.over_count = s.overflowed = False
        self.open_snapshot_export()

    @precondition(lambda self: self.snap is not None)
    @rule(data=st.data(), beyond_fs=st.booleans())
    def expand(self, data, beyond_fs: bool) -> None:
        """expand-cow-file: only a healthy snapshot has a limit to raise; ENOSPC (nothing
        changed) for more than its file system has free."""
        s = self.snap
        size_mb = self.beyond_fs_mb if beyond_fs else \
            data.draw(st.sampled_from(self.expand_mb), label="expand_mb")
        if not s.snapshot or s.failed:
            event(f"expand refused in {self.mode_name()}")
            self.expect_error(errno.EINVAL, self.engine.expand_cow_file, s.minor, size_mb)
        elif beyond_fs:
            self.expect_error(errno.ENOSPC, self.engine.expand_cow_file, s.minor, size_mb)
        else:
            self.engine.expand_cow_file(s.minor, size_mb)
            s.fallocate += size_mb * self.mb
            event("expanded")

    @precondition(lambda self: self.snap is not None)
    @rule(data=st.data())
    def auto_expand(self, data) -> None:
        """reconfigure-auto-expand, in any mode, failed too; -r omitted means 0."""
        s = self.snap
        step_mb = data.draw(st.sampled_from(self.step_mb), label="step_mb")
        reserved = data.draw(st.sampled_from(("none", "0", "1", "beyond the file system")),
                             label="reserved")
        reserved_mb = {"none": None, "0": 0, "1": 1}.get(reserved, self.beyond_fs_mb)
        self.engine.reconfigure_auto_expand(s.minor, step_mb, reserved_mb)
        s.step_mb, s.reserved_mb = step_mb, reserved_mb or 0

    def check_closed_cow(self, path: str, s: SnapModel) -> None:
        """The old COW file lists exactly the blocks touched between the two points (after
        a crash, at least those)."""
        cow = CowFile.open(path, writable=False)
        try:
            listed = list(changes.changed_blocks(cow))
            missed = s.touched - set(listed)
            assert not missed, f"{path}: touched but not listed {sorted(missed)[:10]}"
            if s.overflowed:
                event("change list closed after an overflow")
            if s.over_count:
                event("change list closed after a crash")
            else:
                assert listed == sorted(s.touched), \
                    f"{path}: listed but not touched {sorted(set(listed) - s.touched)[:10]}"
            h = cow.header
            assert h.clean and h.incremental and not h.error
            assert (h.nr_changed_blocks, h.seq_id, h.uuid.hex()) == (len(listed), s.seq_id, s.uuid)
            changes.verify_index(cow)
        finally:
            cow.close()

    # -- restarts and crashes --------------------------------------------------------------
    @precondition(lambda self: self.snap is not None)
    @rule(reconnect=st.booleans())
    def restart(self, reconnect: bool) -> None:
        """Clean stop: the clients leave, the engine closes; a new one on the same run dir."""
        event(f"restart in {self.mode_name()}")
        self.stop_engine()
        self.resume(reconnect)

    @precondition(lambda self: self.snap is not None)
    @rule(reconnect=st.booleans())
    def crash(self, reconnect: bool) -> None:
        """kill -9: the files as the dead process leaves them, recovered by a new engine."""
        event(f"crash in {self.mode_name()}")
        image = crash_image(self.dir)
        dirty = self.snap is not None and self.active  # its COW file is marked dirty
        self.stop_engine()  # as the kernel does for a dead process: fds closed, locks gone
        restore_image(self.dir, image)  # ... and nothing the old engine did since
        if dirty:
            self.snap.over_count = True
            event("crash of an active minor")
        self.resume(reconnect)

    def mode_name(self) -> str:
        s = self.snap
        return "no minor" if s is None else "overflowed snapshot" if s.failed else \
            "snapshot mode" if s.snapshot else "incremental mode"

    def stop_engine(self) -> None:
        if self.snap is not None:
            self._count_loads()
        for h in self.handles:
            h.close()
        self.handles = []
        self.engine.close()
        self.engine = None

    def resume(self, reconnect: bool) -> None:
        """A new engine: the minor comes back dormant, its connections are gone."""
        self.open_engine()
        self.active = False
        self.stale = []
        s = self.snap
        if s is not None:
            s.export = None
            if s.failed:  # it resumes with its change list, failed as before
                s.failed_before_restart = True
                event("restart of an overflowed snapshot")
            if s.snapshot:
                self.open_snapshot_export()
        if reconnect:
            self.open_client()

    @rule(data=st.data())
    def misuse(self, data) -> None:
        """A sub-command that fails gives its errno and changes nothing, files included."""
        before = sorted(os.listdir(self.dir))
        existing = os.path.join(self.dir, before[0])  # some file that is not ours to replace
        s = self.snap
        e = self.engine
        minor = s.minor if s is not None else data.draw(st.integers(0, MAX_MINORS - 1))
        other = (minor + 1) % MAX_MINORS
        if s is None:
            cases = [(errno.ENOENT, e.destroy, (minor,)),
                     (errno.ENOENT, e.transition_to_incremental, (minor,)),
                     (errno.ENOENT, e.transition_to_snapshot, (self.new_cow_path(), minor)),
                     (errno.EEXIST, e.setup_snapshot, (ORIGIN, existing, minor)),
                     (errno.EINVAL, e.setup_snapshot, (ORIGIN, self.origin_path, minor)),
                     (errno.EINVAL, e.reload_snapshot, (ORIGIN, self.origin_path, minor)),
                     (errno.EINVAL, e.reload_incremental, (ORIGIN, self.origin_path, minor)),
                     (errno.EINVAL, e.setup_snapshot, (ORIGIN, self.new_cow_path(), MAX_MINORS)),
                     (errno.ENOENT, e.expand_cow_file, (minor, 1)),
                     (errno.ENOENT, e.reconfigure_auto_expand, (minor, 1))]
        else:
            cases = [(errno.EBUSY, e.setup_snapshot, (ORIGIN, self.new_cow_path(), minor)),
                     (errno.EBUSY, e.setup_snapshot, (ORIGIN, self.new_cow_path(), other)),
                     (errno.ENOENT, e.destroy, (other,)),
                     (errno.ENOENT, e.expand_cow_file, (other, 1)),
                     (errno.ENOENT, e.reconfigure_auto_expand, (other, 1, 0)),
                     (errno.EINVAL, e.expand_cow_file, (minor, 0)),
                     (errno.EBUSY, e.reload_snapshot, (ORIGIN, s.cow_path, other)),
                     (errno.EBUSY, e.reload_incremental, (ORIGIN, s.cow_path, minor))]
            if s.snapshot:
                cases.append((errno.EINVAL, e.transition_to_snapshot, (self.new_cow_path(), minor)))
            else:
                cases += [(errno.EINVAL, e.transition_to_incremental, (minor,)),
                          (errno.EEXIST, e.transition_to_snapshot, (existing, minor))]
        err, func, args = data.draw(st.sampled_from(cases), label="misuse")
        with open(existing, "rb") as f:
            content = f.read()
        self.expect_error(err, func, *args)
        assert sorted(os.listdir(self.dir)) == before
        with open(existing, "rb") as f:
            assert f.read() == content

    # -- reads ----------------------------------------------------------------------------------
    @precondition(lambda self: self.snap is not None and self.snap.snapshot)
    @rule(data=st.data(), fresh=st.booleans())
    def read_snapshot(self, data, fresh: bool) -> None:
        """A range of the snapshot, through its connection or a new one."""
        s = self.snap
        offset, length = self.draw_range(data, 3 * MAX_IO)
        export = self.engine.open_export(snapshot_export(s.minor), True) if fresh else s.export
        buf = bytearray(length)
        if s.failed:
            self.expect_error(errno.EIO, export.pread, buf, offset)
            return
        export.pread(buf, offset)
        assert buf == s.frozen[offset:offset + length], \
            f"snapshot [{offset}, +{length}): {first_difference(buf, s.frozen[offset:offset + length])}"
        if not self.active:
            event("dormant snapshot read")

    @precondition(lambda self: self.stale)
    @rule(data=st.data())
    def read_stale_snapshot(self, data) -> None:
        """A connection to a snapshot that is gone never returns data."""
        export = self.stale[data.draw(indexes(len(self.stale)), label="stale")]
        with pytest.raises(OSError):
            export.pread(bytearray(BLOCK_SIZE), 0)

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def origin_matches(self) -> None:
        if self.engine is None:
            return
        if self.handles:
            actual = read_all(self.handles[0], self.size, self.max_request)
        else:
            with open(self.origin_path, "rb") as f:
                actual = f.read()
        assert actual == self.model, f"origin: {first_difference(actual, bytes(self.model))}"

    @invariant()
    def snapshot_matches(self) -> None:
        s = self.snap
        if s is None or not s.snapshot:
            return
        if s.failed:
            self.expect_error(errno.EIO, read_all, s.export, self.size, self.max_request)
            return
        actual = read_all(s.export, self.size, self.max_request)
        assert actual == s.frozen, f"snapshot: {first_difference(actual, s.frozen)}"

    @invariant()
    def info_matches(self) -> None:
        if self.engine is None:
            return
        s = self.snap
        devices = self.engine.info()["devices"]
        if s is None:
            assert devices == []
            return
        assert len(devices) == 1, devices
        device = dict(devices[0])
        state = (1 if s.snapshot else 0) + (2 if self.active else 0)
        expected = {"minor": s.minor, "cow_file": s.cow_path, "block_device": self.origin_path,
                    "max_cache": s.max_cache, "fallocate": s.fallocate, "seq_id": s.seq_id,
                    "uuid": s.uuid, "version": 2, "nr_changed_blocks": len(s.touched),
                    "cow_size_current": self.cow_size_current(s, device),
                    "auto_expand": {"step_size_mib": s.step_mb,
                                    "reserved_space_mib": s.reserved_mb}}
        if s.failed:  # after an overflow: counted as if incremental, exactly (no crash)
            text = device.get("error_text", "")
            if s.failed_before_restart:
                assert text == KEPT_AT_RESTART, device
            else:
                assert "reached its limit" in text, device
            expected.update(error=EFBIG, error_text=text, tracking=True)
        expected["state"] = state
        if s.over_count:
            counted = device.get("nr_changed_blocks", -1)
            assert len(s.touched) <= counted <= nr_blocks(self.size), \
                f"{counted} changed blocks counted, {len(s.touched)} touched"
            expected["nr_changed_blocks"] = counted
        assert device == expected
        assert list(device) == list(expected), "info keys out of their order"

    def cow_size_current(self, s: SnapModel, device: dict) -> int:
        """Info's cow_size_current: disk space, not modelled; once the saved data is
        released (an overflow, incremental mode) it is at most the file's metadata."""
        size = device.get("cow_size_current")
        assert isinstance(size, int) and size >= 0, device
        if s.failed or not s.snapshot:
            assert size < data_offset_for(self.size) + MiB, \
                f"{size} bytes allocated to {s.cow_path}: its saved data was not released"
        return size

    @invariant()
    def data_slots_only_for_data(self) -> None:
        """The COW file holds data for exactly the saved blocks whose old content was
        data: holes, and zeros met by a write-zeroes, take no slot."""
        s = self.snap
        if s is None or s.failed or not s.snapshot:
            return
        tracker = self.engine.minors[s.minor].tracker
        assert tracker.nr_slots == s.slots, \
            f"{tracker.nr_slots} data slots used, {s.slots} saved blocks held data"

    @invariant()
    def cache_within_bound(self) -> None:
        """Between requests nothing is pinned: the cache is within its bound."""
        if self.snap is None:
            return
        tracker = self.engine.minors[self.snap.minor].tracker
        bound = max(self.snap.max_cache, index_module.MIN_CACHE_PAGES * PAGE_COST)
        assert tracker.cache_bytes <= bound


def run_model(machine: type[EngineModel], tmp_path, **attrs) -> list[int]:
    st_fs = os.statvfs(tmp_path)
    assert st_fs.f_bavail * st_fs.f_frsize >= MIN_FREE, \
        f"{tmp_path}: less than {MIN_FREE >> 20} MiB free; the model's auto-expand needs it"
    loads: list[int] = []
    model = type(machine.__name__, (machine,),
                 {"base_dir": str(tmp_path), "page_loads": loads, **attrs})
    run_state_machine_as_test(model, settings=SETTINGS)
    return loads


@pytest.mark.timeout(60 + EXAMPLE_S * EXAMPLES)
def test_engine_model(tmp_path):
    run_model(EngineModel, tmp_path)


@pytest.mark.timeout(60 + EXAMPLE_S * EXAMPLES)
def test_engine_model_tiny_cache(tmp_path, monkeypatch):
    """The index cache holds 2 or 3 pages of the 3 or 5 an origin has, so pages are
    evicted and read back from the COW file all the time.

    To get there the floor of the cache (MIN_CACHE_PAGES, "room for every page in
    flight") is lowered to 2 pages, so every request is kept within 1 MiB (2 pages at
    most), and "MB" is made one page, which also makes -f tiny (-f 40 is 55 slots):
    the EFBIG path is common. Auto-expand steps are in the same "MB" (a step of 5 is
    6.9 slots): a first touch often takes several steps at once."""
    monkeypatch.setattr(index_module, "MIN_CACHE_PAGES", 2)
    monkeypatch.setattr(engine_module, "MB", PAGE_COST)
    monkeypatch.setattr(space_module, "MB", PAGE_COST)
    loads = run_model(EngineModel, tmp_path, mb=PAGE_COST, cache_mb=(2, 3),
                      fallocate_mb=(None, 40, 100), expand_mb=(1, 20), step_mb=(0, 1, 5, 40),
                      max_request=MiB,
                      origin_sizes=(ORIGIN_SIZES[1], 4 * MiB + 1000))
    assert sum(loads) > 0, "no index page was ever evicted and read again"


# -- concurrency ----------------------------------------------------------------------------


def make_origin(path: str, size: int, seed: int) -> bytes:
    content = random.Random(seed).randbytes(size)
    with open(path, "wb") as f:
        f.write(content)
    return content


def run_threads(targets) -> None:
    """Start every target together; re-raise the first exception of any of them."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(targets))

    def wrap(target):
        def run():
            try:
                barrier.wait()
                target()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        return run
    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("seed", range(4))
def test_concurrent_writes_and_snapshot_reads(tmp_path, seed):
    """Writers overwrite overlapping ranges while readers read the snapshot: every read
    equals the frozen image, whatever the interleaving. Each round takes a new snapshot,
    so every block is written for the first time (the copy-before-write race) again."""
    size = 4 * MiB + 1000
    rng = random.Random(seed)
    path = str(tmp_path / "origin.img")
    make_origin(path, size, seed)
    with Engine(str(tmp_path), [(path, ORIGIN)], max_minors=MAX_MINORS,
                fallocate_percent=100) as e:
        clients = [e.open_export(ORIGIN, readonly=False) for _ in range(3)]
        try:
            for round_ in range(8):
                frozen = read_all(clients[0], size)
                e.setup_snapshot(ORIGIN, str(tmp_path / f"cow{round_}"), 1)
                written, zeroed = writes_against_reads(e, clients, frozen, rng)
                assert read_all(e.open_export(snapshot_export(1), True), size) == frozen
                info = e.info(1)
                # zeroes over blocks of zeros change nothing: they need not be counted
                assert "error" not in info and \
                    len(written) <= info["nr_changed_blocks"] <= len(written | zeroed), info
                e.destroy(1)
        finally:
            for h in clients:
                h.close()


def writes_against_reads(e: Engine, clients: list, frozen: bytes, rng: random.Random,
                         hot: int = 512 * 1024) -> tuple[set[int], set[int]]:
    """150 requests per client, most in the first ``hot`` bytes (so they overlap), while
    two threads read minor 1's snapshot and compare with ``frozen``; return the blocks
    written, and those only zeroed (trims, dropped during a snapshot, change none)."""
    size = len(frozen)
    touched: set[int] = set()
    zeroed: set[int] = set()
    done = threading.Event()
    reads = []

    def place(r: random.Random, max_length: int) -> tuple[int, int]:
        offset = r.randrange(hot if r.random() < 0.8 else size)
        return offset, min(r.randint(1, max_length), size - offset)

    def writer(h, r: random.Random) -> None:
        for _ in range(150):
            offset, length = place(r, MAX_IO)
            op = r.random()
            if op < 0.7:
                h.pwrite(r.randbytes(length), offset, r.random() < 0.1)
                touched.update(touched_blocks(offset, length))
            elif op < 0.85:
                h.zero(length, offset, r.random() < 0.5, False)
                zeroed.update(touched_blocks(offset, length))
            else:
                h.trim(length, offset, False)

    def writers() -> None:
        try:
            run_threads([functools.partial(writer, h, random.Random(rng.random()))
                         for h in clients])
        finally:
            done.set()

    def reader(r: random.Random) -> None:
        snap = e.open_export(snapshot_export(1), True)
        while not done.is_set():
            offset, length = place(r, 2 * MAX_IO)
            buf = bytearray(length)
            snap.pread(buf, offset)
            expected = frozen[offset:offset + length]
            assert buf == expected, f"snapshot [{offset}, +{length}) read during writes: " \
                f"{first_difference(buf, expected)}"
            reads.append(length)

    run_threads([writers] + [functools.partial(reader, random.Random(rng.random()))
                             for _ in range(2)])
    assert reads, "no snapshot read overlapped the writes"
    return touched, zeroed


def test_write_racing_transition_to_snapshot(tmp_path):
    """A write racing with transition-to-snapshot lands in exactly one of the two lists:
    the old COW file's changed blocks, or (after the point) the new snapshot's saved
    data. So the new snapshot shows the write iff the old list has its block."""
    size = 8 * MiB
    path = str(tmp_path / "origin.img")
    make_origin(path, size, 7)
    rng = random.Random(7)
    before = after = 0
    with Engine(str(tmp_path), [(path, ORIGIN)], max_minors=MAX_MINORS,
                fallocate_percent=100) as e:
        clients = [e.open_export(ORIGIN, readonly=False) for _ in range(3)]
        try:
            e.setup_snapshot(ORIGIN, str(tmp_path / "cow0"), 2)
            e.transition_to_incremental(2)
            changed: set[int] = set()  # blocks changed in the current phase, all settled
            for round_ in range(1, 21):
                written = rng.sample(sorted(set(range(nr_blocks(size))) - changed), 3 * 40)
                changed = race_transition(e, clients, written, str(tmp_path / f"cow{round_ - 1}"),
                                          str(tmp_path / f"cow{round_}"), changed, rng)
                before += len(written) - len(changed)
                after += len(changed)
                e.transition_to_incremental(2)
        finally:
            for h in clients:
                h.close()
    assert before and after, "the writes never straddled a transition"


def race_transition(e: Engine, clients: list, written: list[int], old_cow: str, new_cow: str,
                    changed: set[int], rng: random.Random) -> set[int]:
    """Write ``written`` (blocks not in ``changed``, the old list so far) from every client
    while minor 2 goes from incremental to snapshot in ``new_cow``; check each write is in
    exactly one list, and return those after the snapshot point."""
    size = clients[0].size
    new_data = {b: rng.randbytes(BLOCK_SIZE) for b in written}
    started = threading.Event()

    def writer(h, blocks: list[int], pause: float) -> None:
        for i, b in enumerate(blocks):
            if i == 5:
                started.set()
            h.pwrite(new_data[b], b * BLOCK_SIZE, False)
            time.sleep(pause * (i % 3))

    def transition() -> None:
        started.wait(10)
        e.transition_to_snapshot(new_cow, 2)

    run_threads([transition] + [functools.partial(writer, h, written[i::3], rng.random() / 2000)
                                for i, h in enumerate(clients)])
    cow = CowFile.open(old_cow, writable=False)
    try:
        listed = set(changes.changed_blocks(cow))
        assert cow.header.clean and not cow.header.error
        changes.verify_index(cow)  # the header counts what the index lists
    finally:
        cow.close()
    assert listed - set(written) == changed
    image = read_all(e.open_export(snapshot_export(2), True), size)
    later = set()
    for b in written:
        shows = image[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE] == new_data[b]
        assert shows == (b in listed), \
            f"block {b}: in the old list {b in listed}, in the new snapshot {shows}"
        if not shows:
            later.add(b)
    assert e.info(2)["nr_changed_blocks"] == len(later)
    return later


# -- empty requests ----------------------------------------------------------------------


@pytest.mark.parametrize("op", ["pwrite", "zero", "trim", "snapshot-read"])
def test_empty_request_at_index_page_boundary(tmp_path, op):
    path = str(tmp_path / "origin.img")
    make_origin(path, 2 * MiB, 1)
    with Engine(str(tmp_path), [(path, ORIGIN)], max_minors=MAX_MINORS) as e:
        h = e.open_export(ORIGIN, readonly=False)
        try:
            e.setup_snapshot(ORIGIN, str(tmp_path / "cow"), 0)
            snap = e.open_export(snapshot_export(0), True)
            if op == "pwrite":
                h.pwrite(b"", MiB, False)
            elif op == "zero":
                h.zero(0, MiB, False, False)
            elif op == "trim":
                h.trim(0, MiB, False)
            else:
                snap.pread(bytearray(0), MiB)
            assert "error" not in e.info(0)
            assert read_all(snap, 2 * MiB) == read_all(h, 2 * MiB)
        finally:
            h.close()
