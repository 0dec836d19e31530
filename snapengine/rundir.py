"""The run and state directories: every file the daemon keeps, named here and nowhere else.

The daemon (nbdkit with our plugin), ``snapengine serve`` (its supervisor), ``elioctl``
and ``update-img`` meet in one directory, ``--run-dir`` (default /run/elastio-snap,
or $ELIO_RUN_DIR). ``RunDir(path).ctl_socket`` and so on give each file's path. What
must survive a reboot (/run is a tmpfs) lives in the state directory, ``--state-dir``
(default /var/lib/snapengine, or $SNAPENGINE_STATE_DIR): the registry and the log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_RUN_DIR = "/run/elastio-snap"
RUN_DIR_ENV = "ELIO_RUN_DIR"  # overrides the default, as the kernel tools' scripts expect
DEFAULT_STATE_DIR = "/var/lib/snapengine"
STATE_DIR_ENV = "SNAPENGINE_STATE_DIR"

CTL_SOCKET = "ctl.sock"  # control protocol (docs/control-protocol.md), mode 0600
NBD_SOCKET = "nbd.sock"  # every export: origins and elastio-snapN
INFO_FILE = "elastio-snap-info"  # elioctl info's JSON, as /proc/elastio-snap-info
REGISTRY_FILE = "registry.json"  # the minors a restart resumes (registry.py)
NBDKIT_PID = "nbdkit.pid"  # written by nbdkit -P
SUPERVISOR_PID = "snapengine.pid"  # snapengine serve: send it SIGTERM to stop the daemon
DAEMON_LOG = "daemon.log"


def default_run_dir() -> str:
    return os.environ.get(RUN_DIR_ENV, DEFAULT_RUN_DIR)


def default_state_dir() -> str:
    return os.environ.get(STATE_DIR_ENV, DEFAULT_STATE_DIR)


def registry_path(state_dir: str) -> str:
    return os.path.join(state_dir, REGISTRY_FILE)


def log_path(state_dir: str) -> str:
    return os.path.join(state_dir, DAEMON_LOG)


@dataclass(frozen=True)
class RunDir:
    path: str

    def _at(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def ctl_socket(self) -> str:
        return self._at(CTL_SOCKET)

    @property
    def nbd_socket(self) -> str:
        return self._at(NBD_SOCKET)

    @property
    def info(self) -> str:
        return self._at(INFO_FILE)

    @property
    def nbdkit_pid(self) -> str:
        return self._at(NBDKIT_PID)

    @property
    def supervisor_pid(self) -> str:
        return self._at(SUPERVISOR_PID)

    def nbd_uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"
