"""``snapengine serve``: start the daemon, one nbdkit process running nbd_plugin.py."""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import logging
import os
import shutil
import signal
import site
import socket
import stat
import subprocess
import sys
import time
from typing import NoReturn

from . import __version__
from .arguments import (DEFAULT_CACHE_MB, DEFAULT_FALLOCATE_PERCENT, DEFAULT_MAX_MINORS,
                        EXPORT_PREFIX, check_origin_names, check_settings)
from .client import request
from .control import remove_stale_socket
from .daemon import LOG_FORMAT
from .errors import SnapError
from .origin import open_exclusive
from .relay import parse_hostport
from .rundir import (
    CTL_SOCKET,
    DAEMON_LOG,
    INFO_FILE,
    NBD_SOCKET,
    REGISTRY_FILE,
    RUN_DIR_ENV,
    STATE_DIR_ENV,
    SUPERVISOR_PID,
    RunDir,
    default_run_dir,
    default_state_dir,
    log_path,
)

DEFAULT_ORIGIN = "var/disk0.img"  # served when no --origin is given, as DEFAULT_NAME
DEFAULT_NAME = "disk0"
DEFAULT_ORIGIN_SIZE = 1 << 30  # 1 GiB, sparse
NBDKIT_THREADS = 16  # requests in flight per connection
START_TIMEOUT = 30.0  # seconds --daemon waits for the control socket
SHUTDOWN_GRACE = 2.0  # seconds nbdkit gets to exit once tracking has stopped


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"snapengine: {message} (see 'snapengine serve --help')", file=sys.stderr)
        sys.exit(errno.EINVAL)


def build_parser() -> Parser:
    parser = Parser(prog="snapengine", description="snapengine: live point-in-time "
                    "snapshots and changed-block tracking of block devices, over NBD.")
    parser.add_argument("--version", action="version", version=f"snapengine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="serve", parser_class=Parser)
    p = sub.add_parser("serve", help="run the daemon", description=SERVE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default=default_run_dir(),
                   help=f"holds {CTL_SOCKET}, {NBD_SOCKET}, {INFO_FILE} and the pid files "
                   f"(env {RUN_DIR_ENV}, default %(default)s)")
    p.add_argument("--state-dir", default=default_state_dir(),
                   help=f"holds {REGISTRY_FILE} (the minors a restart resumes, after a reboot "
                   f"too) and {DAEMON_LOG} (env {STATE_DIR_ENV}, default %(default)s)")
    p.add_argument("--origin", action="append", default=[], metavar="PATH[=NAME]",
                   help="a file or block device to serve read-write, as export NAME "
                   "(default: PATH as given); repeatable. Without any: "
                   f"{DEFAULT_ORIGIN}={DEFAULT_NAME}")
    p.add_argument("--tcp", metavar="HOST:PORT",
                   help="also listen on TCP (unauthenticated: anyone who reaches it can "
                   "read and write the origins)")
    p.add_argument("--max-minors", type=int, default=DEFAULT_MAX_MINORS, metavar="N",
                   help="minors are 0..N-1 (default %(default)s, at most 255)")
    p.add_argument("--cache-default", type=int, default=DEFAULT_CACHE_MB, metavar="MB",
                   help="index cache limit when -c is not given (default %(default)s)")
    p.add_argument("--fallocate-percent", type=float, default=DEFAULT_FALLOCATE_PERCENT,
                   metavar="P", help="COW data limit when -f is not given, in percent of "
                   "the origin (default %(default)s)")
    p.add_argument("--durable", action="store_true",
                   help="snapshots survive a power cut: old data is synced to the COW file "
                   "before the origin is overwritten (one group-committed fdatasync per batch "
                   "of first-touch writes; see docs/performance.md for the cost)")
    p.add_argument("--daemon", action="store_true", help="detach once ready")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


SERVE_HELP = f"""\
Serve the origins over NBD on RUN/{NBD_SOCKET}, with change tracking, and accept
elioctl commands on RUN/{CTL_SOCKET}. Runs in the foreground (--daemon: in the
background, pid in RUN/{SUPERVISOR_PID}) until SIGTERM or SIGINT, which shut it
down cleanly even with clients attached: every COW file is synced and marked clean,
later writes are refused, and the daemon exits 0. SIGHUP does not stop it: the log
(STATE/{DAEMON_LOG}) is reopened by itself once logrotate has moved it. Unmount and
detach attached disks before stopping it (docs/operations.md gives the order).

Attach an origin as a block device:
  nbd-client -unix RUN/{NBD_SOCKET} -N NAME /dev/nbd0
or, without the nbd kernel module:
  nbdfuse MNT/disk '{RunDir("RUN").nbd_uri("NAME")}' &
  losetup -f --show MNT/disk
"""


def project_root() -> str:
    """The source checkout holding this package, or the current directory."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return root if os.path.exists(os.path.join(root, "pyproject.toml")) else os.getcwd()


def parse_origin(spec: str) -> tuple[str, str]:
    """PATH[=NAME] → (absolute path, export name)."""
    path, name = spec, spec
    if not os.path.exists(spec) and "=" in spec:
        path, _, name = spec.rpartition("=")
    if not path or not name:
        raise SnapError(errno.EINVAL, f"--origin {spec!r} is not PATH[=NAME]")
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise SnapError(e.errno or errno.ENOENT, f"origin {path}: {e.strerror}")
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise SnapError(errno.ENOTBLK, f"origin {path} is not a regular file or block device")
    if not os.access(path, os.R_OK | os.W_OK):
        raise SnapError(errno.EACCES, f"origin {path} is not readable and writable")
    return os.path.abspath(path), name


def check_origins_free(origins: list[tuple[str, str]], log: str) -> None:
    """Each origin can be opened as the daemon will (flock, or O_EXCL for a block device),
    then is released: EBUSY naming the origin another daemon holds, before nbdkit starts.
    The refusal goes to ``log`` too, where an admin looks after a failed start."""
    for path, _ in origins:
        try:
            open_exclusive(path).close()
        except SnapError as e:
            handler = logging.FileHandler(log)
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            handler.handle(logging.makeLogRecord({
                "name": __name__, "levelno": logging.ERROR, "levelname": "ERROR",
                "msg": "cannot start: %s", "args": (e,)}))
            handler.close()
            raise


def default_origin() -> tuple[str, str]:
    path = os.path.join(project_root(), DEFAULT_ORIGIN)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(DEFAULT_ORIGIN_SIZE)
    return path, DEFAULT_NAME


def plugin_path() -> str:
    spec = importlib.util.find_spec("nbd_plugin")
    if spec is None or spec.origin is None:
        raise SnapError(errno.ENOENT, "nbd_plugin.py is not installed with snapengine")
    return spec.origin


def nbdkit_command(args: argparse.Namespace, origins: list[tuple[str, str]],
                   run_dir: RunDir) -> list[str]:
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise SnapError(errno.ENOENT, "nbdkit is not installed (apt-get install nbdkit "
                        "nbdkit-plugin-python, or `make setup`)")
    cmd = [nbdkit, "-U", run_dir.nbd_socket, "-P", run_dir.nbdkit_pid,
           "--threads", str(NBDKIT_THREADS)]
    cmd += ["-f", "python", plugin_path(), f"run_dir={run_dir.path}",
            f"origins={json.dumps(origins)}", f"max_minors={args.max_minors}",
            f"cache_default={args.cache_default}",
            f"fallocate_percent={args.fallocate_percent}",
            f"state_dir={args.state_dir}", f"log={log_path(args.state_dir)}"]
    if args.tcp:
        cmd.append(f"tcp={args.tcp}")
    if args.verbose:
        cmd.append("verbose=1")
    if args.durable:
        cmd.append("durable=1")
    return cmd


def plugin_environment() -> dict[str, str]:
    """Let nbdkit's embedded /usr/bin/python3 import snapengine and the venv's packages."""
    env = dict(os.environ)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    env["SNAPENGINE_SITE"] = os.pathsep.join(site.getsitepackages())
    env.setdefault("MALLOC_ARENA_MAX", "2")  # 16 threads' malloc arenas otherwise cost ~40 MiB
    return env


def check_options(args: argparse.Namespace) -> None:
    check_settings(args.max_minors, args.cache_default, args.fallocate_percent)
    if args.tcp:
        try:
            parse_hostport(args.tcp)
        except ValueError as e:
            raise SnapError(errno.EINVAL, str(e))


def wait_ready(run_dir: RunDir, pid: int, log: str) -> None:
    ctl = run_dir.ctl_socket
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise SnapError(errno.EIO, f"the daemon exited with status {status >> 8}; "
                            f"see {log}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(ctl)
            return
        except OSError:
            time.sleep(0.1)
        finally:
            s.close()
    raise SnapError(errno.ETIMEDOUT, f"the daemon did not open {ctl} within {START_TIMEOUT:.0f} s")


class Stop(Exception):
    """SIGTERM or SIGINT reached the supervisor."""


def _stop(signum: int, frame) -> None:
    raise Stop(signal.Signals(signum).name)


def supervise(cmd: list[str], env: dict[str, str], run_dir: RunDir) -> int:
    """Run nbdkit and stop it cleanly on a signal; return the exit status.

    nbdkit alone waits for every client to disconnect before it exits on SIGTERM, so an
    attached filesystem would keep it up for ever. Instead, the engine is told to stop
    tracking (every COW file closed clean, later writes refused with ESHUTDOWN); then
    nbdkit is asked to exit, and killed after a grace period: nothing is left to lose.
    """
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # logrotate's HUP: the log reopens itself
    cmd = cmd + [f"supervisor={os.getpid()}"]  # nbdkit exits when this process is gone
    try:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    except Stop:
        return 0
    try:
        with open(run_dir.supervisor_pid, "w") as f:
            f.write(f"{os.getpid()}\n")
        status = proc.wait()
        return status if status >= 0 else 128 - status  # killed: 128 + signal
    except Stop as e:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        print(f"snapengine: {e}: shutting down", file=sys.stderr)
        return shutdown(proc, run_dir)
    finally:
        for path in (run_dir.supervisor_pid, run_dir.nbdkit_pid):  # nbdkit's, if killed
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        for sock in (run_dir.nbd_socket, run_dir.ctl_socket):  # nbdkit's, if killed
            try:
                remove_stale_socket(sock)
            except SnapError:
                pass  # another daemon took over the run directory


def shutdown(proc: subprocess.Popen, run_dir: RunDir) -> int:
    clean = True
    try:
        request(run_dir.ctl_socket, "shutdown")
    except SnapError as e:  # nbdkit may be gone already (it got the signal too)
        clean = proc.poll() == 0
        if not clean:
            print(f"snapengine: clean shutdown request failed: {e}", file=sys.stderr)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(SHUTDOWN_GRACE)
    except subprocess.TimeoutExpired:  # clients still connected: they can only read now
        proc.kill()
        proc.wait()
        try:  # nbdkit could not remove it: no stale view of the minors
            os.unlink(run_dir.info)
        except FileNotFoundError:
            pass
    return 0 if clean else 1


def serve(args: argparse.Namespace) -> int:
    check_options(args)
    run_dir = RunDir(os.path.abspath(args.run_dir))
    args.state_dir = os.path.abspath(args.state_dir)
    os.makedirs(run_dir.path, mode=0o755, exist_ok=True)
    os.makedirs(args.state_dir, mode=0o700, exist_ok=True)
    origins = [parse_origin(spec) for spec in args.origin] or [default_origin()]
    check_origin_names(origins)
    check_origins_free(origins, log_path(args.state_dir))
    for sock in (run_dir.ctl_socket, run_dir.nbd_socket):
        remove_stale_socket(sock)
    cmd = nbdkit_command(args, origins, run_dir)
    env = plugin_environment()
    print(f"snapengine {__version__}: serving {', '.join(n for _, n in origins)} "
          f"on {run_dir.nbd_socket}", file=sys.stderr)
    if args.daemon:
        return daemonize(cmd, env, run_dir, log_path(args.state_dir))
    print(quick_start(run_dir, origins[0][1]), file=sys.stderr)
    return supervise(cmd, env, run_dir)


def daemonize(cmd: list[str], env: dict[str, str], run_dir: RunDir, log: str) -> int:
    """Fork the supervisor into the background; return once the daemon answers."""
    pid = os.fork()
    if pid == 0:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os._exit(supervise(cmd, env, run_dir))
    wait_ready(run_dir, pid, log)
    print(f"snapengine: daemon ready, pid {pid} (log {log})", file=sys.stderr)
    return 0


def quick_start(run_dir: RunDir, name: str) -> str:
    uri = run_dir.nbd_uri(name)
    return f"""\
Attach the origin as a block device (no nbd kernel module needed):
  mkdir -p /mnt/se && nbdfuse /mnt/se/disk '{uri}' &
  losetup -f --show /mnt/se/disk          # prints /dev/loopN: mkfs, mount, use it
Take a first snapshot and read it:
  .venv/bin/elioctl --run-dir {run_dir.path} setup-snapshot {name} /var/tmp/cow1 0
  nbdcopy '{run_dir.nbd_uri(f"{EXPORT_PREFIX}0")}' /var/tmp/backup.img
Stop with Ctrl-C (clean shutdown)."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        build_parser().print_help(sys.stderr)
        return errno.EINVAL
    try:
        return serve(args)
    except SnapError as e:
        print(f"snapengine: serve: {e}", file=sys.stderr)
        return e.errno or errno.EIO


if __name__ == "__main__":
    sys.exit(main())
