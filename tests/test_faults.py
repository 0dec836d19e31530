"""COW file I/O that fails: EIO, short writes, ENOSPC, failed fsyncs (faults.py), in process,
and a real daemon whose COW directory is a 1 MiB tmpfs.

The sacred rules, checked after every fault:

* the origin never loses a write: every write is acknowledged and reads back as the
  model of the origin says, through the export and in the file on disk;
* the snapshot (or change list) says it is broken: ``info`` has ``error`` = -errno, the
  log says why (naming the COW file), snapshot reads answer EIO, a change list is
  refused by ``elioctl changed-blocks`` and ``update-img`` (EINVAL);
* destroy cleans up (COW file gone, minor gone) and a new snapshot works afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import pathlib
import random
import threading

import nbd
import pytest

from snapengine import cli, updateimg
from snapengine.engine import Engine
from snapengine.errors import SnapError
from tests.harness import daemon, tmpfs
from tests.harness.faults import FaultPlan

MiB = 1 << 20
BLOCK = 4096
SIZE = 8 * MiB


class Rig:
    """An in-process engine over a random 8 MiB origin, a fault plan on the COW files
    named ``cow1`` and a bytearray model of the origin."""

    def __init__(self, top, durable: bool = False, pattern: str = "cow1") -> None:
        self.top = top
        self.rng = random.Random(1234)
        self.origin = str(top / "disk.img")
        content = self.rng.randbytes(SIZE)
        with open(self.origin, "wb") as f:
            f.write(content)
        self.model = bytearray(content)
        self.plan = FaultPlan(str(top / pattern), seed=7)
        self.run_dir = str(top / "run")
        self.engine = Engine(self.run_dir, [(self.origin, "disk")], opener=self.plan.opener,
                             durable=durable)
        self.engine.start()
        self.h = self.engine.open_export("disk", False)

    def cow(self, n: int) -> str:
        return str(self.top / f"cow{n}")

    def write(self, offset: int, length: int) -> None:
        data = self.rng.randbytes(length)
        self.h.pwrite(data, offset, False)  # must never raise, whatever the COW file does
        self.model[offset:offset + length] = data

    def scatter(self, count: int) -> None:
        """Writes all over the origin: single blocks, runs, unaligned, across pages."""
        for _ in range(count):
            length = self.rng.choice((512, BLOCK, 3 * BLOCK, 16 * BLOCK + 100, 64 * 1024))
            self.write(self.rng.randrange(0, SIZE - length), length)

    def check_origin(self) -> None:
        assert read(self.h, 0, SIZE) == self.model, "the origin lost a write"
        with open(self.origin, "rb") as f:
            assert f.read() == self.model, "the origin file on disk lost a write"

    def close(self) -> None:
        self.engine.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def read(export, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    export.pread(buf, offset)
    return bytes(buf)


def expect_errno(err: int, func, *args, **kwargs) -> SnapError:
    with pytest.raises(OSError) as e:
        func(*args, **kwargs)
    assert e.value.errno == err, f"expected {errno.errorcode[err]}, got {e.value!r}"
    return e.value


def logged_failure(caplog, path: str, err: int) -> bool:
    """An ERROR record names the COW file and the reason."""
    return any(r.levelno >= logging.ERROR and path in r.getMessage()
               and os.strerror(err) in r.getMessage() for r in caplog.records)


def check_failed_snapshot(rig: Rig, cow: str, err: int, caplog, snap) -> None:
    info = rig.engine.info(0)
    assert info.get("error") == -err and info["state"] == 3, info
    assert logged_failure(caplog, cow, err), "the log does not say why the snapshot failed"
    assert rig.plan.fired and rig.plan.fired_paths() == {cow}, rig.plan.fired
    rig.check_origin()
    for offset in (0, SIZE // 2, SIZE - BLOCK):
        expect_errno(errno.EIO, read, snap, offset, BLOCK)
    rig.scatter(10)  # later writes go straight through
    rig.check_origin()


def destroy_and_start_again(rig: Rig, cow: str) -> None:
    rig.plan.clear()
    rig.engine.destroy(0)
    assert not os.path.exists(cow), "destroy left the COW file"
    assert rig.engine.info()["devices"] == []
    expect_errno(errno.ENOENT, rig.engine.info, 0)
    new = rig.cow(9)
    rig.engine.setup_snapshot("disk", new, 0, fallocate_mb=8)
    frozen = bytes(rig.model)
    snap = rig.engine.open_export("elastio-snap0", True)
    rig.scatter(20)
    assert read(snap, 0, SIZE) == frozen
    info = rig.engine.info(0)
    assert "error" not in info and info["state"] == 3 and info["nr_changed_blocks"] > 0
    rig.check_origin()
    rig.engine.destroy(0)
    assert not os.path.exists(new)


def changed_blocks_output(cow: str) -> str:
    """``elioctl changed-blocks`` run in process (same code, no interpreter start)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["changed-blocks", cow]) == 0
    return out.getvalue()


def refused_as_change_list(cow: str, run_dir: str, image: str, capsys) -> None:
    """``elioctl changed-blocks`` and ``update-img`` both refuse ``cow`` with EINVAL,
    before touching anything."""
    capsys.readouterr()
    assert cli.main(["changed-blocks", cow]) == errno.EINVAL
    out = capsys.readouterr()
    assert out.out == "" and "elioctl: changed-blocks:" in out.err, out
    with open(image, "rb") as f:
        before = f.read()
    assert updateimg.main(["--run-dir", run_dir, "0", cow, image]) == errno.EINVAL
    assert "update-img:" in capsys.readouterr().err
    with open(image, "rb") as f:
        assert f.read() == before, "update-img touched the image"


# -- snapshot mode: the data path -------------------------------------------------------

SNAPSHOT_FAULTS = {
    # id: (inject(...) arguments, errno the minor must report)
    "pwrite-eio-once": ({"op": "pwrite"}, errno.EIO),
    "pwrite-eio-sticky": ({"op": "pwrite", "times": None}, errno.EIO),
    "pwrite-eio-after-7": ({"op": "pwrite", "after": 7}, errno.EIO),
    "short-write-eio": ({"op": "pwrite", "short": True}, errno.EIO),
    "short-write-enospc": ({"op": "pwrite", "errno": errno.ENOSPC, "short": True, "times": None},
                           errno.ENOSPC),
    "pwrite-enospc": ({"op": "pwrite", "errno": errno.ENOSPC, "times": None}, errno.ENOSPC),
    "index-pread-eio": ({"op": "pread"}, errno.EIO),
    "random-pwrite-eio": ({"op": "pwrite", "probability": 0.2, "times": None}, errno.EIO),
}


@pytest.mark.parametrize("case", list(SNAPSHOT_FAULTS))
def test_cow_write_fault_fails_the_snapshot_not_the_origin(rig, caplog, case):
    fault, err = SNAPSHOT_FAULTS[case]
    cow = rig.cow(1)
    rig.engine.setup_snapshot("disk", cow, 0, fallocate_mb=8)
    frozen = bytes(rig.model)
    snap = rig.engine.open_export("elastio-snap0", True)
    rig.write(0, 2 * BLOCK)  # saved before the fault: the snapshot is right so far
    assert read(snap, 0, 64 * 1024) == frozen[:64 * 1024]  # (index pages 1..7 not loaded yet)
    rig.plan.inject(**fault)
    rig.scatter(60)
    check_failed_snapshot(rig, cow, err, caplog, snap)
    expect_errno(errno.EINVAL, rig.engine.transition_to_incremental, 0)
    destroy_and_start_again(rig, cow)


def test_durable_group_sync_fault_fails_the_snapshot(tmp_path, caplog):
    """--durable: the fdatasync before the origin is overwritten fails."""
    rig = Rig(tmp_path, durable=True)
    try:
        cow = rig.cow(1)
        rig.engine.setup_snapshot("disk", cow, 0, fallocate_mb=8)
        snap = rig.engine.open_export("elastio-snap0", True)
        rig.write(BLOCK, BLOCK)
        rig.plan.inject("fsync")
        rig.scatter(20)
        check_failed_snapshot(rig, cow, errno.EIO, caplog, snap)
        destroy_and_start_again(rig, cow)
    finally:
        rig.close()


def test_cow_read_fault_on_a_snapshot_read_is_eio_never_wrong_data(rig):
    """A saved block that cannot be read: that read is EIO; the snapshot is then either
    still right (the fault was transient) or failed, never wrong."""
    cow = rig.cow(1)
    rig.engine.setup_snapshot("disk", cow, 0, fallocate_mb=8)
    frozen = bytes(rig.model)
    snap = rig.engine.open_export("elastio-snap0", True)
    rig.scatter(30)
    rig.plan.inject("pread")
    expect_errno(errno.EIO, read, snap, 0, SIZE)
    try:
        again = read(snap, 0, SIZE)
    except OSError as e:
        assert e.errno == errno.EIO and rig.engine.info(0).get("error") == -errno.EIO
    else:
        assert again == frozen
    rig.check_origin()
    destroy_and_start_again(rig, cow)


@pytest.mark.parametrize("cause", ["cow-pwrite-eio", "fallocate-limit"])
def test_snapshot_read_racing_a_failing_first_touch(tmp_path, cause):
    """The read starts (the block is not saved: it comes from the origin), then a write to
    that block fails to save it, then the read reaches the origin. It must return the
    old data or EIO, never the new data with success."""
    rig = Rig(tmp_path)
    try:
        target = 3 * MiB  # one block, far from the blocks that exhaust the limit
        rig.engine.setup_snapshot("disk", rig.cow(1), 0, fallocate_mb=1)
        frozen = bytes(rig.model)
        snap = rig.engine.open_export("elastio-snap0", True)
        if cause == "fallocate-limit":
            rig.write(0, rig.engine.info(0)["fallocate"] // BLOCK * BLOCK)  # every slot -f allows
            assert "error" not in rig.engine.info(0)
        read(snap, target, BLOCK)  # the index page is cached: the read goes straight on
        at_origin, release = threading.Event(), threading.Event()

        def stop_the_reader(io, op, offset, length):
            if threading.current_thread().name == "snapshot-reader":
                at_origin.set()
                release.wait(10)
        rig.plan.hook("pread", stop_the_reader, pattern=rig.origin)
        result: dict = {}

        def reader():
            try:
                result["data"] = read(snap, target, BLOCK)
            except OSError as e:
                result["errno"] = e.errno
        t = threading.Thread(target=reader, name="snapshot-reader")
        t.start()
        assert at_origin.wait(10), "the read did not reach the origin"
        if cause == "cow-pwrite-eio":
            rig.plan.inject("pwrite")
        writer = threading.Thread(target=rig.write, args=(target, BLOCK))
        writer.start()
        writer.join(2)  # a fixed engine may hold the write until the read is done
        release.set()
        t.join(10)
        writer.join(10)
        assert rig.engine.info(0)["error"] in (-errno.EIO, -errno.EFBIG)
        rig.check_origin()
        assert result.get("errno") == errno.EIO or \
            result.get("data") == frozen[target:target + BLOCK], \
            "the snapshot read returned the new data of the origin, with success"
    finally:
        rig.close()


# -- snapshot mode: failed fsync at a checkpoint ------------------------------------------

def test_fsync_fault_at_transition_to_incremental(rig, caplog):
    cow = rig.cow(1)
    rig.engine.setup_snapshot("disk", cow, 0, fallocate_mb=8)
    snap = rig.engine.open_export("elastio-snap0", True)
    rig.scatter(20)
    rig.plan.inject("fsync")
    expect_errno(errno.EIO, rig.engine.transition_to_incremental, 0)
    check_failed_snapshot(rig, cow, errno.EIO, caplog, snap)
    destroy_and_start_again(rig, cow)


def test_fsync_fault_when_the_last_client_leaves(rig, caplog):
    cow = rig.cow(1)
    rig.engine.setup_snapshot("disk", cow, 0, fallocate_mb=8)
    snap = rig.engine.open_export("elastio-snap0", True)
    rig.scatter(20)
    rig.plan.inject("fsync", times=None)
    try:
        rig.h.close()  # last client: index synced and header marked clean, or fail
    except OSError:
        pass  # nbdkit only logs a failed close: what counts is what the minor says
    rig.plan.clear()
    rig.h = rig.engine.open_export("disk", False)  # the origin is still served
    check_failed_snapshot(rig, cow, errno.EIO, caplog, snap)
    destroy_and_start_again(rig, cow)


def test_fsync_fault_when_a_dormant_minor_gets_a_client(rig, caplog):
    cow = rig.cow(1)
    rig.engine.setup_snapshot("disk", cow, 0, fallocate_mb=8)
    snap = rig.engine.open_export("elastio-snap0", True)
    rig.scatter(20)
    rig.h.close()
    assert rig.engine.info(0)["state"] == 1  # dormant, closed cleanly
    rig.plan.inject("fsync", times=None)
    rig.h = rig.engine.open_export("disk", False)  # must work whatever the COW file does
    rig.plan.clear()
    check_failed_snapshot(rig, cow, errno.EIO, caplog, snap)
    destroy_and_start_again(rig, cow)


def test_fsync_fault_when_a_reloaded_minor_comes_online(rig, caplog):
    cow = rig.cow(1)
    rig.engine.setup_snapshot("disk", cow, 0, fallocate_mb=8)
    rig.scatter(20)
    rig.h.close()
    rig.engine.close()  # clean stop; then the registry is lost: reload-snapshot
    rig.engine = Engine(str(rig.top / "run2"), [(rig.origin, "disk")], opener=rig.plan.opener)
    rig.engine.start()
    rig.engine.reload_snapshot("disk", cow, 0)
    assert rig.engine.info(0)["state"] == 5
    rig.plan.inject("fsync", times=None)
    rig.h = rig.engine.open_export("disk", False)  # must work whatever the COW file does
    rig.plan.clear()
    info = rig.engine.info(0)
    assert info.get("error") == -errno.EIO, info
    assert logged_failure(caplog, cow, errno.EIO)
    rig.check_origin()
    rig.scatter(10)
    rig.check_origin()
    try:
        snap = rig.engine.open_export("elastio-snap0", True)
    except OSError as e:
        assert e.errno == errno.ENOENT
    else:
        expect_errno(errno.EIO, read, snap, 0, BLOCK)
    destroy_and_start_again(rig, cow)


# -- control operations that fail on the COW file change nothing --------------------------

@pytest.mark.parametrize("op", ["pwrite", "fsync"])
def test_setup_snapshot_that_cannot_write_its_cow_file_changes_nothing(rig, op):
    cow = rig.cow(1)
    rig.plan.inject(op, errno.ENOSPC if op == "pwrite" else errno.EIO)
    err = expect_errno(errno.ENOSPC if op == "pwrite" else errno.EIO,
                       rig.engine.setup_snapshot, "disk", cow, 0)
    assert cow in str(err)
    assert not os.path.exists(cow) and rig.engine.info()["devices"] == []
    rig.scatter(10)
    rig.check_origin()
    expect_errno(errno.ENOENT, rig.engine.destroy, 0)
    rig.engine.setup_snapshot("disk", rig.cow(2), 0, fallocate_mb=8)
    assert "error" not in rig.engine.info(0)


def test_transition_to_snapshot_that_cannot_create_its_cow_file_changes_nothing(tmp_path):
    rig = Rig(tmp_path, pattern="cow2")
    try:
        rig.engine.setup_snapshot("disk", rig.cow(1), 0, fallocate_mb=8)
        rig.engine.transition_to_incremental(0)
        rig.write(0, BLOCK)
        rig.plan.inject("pwrite", errno.ENOSPC)
        expect_errno(errno.ENOSPC, rig.engine.transition_to_snapshot, rig.cow(2), 0)
        assert not os.path.exists(rig.cow(2))
        info = rig.engine.info(0)
        assert info["state"] == 2 and info["seq_id"] == 1 and "error" not in info, info
        rig.write(5 * MiB, BLOCK)  # still tracked
        rig.engine.transition_to_snapshot(rig.cow(3), 0)
        blocks = {int(line.split()[0]) // BLOCK for line in
                  changed_blocks_output(rig.cow(1)).splitlines()}
        assert {0, 5 * MiB // BLOCK} <= blocks
        rig.check_origin()
    finally:
        rig.close()


# -- incremental mode --------------------------------------------------------------------

# Incremental mode keeps change marks in memory (written back on eviction and at clean
# points) behind a durable write-intent bit per 64 MiB region. So a COW fault shows up
# either on the write path (the intent bit of a region's first change since a clean
# point, an index page to load, a dirty page to write back on eviction): the minor
# fails at once; or when the list is closed (marks written back, synced): the closed
# file is not clean. Either way the list must never be presented as valid.
INCREMENTAL_FAULTS = {
    # id: (inject(...) arguments, errno, where it must show: "write" or "close")
    "intent-pwrite-eio": ({"op": "pwrite"}, errno.EIO, "write"),
    "intent-pwrite-enospc": ({"op": "pwrite", "errno": errno.ENOSPC}, errno.ENOSPC, "write"),
    "intent-fdatasync-eio": ({"op": "fsync"}, errno.EIO, "write"),
    "index-pread-eio": ({"op": "pread"}, errno.EIO, "write"),
    "mark-write-back-eio-once": ({"op": "pwrite"}, errno.EIO, "close"),
    "mark-write-back-eio-sticky": ({"op": "pwrite", "times": None}, errno.EIO, "close"),
    "mark-write-back-short": ({"op": "pwrite", "short": True, "times": None}, errno.EIO, "close"),
    "mark-write-back-enospc": ({"op": "pwrite", "errno": errno.ENOSPC, "times": None},
                               errno.ENOSPC, "close"),
    "close-fsync-eio": ({"op": "fsync", "times": None}, errno.EIO, "close"),
}


def new_clean_point(rig: Rig) -> None:
    """The last client leaves and comes back: marks written, intents cleared."""
    rig.h.close()
    assert rig.engine.info(0)["state"] == 0
    rig.h = rig.engine.open_export("disk", False)


@pytest.mark.parametrize("case", list(INCREMENTAL_FAULTS))
def test_cow_fault_in_incremental_mode_never_leaves_a_valid_looking_list(rig, caplog, capsys,
                                                                         case):
    fault, err, where = INCREMENTAL_FAULTS[case]
    cow = rig.cow(1)
    rig.engine.setup_snapshot("disk", cow, 0, fallocate_mb=8)
    rig.scatter(5)
    rig.engine.transition_to_incremental(0)
    image = str(rig.top / "backup.img")
    with open(image, "wb") as f:
        f.write(rig.model)
    if where == "write":
        new_clean_point(rig)  # the next change needs an intent bit and a page load
    else:
        rig.scatter(30)  # intents durable, pages cached: marks only in memory
    rig.plan.inject(**fault)
    rig.scatter(60)
    rig.check_origin()
    info = rig.engine.info(0)
    if where == "write":
        assert rig.plan.fired, "the fault was meant for the write path"
    if rig.plan.fired:  # on the write path: the minor fails at once
        assert info.get("error") == -err and info["state"] == 2, info
        expect_errno(errno.EINVAL, rig.engine.transition_to_snapshot, rig.cow(2), 0)
        assert not os.path.exists(rig.cow(2))
    else:
        try:  # closes the list: its marks cannot be written back
            rig.engine.transition_to_snapshot(rig.cow(2), 0)
        except OSError as e:  # failing is honest too, if nothing changed
            assert e.errno == err and not os.path.exists(rig.cow(2))
            assert rig.engine.info(0)["state"] == 2
        else:
            assert rig.engine.info(0)["state"] == 3
    assert rig.plan.fired and rig.plan.fired_paths() == {cow}, rig.plan.fired
    assert logged_failure(caplog, cow, err), "the log does not say what happened to the list"
    refused_as_change_list(cow, rig.run_dir, image, capsys)
    rig.scatter(10)
    rig.check_origin()
    rig.plan.clear()
    if os.path.exists(rig.cow(2)):
        os.unlink(cow)  # the old list (useless); the minor moved on to cow2
        cow = rig.cow(2)
    destroy_and_start_again(rig, cow)


def test_mark_write_back_fault_on_eviction_fails_the_change_list(tmp_path, caplog, capsys):
    """Cache pressure: dirty pages written back on eviction, and that write fails."""
    origin = str(tmp_path / "big.img")
    with open(origin, "wb") as f:
        f.truncate(1536 * MiB)  # 1536 index pages, half again the cache's floor of 1024
    cow = str(tmp_path / "cow1")
    plan = FaultPlan(cow)
    with Engine(str(tmp_path / "run"), [(origin, "big")], opener=plan.opener) as engine:
        engine.setup_snapshot("big", cow, 0, cache_mb=1)
        engine.transition_to_incremental(0)
        h = engine.open_export("big", False)
        for offset in range(0, 1536 * MiB, 64 * MiB):  # every intent region made durable
            h.pwrite(b"r", offset, False)
        plan.inject("pwrite")
        for offset in range(MiB, 1536 * MiB, MiB):  # one new page each: evictions
            h.pwrite(b"w", offset, False)
        assert plan.fired and plan.fired[0].length == 4096, plan.fired  # a page write-back
        info = engine.info(0)
        assert info.get("error") == -errno.EIO, info
        assert logged_failure(caplog, cow, errno.EIO)
        for offset in range(0, 1536 * MiB, MiB):
            assert read(h, offset, 1) == (b"w" if offset else b"r")
        expect_errno(errno.EINVAL, engine.transition_to_snapshot, str(tmp_path / "cow2"), 0)
        image = str(tmp_path / "image")
        with open(image, "wb") as f:
            f.write(b"untouched")
        refused_as_change_list(cow, engine.run_dir, image, capsys)
        engine.destroy(0)
        assert not os.path.exists(cow)
        h.close()


def test_failed_change_list_stays_refused_across_a_clean_restart(tmp_path, caplog, capsys):
    rig = Rig(tmp_path)
    cow = rig.cow(1)
    image = str(tmp_path / "backup.img")
    try:
        rig.engine.setup_snapshot("disk", cow, 0, fallocate_mb=8)
        rig.engine.transition_to_incremental(0)
        with open(image, "wb") as f:
            f.write(rig.model)
        new_clean_point(rig)
        rig.plan.inject("pwrite")  # the intent bit of the first change
        rig.scatter(20)
        assert rig.engine.info(0)["error"] == -errno.EIO
    finally:
        rig.close()  # clean shutdown: the file is closed, marked failed
    refused_as_change_list(cow, rig.run_dir, image, capsys)
    with Engine(rig.run_dir, [(rig.origin, "disk")]) as engine:  # the daemon restarts
        info = engine.info(0)
        assert info["error"] == -errno.EIO, info
        expect_errno(errno.EINVAL, engine.transition_to_snapshot, rig.cow(2), 0)
        h = engine.open_export("disk", False)
        h.pwrite(b"after restart", 0, False)
        assert read(h, 0, 13) == b"after restart"
        engine.destroy(0)
        assert not os.path.exists(cow)


def test_fsync_fault_closing_the_old_change_list(rig, caplog, capsys):
    """transition-to-snapshot cannot sync the old file: the new snapshot is fine, the old
    list must not be presented as valid."""
    cow = rig.cow(1)
    rig.engine.setup_snapshot("disk", cow, 0, fallocate_mb=8)
    rig.engine.transition_to_incremental(0)
    rig.scatter(20)
    image = str(rig.top / "backup.img")
    with open(image, "wb") as f:
        f.write(bytes(SIZE))
    rig.plan.inject("fsync", times=None)
    try:
        rig.engine.transition_to_snapshot(rig.cow(2), 0)
    except OSError as e:  # failing the command is also honest, if it changed nothing
        assert e.errno == errno.EIO
        assert not os.path.exists(rig.cow(2)) and rig.engine.info(0)["state"] == 2
    else:
        info = rig.engine.info(0)
        assert info["state"] == 3 and info["seq_id"] == 2 and "error" not in info, info
        assert logged_failure(caplog, cow, errno.EIO)
        frozen = bytes(rig.model)
        rig.scatter(10)
        assert read(rig.engine.open_export("elastio-snap0", True), 0, SIZE) == frozen
    refused_as_change_list(cow, rig.run_dir, image, capsys)
    rig.check_origin()


# -- a real daemon, a real full filesystem ------------------------------------------------

@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs."""
    with tmpfs(str(tmp_path / "tiny"), "1m") as path:
        yield pathlib.Path(path)


@pytest.mark.e2e
def test_cow_directory_fills_up_real_daemon(tmp_path, tiny_fs):
    size = 16 * MiB
    origin = str(tmp_path / "disk.img")
    rng = random.Random(99)
    model = bytearray(rng.randbytes(size))
    with open(origin, "wb") as f:
        f.write(model)
    cow = str(tiny_fs / "cow")
    with daemon(str(tmp_path / "run"), [(origin, "disk0")]) as d:
        h = nbd.NBD()
        h.connect_uri(d.uri("disk0"))
        frozen = bytes(model)
        d.elioctl("setup-snapshot", "-f", "16", "disk0", cow, "0")  # ENOSPC long before -f
        snap = nbd.NBD()
        snap.connect_uri(d.uri("elastio-snap0"))
        for i in range(96):  # 3 MiB of first touches into a 1 MiB filesystem
            data = rng.randbytes(32 * 1024)
            offset = i * (size // 96) // BLOCK * BLOCK
            h.pwrite(data, offset)  # acknowledged, every one
            model[offset:offset + len(data)] = data
        h.flush()
        info = d.info(0)
        assert info.get("error") == -errno.ENOSPC and info["state"] == 3, info
        assert info["tracking"] is True, info  # an overflow: the change list is kept (§8)
        assert info["cow_size_current"] < 512 * 1024  # the saved data went back at once
        log = d.log()
        assert "No space left on device" in log and cow in log, log[-3000:]
        assert h.pread(size, 0) == model
        with open(origin, "rb") as f:
            assert f.read() == model
        with pytest.raises(nbd.Error) as e:
            snap.pread(BLOCK, 0)
        assert e.value.errnum == errno.EIO
        snap.shutdown()
        d.elioctl("destroy", "0")
        assert not os.path.exists(cow) and d.info()["devices"] == []
        assert os.listdir(tiny_fs) == []
        # the space is back: a new snapshot on the same filesystem works
        d.elioctl("setup-snapshot", "-f", "16", "disk0", cow, "0")
        frozen = bytes(model)
        h.pwrite(b"\xaa" * 8192, 4096)
        model[4096:4096 + 8192] = b"\xaa" * 8192
        snap = nbd.NBD()
        snap.connect_uri(d.uri("elastio-snap0"))
        assert snap.pread(size, 0) == frozen
        assert "error" not in d.info(0)
        snap.shutdown()
        d.elioctl("destroy", "0")
        assert h.pread(size, 0) == model
        h.shutdown()
