"""``snapengine attach`` / ``detach`` (what snapengine-attach@NAME.service runs), for
real through nbdfuse + a loop device: an ext4 on the device, detach refused while it is
mounted, the data on the origin after detach and back after a new attach."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from typing import Iterator

import pytest

from snapengine.attach import state_path
from snapengine.rundir import RunDir

from tests.harness.daemon import Daemon, daemon
from tests.harness.devices import MKFS_EXT4, mounted, unmount_all
from tests.harness.files import sparse_file
from tests.harness.process import BIN, require, require_root_devices, run

pytestmark = pytest.mark.e2e
SIZE = 64 << 20


def snapengine(*args: str, check: bool = True):
    return run([os.path.join(BIN, "snapengine"), *args], check=check)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def cleaned_up(d: Daemon, name: str) -> Iterator[None]:
    """Whatever the test left attached is taken down (umount, losetup -d, fusermount)."""
    try:
        yield
    finally:
        path = state_path(RunDir(d.run_dir), name)
        if os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            unmount_all(state["device"])
            run(["losetup", "-d", state["device"]], check=False)
            run(["fusermount3", "-u", state["fuse_dir"]], check=False)


@pytest.fixture
def served(tmp_path):
    require("nbdkit", "nbdfuse", "losetup", "fusermount3", "mkfs.ext4")
    require_root_devices()
    origin = sparse_file(str(tmp_path / "disk0.img"), SIZE)
    with daemon(str(tmp_path / "run"), [(origin, "disk0")]) as d:
        with cleaned_up(d, "disk0"):
            yield d


def test_attach_mount_detach_reattach(served, tmp_path):
    d = served
    r = snapengine("attach", "--run-dir", d.run_dir, "--method", "loop", "disk0")
    device = r.stdout.strip()
    assert device.startswith("/dev/loop") and r.stdout == device + "\n", r
    with open(state_path(RunDir(d.run_dir), "disk0")) as f:
        state = json.load(f)
    assert state["method"] == "loop" and state["device"] == device and alive(state["fuse_pid"])
    run(MKFS_EXT4 + [device])
    mnt = str(tmp_path / "mnt")
    with mounted(device, mnt):
        with open(os.path.join(mnt, "hello"), "wb") as f:
            f.write(b"written through the attached device\n" * 1000)
            os.fsync(f.fileno())
        busy = snapengine("detach", "--run-dir", d.run_dir, "disk0", check=False)
        assert busy.returncode == errno.EBUSY, busy
        assert f"is mounted on {mnt}: unmount it first" in busy.stderr, busy.stderr
        assert "Traceback" not in busy.stderr
    snapengine("detach", "--run-dir", d.run_dir, "disk0")
    assert not os.path.exists(state_path(RunDir(d.run_dir), "disk0"))
    assert not alive(state["fuse_pid"])
    assert run(["losetup", "-j", os.path.join(state["fuse_dir"], "disk")]).stdout == ""
    device = snapengine("attach", "--run-dir", d.run_dir, "disk0").stdout.strip()
    with mounted(device, mnt):
        with open(os.path.join(mnt, "hello"), "rb") as f:
            assert f.read() == b"written through the attached device\n" * 1000
    snapengine("detach", "--run-dir", d.run_dir, "disk0")


def test_attach_errors(served, tmp_path):
    d = served
    r = snapengine("attach", "--run-dir", d.run_dir, "nosuch", check=False)
    assert r.returncode == errno.ENOENT and "no export nosuch" in r.stderr, r
    assert not os.path.exists(state_path(RunDir(d.run_dir), "nosuch"))
    r = snapengine("detach", "--run-dir", d.run_dir, "disk0", check=False)
    assert r.returncode == errno.ENOENT and "disk0 is not attached" in r.stderr, r
    config = str(tmp_path / "se.toml")
    with open(config, "w") as f:
        f.write(f'run_dir = "{d.run_dir}"\n')
    device = snapengine("attach", "--config", config, "disk0").stdout.strip()
    r = snapengine("attach", "--config", config, "disk0", check=False)
    assert r.returncode == errno.EBUSY and f"already attached as {device}" in r.stderr, r
    snapengine("detach", "--config", config, "disk0")
