"""The test harness: real processes and the helpers every test and bench script shares.

* process: commands, required tools, ``wait_for``;
* sockets: does a Unix socket (or the control protocol) answer, waiting until it does;
* daemon: ``Daemon`` (``snapengine serve``: start, stop, kill -9, log, elioctl, info,
  control requests, update-img) and the ``daemon()`` context manager;
* nbdclient: libnbd handles, whole-export reads and digests;
* devices: nbdfuse + loop devices + mounts, tmpfs, always detached; ``MKFS_EXT4``;
* files: sparse images, digests, scratch directories, file-system churn;
* faults (``FaultPlan``) and powercut (``Disk``, ``crash_image``): file I/O layers
  handed to an in-process ``Engine`` to fail, cut power or crash at exact points.

Import from the package: ``from tests.harness import Daemon, daemon, wait_for``; the
bench scripts do the same (run them from the repository root: ``python -m bench.run``).
"""

from .daemon import Daemon, daemon, update_img
from .devices import MKFS_EXT4, attached, frozen, mounted, tmpfs
from .files import churn, digest, sparse_file, workdir
from .nbdclient import (
    connect,
    connected,
    export_bytes,
    export_digest,
    export_names,
    pipelined,
    read_all,
    retire_one,
    shutdown_quietly,
)
from .process import (
    BIN,
    IN_CI,
    ROOT,
    CommandFailed,
    log_tail,
    require,
    require_root_devices,
    run,
    stop_process,
    wait_for,
)
from .sockets import (
    ServerStartError,
    control_answers,
    remove_stale_socket,
    socket_answers,
    wait_socket,
)

__all__ = [
    "BIN", "IN_CI", "MKFS_EXT4", "ROOT", "CommandFailed", "Daemon", "ServerStartError",
    "attached",
    "churn", "connect", "connected", "control_answers", "daemon", "digest", "export_bytes",
    "export_digest", "export_names", "frozen", "log_tail", "mounted", "pipelined", "read_all",
    "remove_stale_socket", "require", "require_root_devices", "retire_one", "run",
    "shutdown_quietly", "socket_answers", "sparse_file", "stop_process", "tmpfs",
    "update_img", "wait_for", "wait_socket", "workdir",
]
