"""Real processes for the tests: the daemon, the CLI, nbdfuse + loop devices, ext4.

Everything started here is stopped in ``finally``: a failing test leaves no daemon,
no FUSE mount and no loop device behind (the machine has only 8 loop devices).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the venv's bin: snapengine, elioctl, update-img
IN_CI = os.environ.get("CI") == "true"


def require(*tools: str) -> None:
    """Skip when a tool is missing on a developer's machine; fail in CI."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        if IN_CI:
            pytest.fail(f"missing in CI: {', '.join(missing)}")
        pytest.skip(f"missing: {', '.join(missing)}")


def require_root_devices() -> None:
    """FUSE and loop devices (root only)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    if not os.path.exists("/dev/fuse"):
        problems.append("no /dev/fuse")
    if not os.path.exists("/dev/loop-control"):
        problems.append("no loop devices")
    if problems:
        if IN_CI:
            pytest.fail("; ".join(problems))
        pytest.skip("; ".join(problems))


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}\n"
                             f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-4000:]}")
    return r


def socket_answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


@dataclass
class Daemon:
    """A running ``snapengine serve`` in the foreground."""

    run_dir: str
    origins: list[tuple[str, str]]
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    log_path: str = ""

    def start(self) -> "Daemon":
        os.makedirs(self.run_dir, exist_ok=True)
        self.log_path = os.path.join(self.run_dir, "serve.out")
        cmd = [os.path.join(BIN, "snapengine"), "serve", "--run-dir", self.run_dir, "--verbose"]
        for path, name in self.origins:
            cmd += ["--origin", f"{path}={name}"]
        cmd += self.extra
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        ctl = os.path.join(self.run_dir, "ctl.sock")

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            return socket_answers(ctl)
        wait_for(ready, what="the daemon's control socket")
        return self

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Stop the daemon; return its exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    @property
    def nbd_socket(self) -> str:
        return os.path.join(self.run_dir, "nbd.sock")

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def elioctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [os.path.join(BIN, "elioctl"), "--run-dir", self.run_dir, *args]
        r = run(cmd, check=False)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}")
        return r

    def info(self, minor: int | None = None) -> dict:
        args = ["info"] if minor is None else ["info", str(minor)]
        return json.loads(self.elioctl(*args).stdout)


@contextlib.contextmanager
def daemon(run_dir: str, origins: list[tuple[str, str]], extra: list[str] = ()) -> Iterator[Daemon]:
    require("nbdkit")
    d = Daemon(run_dir, origins, list(extra))
    try:
        yield d.start()
    finally:
        d.stop()


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
        def mounted() -> bool:
            if fuse.poll() is not None:
                raise RuntimeError(f"nbdfuse exited: {fuse.stderr.read().decode()}")
            return os.path.exists(disk)
        wait_for(mounted, what=f"nbdfuse on {mountpoint}")
        loop = run(["losetup", "-f", "--show"] + (["-r"] if readonly else []) + [disk]).stdout.strip()
        yield loop
    finally:
        if loop:
            _unmount_all(loop)
            run(["losetup", "-d", loop], check=False)
        run(["fusermount3", "-u", mountpoint], check=False)
        try:
            fuse.wait(10)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()


def _unmount_all(device: str) -> None:
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


def sparse_file(path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def update_img(d: Daemon, *args) -> subprocess.CompletedProcess:
    """update-img against daemon ``d``, not checked: the caller looks at the result."""
    return run([os.path.join(BIN, "update-img"), "--run-dir", d.run_dir, *map(str, args)],
               check=False)


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def export_bytes(d: Daemon, name: str) -> bytes:
    """The whole content of export ``name``, read through libnbd."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(d.uri(name))
    try:
        return h.pread(h.get_size(), 0)
    finally:
        h.shutdown()
