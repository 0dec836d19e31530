"""``snapengine serve``: start the daemon, one nbdkit process running nbd_plugin.py."""

from __future__ import annotations

import argparse
import errno
import grp
import importlib.util
import json
import logging
import os
import shutil
import site
import stat
import sys
from typing import NoReturn

from . import __version__, attach, config, supervisor
from .arguments import (DEFAULT_CACHE_MB, DEFAULT_FALLOCATE_PERCENT, DEFAULT_MAX_MINORS,
                        EXPORT_PREFIX, check_origin_names, check_settings)
from .control import remove_stale_socket
from .daemon import LOG_FORMAT
from .errors import SnapError
from .origin import open_exclusive
from .relay import DEFAULT_MAX_CONNECTIONS, parse_hostport
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
NBDKIT_THREADS = 16  # requests in flight per connection (--threads)
MAX_THREADS = 256


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"snapengine: {message} (see 'snapengine serve --help')", file=sys.stderr)
        sys.exit(errno.EINVAL)


def build_parser() -> Parser:
    parser = Parser(prog="snapengine", description="snapengine: live point-in-time "
                    "snapshots and changed-block tracking of block devices, over NBD.")
    parser.add_argument("--version", action="version", version=f"snapengine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=Parser)
    p = sub.add_parser("serve", help="run the daemon", description=SERVE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _place_options(p)
    _daemon_options(p)
    p.set_defaults(config_origins=[], loaded_config=None)
    attach.add_commands(sub)
    return parser


def _place_options(p: argparse.ArgumentParser) -> None:
    """Where things are: directories, origins, listeners, the config file."""
    p.add_argument("--run-dir", default=default_run_dir(), metavar="DIR",
                   help=f"holds {CTL_SOCKET}, {NBD_SOCKET}, {INFO_FILE} and the pid files "
                   f"(env {RUN_DIR_ENV}, default %(default)s)")
    p.add_argument("--state-dir", default=default_state_dir(), metavar="DIR",
                   help=f"holds {REGISTRY_FILE} (the minors a restart resumes, after a reboot "
                   f"too) and {DAEMON_LOG} (env {STATE_DIR_ENV}, default %(default)s)")
    p.add_argument("--origin", action="append", default=[], metavar="PATH[=NAME]",
                   help="a file or block device to serve read-write, as export NAME "
                   "(default: PATH as given); repeatable, and replaces the config file's "
                   "[[origins]]. Without any, a source checkout serves its "
                   f"{DEFAULT_ORIGIN}={DEFAULT_NAME}")
    p.add_argument("--tcp", metavar="HOST:PORT",
                   help="also listen on TCP (unauthenticated: anyone who reaches it can "
                   "read and write the origins)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (per minor and "
                   "per origin; unauthenticated, read-only; see docs/metrics.md)")
    p.add_argument("--config", metavar="FILE",
                   help="read these options from a TOML file (keys: the long options with _ "
                   "for -, and [[origins]] tables of path and name; see snapengine(8)); "
                   "options on the command line win")


def _daemon_options(p: argparse.ArgumentParser) -> None:
    """How the daemon behaves: limits, defaults, durability, access."""
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
    p.add_argument("--socket-group", metavar="GROUP",
                   help=f"{NBD_SOCKET} gets mode 0660 and this group, whose members may then "
                   "attach (read and write) the origins (default: mode 0600, the daemon's "
                   "user only)")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help="TCP connections (--tcp) served at once; more are closed at once "
                   "(default %(default)s)")
    p.add_argument("--threads", type=int, default=NBDKIT_THREADS, metavar="N",
                   help="nbdkit worker threads per NBD connection, the requests one client "
                   "has served at once (default %(default)s; docs/performance.md measures it)")
    p.add_argument("--daemon", action="store_true", help="detach once ready")
    p.add_argument("--verbose", action="store_true", help="debug logging")


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


def project_root() -> str | None:
    """The source checkout holding this package; None for an installed copy."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return root if os.path.exists(os.path.join(root, "pyproject.toml")) else None


def parse_origin(spec: str) -> tuple[str, str]:
    """PATH[=NAME] → (absolute path, export name)."""
    path, name = spec, spec
    if not os.path.exists(spec) and "=" in spec:
        path, _, name = spec.rpartition("=")
    if not path or not name:
        raise SnapError(errno.EINVAL, f"--origin {spec!r} is not PATH[=NAME]")
    return check_origin(path, name)


def check_origin(path: str, name: str) -> tuple[str, str]:
    """(absolute path, name) of an origin that can be served: a readable and writable
    regular file or block device."""
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
    """A checkout's demo origin (``make run``); an installed daemon needs its origins."""
    root = project_root()
    if root is None:
        raise SnapError(errno.EINVAL, "no origin: give --origin PATH[=NAME] or [[origins]] "
                        "in the --config file")
    path = os.path.join(root, DEFAULT_ORIGIN)
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
           "--threads", str(args.threads)]
    cmd += ["-f", "python", plugin_path(), f"run_dir={run_dir.path}",
            f"origins={json.dumps(origins)}", f"max_minors={args.max_minors}",
            f"cache_default={args.cache_default}",
            f"fallocate_percent={args.fallocate_percent}",
            f"state_dir={args.state_dir}", f"log={log_path(args.state_dir)}"]
    if args.tcp:
        cmd += [f"tcp={args.tcp}", f"max_connections={args.max_connections}"]
    if args.metrics:
        cmd.append(f"metrics={args.metrics}")
    if args.socket_group is not None:
        cmd.append(f"socket_group={group_id(args.socket_group)}")
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
    if args.metrics:
        try:
            parse_hostport(args.metrics)
        except ValueError:
            raise SnapError(errno.EINVAL, f"--metrics {args.metrics!r} is not HOST:PORT")
    if args.max_connections < 1:
        raise SnapError(errno.EINVAL, f"--max-connections {args.max_connections} is below 1")
    if not 1 <= args.threads <= MAX_THREADS:
        raise SnapError(errno.EINVAL, f"--threads {args.threads} is not in 1..{MAX_THREADS}")
    if args.socket_group is not None:
        group_id(args.socket_group)


def group_id(group: str) -> int:
    """--socket-group's gid: a group name or number known to this machine."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdecimal():
            return int(group)
        raise SnapError(errno.EINVAL, f"--socket-group {group!r}: no such group")


def origins_of(args: argparse.Namespace) -> list[tuple[str, str]]:
    """--origin, else the config file's [[origins]], else the default origin."""
    if args.origin:
        return [parse_origin(spec) for spec in args.origin]
    cfg: config.Config | None = args.loaded_config
    out = []
    for i, (path, name) in enumerate(args.config_origins):
        try:
            out.append(check_origin(path, name))
        except SnapError as e:
            assert cfg is not None
            key = f"{config.ORIGINS}[{i}].path"
            raise config.ConfigError(cfg.path, cfg.lines.get(key), key, e.detail)
    return out or [default_origin()]


def parse_serve(argv: list[str] | None) -> argparse.Namespace:
    """The command line; with ``serve --config FILE``, the file's settings below it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve" and args.config:
        serve_parser = subcommand(parser, "serve")
        loaded = config.load(args.config, serve_parser)
        serve_parser.set_defaults(**loaded.values, loaded_config=loaded)
        args = parser.parse_args(argv)
    return args


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def serve(args: argparse.Namespace) -> int:
    try:
        check_options(args)
    except SnapError as e:
        if args.loaded_config is None:
            raise
        raise args.loaded_config.blame(e, args, config.option_keys(
            subcommand(build_parser(), "serve")))
    run_dir = RunDir(os.path.abspath(args.run_dir))
    args.state_dir = os.path.abspath(args.state_dir)
    origins = origins_of(args)
    check_origin_names(origins)
    os.makedirs(run_dir.path, mode=0o755, exist_ok=True)
    os.makedirs(args.state_dir, mode=0o700, exist_ok=True)
    check_origins_free(origins, log_path(args.state_dir))
    for sock in (run_dir.ctl_socket, run_dir.nbd_socket):
        remove_stale_socket(sock)
    cmd = nbdkit_command(args, origins, run_dir)
    env = plugin_environment()
    print(f"snapengine {__version__}: serving {', '.join(n for _, n in origins)} "
          f"on {run_dir.nbd_socket}", file=sys.stderr)
    if args.daemon:
        return supervisor.daemonize(cmd, env, run_dir, log_path(args.state_dir))
    print(quick_start(run_dir, origins[0][1]), file=sys.stderr)
    return supervisor.supervise(cmd, env, run_dir, log_path(args.state_dir))


def quick_start(run_dir: RunDir, name: str) -> str:
    uri = run_dir.nbd_uri(name)
    return f"""\
Attach the origin as a block device (no nbd kernel module needed):
  mkdir -p /mnt/se && nbdfuse /mnt/se/disk '{uri}' &
  losetup -f --show /mnt/se/disk          # prints /dev/loopN: mkfs, mount, use it
Take a first snapshot and read it:
  {os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), "elioctl")} --run-dir {run_dir.path} setup-snapshot {name} /var/tmp/cow1 0
  nbdcopy '{run_dir.nbd_uri(f"{EXPORT_PREFIX}0")}' /var/tmp/backup.img
Stop with Ctrl-C (clean shutdown)."""


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_serve(argv)
    except SnapError as e:  # the config file
        print(f"snapengine: serve: {e}", file=sys.stderr)
        return e.errno or errno.EIO
    if args.command is None:
        build_parser().print_help(sys.stderr)
        return errno.EINVAL
    try:
        return serve(args) if args.command == "serve" else args.func(args)
    except SnapError as e:
        print(f"snapengine: {args.command}: {e}", file=sys.stderr)
        return e.errno or errno.EIO


if __name__ == "__main__":
    sys.exit(main())
