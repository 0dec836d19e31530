"""nbdfuse + loop devices + mounts, as context managers that always undo what they did.

The machine has only 8 loop devices: a test that fails half-way must still detach its
loop device, unmount and stop nbdfuse, or the tests after it cannot attach any.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Iterator

from .process import IN_CI, require, require_root_devices, run, wait_for

FUSE_EXIT_TIMEOUT = 10.0  # seconds for nbdfuse to exit once unmounted
# mkfs.ext4 for the tests: 4 KiB blocks (a small ext4 could default to 1 KiB), and the
# inode tables and journal written now, not by ext4lazyinit while a test runs
MKFS_EXT4 = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-E",
             "lazy_itable_init=0,lazy_journal_init=0"]


@contextlib.contextmanager
def attached(uri: str, mountpoint: str, readonly: bool = False) -> Iterator[str]:
    """nbdfuse + losetup: yield a loop device backed by the NBD export at ``uri``."""
    require("nbdfuse", "losetup", "fusermount3")
    require_root_devices()
    os.makedirs(mountpoint, exist_ok=True)
    disk = os.path.join(mountpoint, "disk")
    cmd = ["nbdfuse"] + (["-r"] if readonly else []) + [disk, uri]
    fuse = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    loop = None
    try:
        def fuse_up() -> bool:
            if fuse.poll() is not None:
                raise RuntimeError(f"nbdfuse exited: {fuse.stderr.read().decode()}")
            return os.path.exists(disk)
        wait_for(fuse_up, what=f"nbdfuse on {mountpoint}")
        ro = ["-r"] if readonly else []
        loop = run(["losetup", "-f", "--show", *ro, disk]).stdout.strip()
        yield loop
    finally:
        if loop:
            unmount_all(loop)
            run(["losetup", "-d", loop], check=False)
        run(["fusermount3", "-u", mountpoint], check=False)
        try:
            fuse.wait(FUSE_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()


def unmount_all(device: str) -> None:
    """Unmount every mount of ``device``, the most recent first."""
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[0] == device]
    for point in reversed(points):
        run(["umount", point], check=False)


@contextlib.contextmanager
def mounted(device: str, mountpoint: str, options: str = "") -> Iterator[str]:
    os.makedirs(mountpoint, exist_ok=True)
    run(["mount"] + (["-o", options] if options else []) + [device, mountpoint])
    try:
        yield mountpoint
    finally:
        run(["umount", mountpoint], check=False)


@contextlib.contextmanager
def frozen(mountpoint: str) -> Iterator[None]:
    """fsfreeze: the file system is consistent on disk (journal flushed) while frozen."""
    run(["fsfreeze", "-f", mountpoint])
    try:
        yield
    finally:
        run(["fsfreeze", "-u", mountpoint])


@contextlib.contextmanager
def tmpfs(path: str, size: str) -> Iterator[str]:
    """A tmpfs of ``size`` (mount's syntax: "1m") at ``path``: a small file system that
    fills up. Root only: skipped on a developer's machine, a failure in CI."""
    import pytest  # only the tests use this one

    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("a tmpfs needs root in CI")
        pytest.skip("mounting a tmpfs needs root")
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        if IN_CI:
            pytest.fail(f"cannot mount a tmpfs in CI: {r.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)
