"""The daemon inside nbdkit: configuration, the engine, and the threads around it.

nbdkit drives it through nbd_plugin.py, in this order: ``configure`` for each
key=value, ``check`` (config_complete), ``start`` (get_ready: origins opened, minors
resumed, before any socket accepts), ``start_threads`` (after_fork: metrics listener,
TCP relay, then the control socket, whose answer means ready; the info refresher),
``stop`` (cleanup: clean shutdown).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import threading
from logging.handlers import WatchedFileHandler
from typing import TYPE_CHECKING, Any

from .control import ControlServer
from .arguments import DEFAULT_CACHE_MB, DEFAULT_FALLOCATE_PERCENT, DEFAULT_MAX_MINORS
from .engine import Engine
from .errors import SnapError
from .relay import DEFAULT_MAX_CONNECTIONS, TcpRelay, parse_hostport
from .rundir import RunDir

if TYPE_CHECKING:
    from .metrics import MetricsServer

log = logging.getLogger(__name__)

INFO_REFRESH = 0.5  # seconds between checks of the counters in the info file
LOG_FORMAT = "%(asctime)s %(levelname)s (%(threadName)s) [%(name)s] %(message)s"
SUPERVISOR_POLL = 0.2  # seconds between checks that the supervisor is alive
ORPHAN_GRACE = 10.0  # seconds an orphaned daemon gets to close its COW files, then exits
KEYS = ("run_dir", "origins", "max_minors", "cache_default", "fallocate_percent", "tcp",
        "log", "verbose", "durable", "supervisor", "state_dir", "socket_group",
        "max_connections", "metrics")


def setup_logging(verbose: bool, log_file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
        handlers.append(WatchedFileHandler(log_file))  # reopened once logrotate moves it
    for h in handlers:
        h.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers,
                        force=True)


def secure_socket(path: str, gid: int | None) -> None:
    """nbd.sock (bound by nbdkit, under umask 077) gets mode 0600, or 0660 and group
    ``gid`` (--socket-group): the origin exports are read-write, whoever can connect
    can write the disks. Before the first connection is accepted (after_fork)."""
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, 0o600 if gid is None else 0o660)
    log.debug("%s: mode %o%s", path, 0o600 if gid is None else 0o660,
              "" if gid is None else f", group {gid}")


class Daemon:
    def __init__(self) -> None:
        self.params: dict[str, str] = {}
        self.engine: Engine | None = None
        self.control: ControlServer | None = None
        self.relay: TcpRelay | None = None
        self.metrics: MetricsServer | None = None
        self._stop = threading.Event()

    def configure(self, key: str, value: str) -> None:
        if key not in KEYS:
            raise SnapError(errno.EINVAL, f"unknown parameter {key!r} (known: {', '.join(KEYS)})")
        self.params[key] = value

    def check(self) -> None:
        if "run_dir" not in self.params:
            raise SnapError(errno.EINVAL, "run_dir=DIR is required")
        setup_logging(self.params.get("verbose") == "1", self.params.get("log"))

    def _origins(self) -> list[tuple[str, str]]:
        try:
            origins = json.loads(self.params.get("origins", "[]"))
            return [(os.path.abspath(path), name) for path, name in origins]
        except (ValueError, TypeError) as e:
            raise SnapError(errno.EINVAL, f"origins= must be a JSON list of [path, name]: {e}")

    def start(self) -> None:
        p: dict[str, Any] = self.params
        run_dir = os.path.abspath(p["run_dir"])
        self.engine = Engine(run_dir, self._origins(),
                             max_minors=int(p.get("max_minors", DEFAULT_MAX_MINORS)),
                             cache_default_mb=int(p.get("cache_default", DEFAULT_CACHE_MB)),
                             fallocate_percent=float(p.get("fallocate_percent",
                                                           DEFAULT_FALLOCATE_PERCENT)),
                             state_dir=os.path.abspath(p["state_dir"]) if p.get("state_dir")
                             else None,
                             durable=p.get("durable") == "1")
        self.engine.start()
        failed = sum(1 for m in self.engine.minors.values() if m.error)
        log.info("snapengine ready: %d origins, %d minors resumed, %d failed; run dir %s, "
                 "state dir %s", len(self.engine.origins), len(self.engine.minors) - failed,
                 failed, run_dir, self.engine.state_dir)

    def start_threads(self) -> None:
        """Everything that listens or runs beside nbdkit's threads. A listener that
        cannot start (a busy --metrics or --tcp port) fails the start: the reason in the
        log, every COW file closed cleanly (nbdkit does not call cleanup then)."""
        try:
            self._start_threads()
        except OSError as e:
            log.error("cannot start: %s", e)
            self.stop()
            raise

    def _start_threads(self) -> None:
        assert self.engine is not None
        if self.params.get("metrics"):  # first: a busy port fails before any socket answers
            self.metrics = self._start_metrics(self.params["metrics"])
        layout = self.engine.layout
        gid = self.params.get("socket_group")
        secure_socket(layout.nbd_socket, int(gid) if gid is not None else None)
        if self.params.get("tcp"):  # listening before the control socket answers (ready.py)
            host, port = parse_hostport(self.params["tcp"])
            self.relay = TcpRelay(host, port, layout.nbd_socket,
                                  int(self.params.get("max_connections", DEFAULT_MAX_CONNECTIONS)))
            self.relay.start()
            log.warning("unauthenticated NBD listener on %s:%d", host, port)
        self.control = ControlServer(self.engine, layout.ctl_socket)
        self.control.start()
        threading.Thread(target=self._refresh_info, name="info", daemon=True).start()
        if self.params.get("supervisor"):
            threading.Thread(target=self._watch_supervisor, args=(int(self.params["supervisor"]),),
                             name="supervisor-watch", daemon=True).start()

    def _start_metrics(self, hostport: str) -> MetricsServer:
        """Serve /metrics (docs/metrics.md)."""
        from .metrics import MetricsServer  # here: prometheus_client costs ~85 ms to import
        assert self.engine is not None
        metrics = MetricsServer(self.engine, hostport)
        metrics.start()
        return metrics

    def _refresh_info(self) -> None:
        """Keep the info file's counters at most a second stale."""
        while not self._stop.wait(INFO_REFRESH):
            try:
                assert self.engine is not None
                self.engine.publish()
            except Exception:
                log.exception("cannot refresh the info file")

    def _watch_supervisor(self, pid: int) -> None:
        """Die with ``snapengine serve``: once it is gone (killed, even by SIGKILL, we
        are re-parented), close every COW file cleanly and exit, clients or not, so a new
        daemon can take the run directory at once. nbdkit's --exit-with-parent and a
        parent-death signal do not end nbdkit while a client stays attached."""
        while not self._stop.wait(SUPERVISOR_POLL):
            if os.getppid() != pid:
                break
        else:
            return
        log.error("the supervisor (pid %d) is gone: closing every COW file and exiting", pid)
        threading.Timer(ORPHAN_GRACE, os._exit, (1,)).start()  # never linger
        try:
            self.stop()
            layout = self.engine.layout if self.engine is not None else RunDir("")
            for path in (layout.nbd_socket, layout.nbdkit_pid):  # nbdkit cannot remove them now
                try:
                    os.unlink(path)
                except OSError:
                    pass
        finally:
            logging.shutdown()
            os._exit(1)

    def stop(self) -> None:
        self._stop.set()
        if self.metrics is not None:
            self.metrics.stop()
        if self.relay is not None:
            self.relay.stop()
        if self.control is not None:
            self.control.stop()
        if self.engine is not None:
            self.engine.close()
            log.info("snapengine stopped cleanly")
