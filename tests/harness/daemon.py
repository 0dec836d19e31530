"""The daemon: ``snapengine serve`` in the foreground, and the tools that talk to it.

Everything started here is stopped in ``finally``: a failing test leaves no daemon
behind. ``Daemon`` can also be started and stopped by hand (restart, kill -9 tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Iterator

from snapengine.rundir import RunDir

from .process import BIN, STOP_TIMEOUT, require, run, stop_process
from .sockets import START_TIMEOUT, wait_socket

KILL_TIMEOUT = 30.0  # seconds for the supervisor to exit once nbdkit is killed


@dataclass
class Daemon:
    """A ``snapengine serve`` in the foreground; its output goes to RUN/serve.out."""

    run_dir: str
    origins: list[tuple[str, str]]  # (path, export name)
    extra: list[str] = field(default_factory=list)  # more serve options (--durable...)
    verbose: bool = True  # --verbose: DEBUG logs (the benchmarks measure without)
    state_dir: str = ""  # --state-dir (registry, daemon.log); "": the run dir itself
    config: str = ""  # --config FILE instead of --run-dir, --state-dir (the file's)
    proc: subprocess.Popen | None = None
    log_path: str = ""

    def start(self, timeout: float = START_TIMEOUT) -> "Daemon":
        """Start, and return once both sockets answer (ServerStartError if it exits)."""
        os.makedirs(self.run_dir, exist_ok=True)
        self.log_path = os.path.join(self.run_dir, "serve.out")
        cmd = [os.path.join(BIN, "snapengine"), "serve"]
        if self.config:  # run dir, state dir and origins from the file
            cmd += ["--config", self.config]
        else:
            cmd += ["--run-dir", self.run_dir, "--state-dir", self.state_dir or self.run_dir]
        cmd += ["--verbose"] if self.verbose else []
        for path, name in self.origins:
            cmd += ["--origin", f"{path}={name}"]
        cmd += self.extra
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        for sock in (self.ctl, self.nbd_socket):
            wait_socket(sock, self.proc, "snapengine serve", self.log_path, timeout)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Stop the daemon (SIGTERM: a clean shutdown); return its exit status."""
        if self.proc is None:
            return 0
        return stop_process(self.proc, sig, timeout)

    def kill9(self) -> None:
        """SIGKILL nbdkit, the daemon proper (no clean shutdown); the supervisor follows."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(KILL_TIMEOUT)

    @property
    def pid(self) -> int:
        """The nbdkit process."""
        with open(RunDir(self.run_dir).nbdkit_pid) as f:
            return int(f.read())

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    @property
    def ctl(self) -> str:
        return RunDir(self.run_dir).ctl_socket

    @property
    def nbd_socket(self) -> str:
        return RunDir(self.run_dir).nbd_socket

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def command(self, tool: str, *args: str) -> list[str]:
        """The command line of ``tool`` (elioctl, update-img) of the venv, on this run dir."""
        return [os.path.join(BIN, tool), "--run-dir", self.run_dir, *args]

    def elioctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(self.command("elioctl", *map(str, args)), check=check)

    def update_img(self, *args) -> subprocess.CompletedProcess:
        """update-img, not checked: the caller looks at the result."""
        return run(self.command("update-img", *map(str, args)), check=False)

    def info(self, minor: int | None = None) -> dict:
        args = ["info"] if minor is None else ["info", str(minor)]
        return json.loads(self.elioctl(*args).stdout)

    def request(self, op: str, **fields):
        """One control request from this process (no elioctl process in between)."""
        from snapengine.client import request
        return request(self.ctl, op, **fields)


@contextlib.contextmanager
def daemon(run_dir: str, origins: list[tuple[str, str]], extra: list[str] = (),
           verbose: bool = True) -> Iterator[Daemon]:
    """A started daemon, stopped (SIGTERM) on the way out."""
    require("nbdkit")
    d = Daemon(run_dir, origins, list(extra), verbose)
    try:
        yield d.start()
    finally:
        d.stop()


def update_img(d: Daemon, *args) -> subprocess.CompletedProcess:
    """update-img against daemon ``d``, not checked: the caller looks at the result."""
    return d.update_img(*args)
