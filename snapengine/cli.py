"""elioctl: control snapengine's snapshots and change tracking, as elastio-snap's elioctl does.

Every failure ends with one line on stderr, ``elioctl: <sub-command>: <strerror>: <what
was wrong>``, and the errno as exit status.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import textwrap
from typing import Any, Callable, NoReturn

from . import __version__, changes, client, watchcli
from .arguments import DEFAULT_CACHE_MB, DEFAULT_FALLOCATE_PERCENT, EXPORT_PREFIX
from .client import request
from .errors import SnapError
from .events import EVENTS
from .rundir import DEFAULT_RUN_DIR, NBD_SOCKET, RUN_DIR_ENV, RunDir, default_run_dir
from .status import format_status
from .units import BLOCK_SIZE

DESCRIPTION = f"""\
Control the snapengine daemon: point-in-time snapshots of the block devices (origins)
it serves over NBD, and tracking of the blocks changed between snapshots.

A snapshot of minor N is served read-only as the NBD export "{EXPORT_PREFIX}N" on the
daemon's socket (DIR/{NBD_SOCKET}). Sizes (-c, -f, -r, <MB>) are in MB (2^20 bytes).
Exit status is 0 on success, else the errno of the failure.
"""

EPILOG = f"""\
backup cycle:
  elioctl setup-snapshot /srv/disk0.img /var/backup/cow1 4   # state 3, export {EXPORT_PREFIX}4
  nbdcopy '{RunDir(DEFAULT_RUN_DIR).nbd_uri(f"{EXPORT_PREFIX}4")}' full.img
  elioctl transition-to-incremental 4                        # state 2: only changes kept
  elioctl transition-to-snapshot /var/backup/cow2 4          # state 3, seq_id + 1
  update-img 4 /var/backup/cow1 full.img                     # copy just what changed

room for the snapshot, and watching it:
  elioctl reconfigure-auto-expand -r 1024 256 4   # at the limit: +256 MB, keep 1 GB free
  elioctl expand-cow-file 512 4                   # +512 MB now, by hand
  elioctl watch 4                                 # one line per event, until Ctrl-C

one snapshot point for two disks, their file system frozen around it:
  elioctl setup-snapshot --freeze /srv/pg disk0 /var/backup/a1 4 disk1 /var/backup/b1 5

states: 0 dormant incremental, 1 dormant snapshot, 2 active incremental,
        3 active snapshot, 4 unverified incremental, 5 unverified snapshot
"""


class UsageError(Exception):
    def __init__(self, command: str, message: str) -> None:
        super().__init__(message)
        self.command = command


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as EINVAL, in elioctl's one-line form."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.split()[-1] if " " in self.prog else "elioctl"
        raise UsageError(command, message)


def build_parser() -> Parser:
    parser = Parser(prog="elioctl", description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=default_run_dir(), metavar="DIR",
                        help=f"the daemon's run directory (env {RUN_DIR_ENV}, "
                        "default %(default)s)")
    parser.add_argument("--version", action="version", version=f"snapengine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<sub-command>", parser_class=Parser)
    _tracking_commands(sub)
    _other_commands(sub)
    return parser


def _command(sub, name: str, func: Callable, help: str, *args: str,
             details: str = "") -> Parser:
    """A sub-command whose positional ``args`` are named from ``ARGUMENTS``; ``details``
    (already laid out) follow ``help`` in its --help."""
    if details:
        p = sub.add_parser(name, help=help, description=textwrap.fill(help, 88) + "\n\n"
                           + details, formatter_class=argparse.RawDescriptionHelpFormatter)
    else:
        p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(func=func)
    for arg in args:
        flags, kwargs = ARGUMENTS[arg]
        p.add_argument(*flags, **kwargs)
    return p


ARGUMENTS: dict[str, tuple[tuple[str, ...], dict]] = {
    "cache": (("-c",), dict(dest="cache_mb", metavar="<cache MB>",
                            help=f"index cache limit in MB (default {DEFAULT_CACHE_MB})")),
    "fallocate": (("-f",), dict(dest="fallocate_mb", metavar="<fallocate MB>",
                                help="hard limit on COW data in MB (default: "
                                f"{DEFAULT_FALLOCATE_PERCENT}%% of the origin)")),
    "freeze": (("--freeze",), dict(action="append", metavar="MNT",
                                   help="freeze the file system mounted at MNT around the "
                                   "snapshot point (repeatable)")),
    "block_device": (("block_device",), dict(metavar="<block device>",
                                             help="an origin's path or name")),
    "cow_file": (("cow_file",), dict(metavar="<cow file>", help="the minor's COW file")),
    "new_cow_file": (("cow_file",), dict(metavar="<cow file>",
                                         help="new file, outside every origin")),
    "minor": (("minor",), dict(metavar="<minor>", help="the minor number")),
    "reserved": (("-r",), dict(dest="reserved_mb", metavar="<reserved MB>",
                               help="MB that must stay free on the COW file's file system "
                               "(default 0)")),
    "size": (("size_mb",), dict(metavar="<MB>", help="how much to add to the limit, in MB")),
    "step": (("step_mb",), dict(metavar="<step MB>",
                                help="how much each raise adds, in MB; 0 turns it off")),
}


def _tracking_commands(sub) -> None:
    p = _command(sub, "setup-snapshot", setup_snapshot,
                 "take a snapshot of <block device>, saving old data to a new <cow file>",
                 "cache", "fallocate", "freeze", "block_device", "new_cow_file", "minor",
                 details=GROUP_DETAILS)
    p.add_argument("more", nargs="*", metavar="<block device> <cow file> <minor>",
                   help="more origins, all at the same snapshot point")
    for mode in ("snapshot", "incremental"):
        _command(sub, f"reload-{mode}", reload,
                 f"bring back a minor left in {mode} mode (after the registry was lost); "
                 "its COW file is checked when the origin's first client connects",
                 "cache", "block_device", "cow_file", "minor")
    _command(sub, "transition-to-incremental", transition_to_incremental,
             "drop the snapshot, keep tracking which blocks change (state 2)", "minor")
    p = _command(sub, "transition-to-snapshot", transition_to_snapshot,
                 "take the next snapshot into a new <cow file>; the old one keeps the list "
                 "of blocks changed between the two snapshots", "fallocate", "freeze",
                 "cow_file", "minor", details=GROUP_DETAILS)
    p.add_argument("more", nargs="*", metavar="<cow file> <minor>",
                   help="more minors, all at the same snapshot point")
    _command(sub, "destroy", destroy, "stop tracking, remove the snapshot, unlink the COW "
             "file (only one the daemon created or verified)", "minor")
    _command(sub, "reconfigure", reconfigure, "change the index cache limit of a minor, live",
             "cache", "minor")
    _space_commands(sub)


GROUP_DETAILS = """\
Several origins (several triples, or pairs for transition-to-snapshot) get one snapshot
point: every write to any of them lands wholly before it (in every snapshot) or wholly
after it (in none). All or nothing: if one part fails, none is set up or transitioned,
and the exit status is that part's errno, named in the message. The same minor, origin
or COW file twice: EINVAL. --freeze MNT (repeatable) freezes the file system mounted at
MNT just before the point and thaws it just after (the daemon does it, and a guard
thaws it whatever happens, within 30 s at most), so the snapshot mounts without journal
recovery. MNT not a mount point: EINVAL, nothing frozen or set up.
"""


def _space_commands(sub) -> None:
    _command(sub, "expand-cow-file", expand_cow_file, "raise a snapshot's COW data limit "
             "('fallocate' in info) by <MB>, live", "size", "minor", details=EXPAND_DETAILS)
    _command(sub, "reconfigure-auto-expand", reconfigure_auto_expand, "let the daemon raise "
             "the COW data limit by <step MB> by itself whenever it is reached",
             "reserved", "step", "minor", details=AUTO_EXPAND_DETAILS)


EXPAND_DETAILS = """\
Only in snapshot mode, active or dormant (states 1 and 3): EINVAL in incremental mode
or once the snapshot has failed. ENOSPC, and nothing changed, when the file system
holding the COW file has less than <MB> free.
"""

AUTO_EXPAND_DETAILS = """\
Whenever the COW data reaches its limit, the limit grows by <step MB>, as long as at
least <reserved MB> (-r, default 0) stay free on the COW file's file system: a raise
happens only when it has <step MB> + <reserved MB> free at that moment. Otherwise the
snapshot fails as on any overflow (error -27, its export answers EIO) and the change
list is kept: transition-to-incremental still works. <step MB> 0 turns it off (the
default). Allowed in every mode; the setting is kept across transitions and restarts.
'elioctl info' shows it as "auto_expand".
"""

WATCH_DETAILS = f"""\
Each line: TIME (ISO 8601, UTC) minor N EVENT (state S), then for
  failed     error -ERRNO, change list kept (tracking) or lost: why
  expanded   limit OLD -> NEW (auto-expand or expand-cow-file)
  space-low  FREE free on the COW file's file system, USED used of the LIMIT limit
             (free space below the auto-expand reserve, or data past 90 % of the
             limit with auto-expand off)
{textwrap.fill("Events: " + ", ".join(EVENTS) + ".", 88)}
After destroy the state is "gone". --json prints each event as one JSON object with
at least time, minor, event and state, plus error, tracking, reason (failed),
old_limit, new_limit, auto (expanded) or free, used, limit (space-low), sizes in
bytes.

<minor> need not exist yet. Events that happen while nobody watches are not kept.
Exit 0 on Ctrl-C (SIGINT) and when the daemon stops. A watcher that falls too far
behind is dropped by the daemon (it never waits for one): exit ENOBUFS.
"""


def _other_commands(sub) -> None:
    p = _command(sub, "changed-blocks", changed_blocks,
                 "list the blocks changed between a closed COW file's snapshot and the next, "
                 "as merged extents 'OFFSET LENGTH' in bytes (no daemon needed)")
    p.add_argument("--json", action="store_true", help="print JSON instead")
    p.add_argument("cow_file", metavar="<cow file>", help="a closed COW file")
    p = _command(sub, "info", info, "print the state of every minor (or one) as JSON")
    p.add_argument("minor", metavar="<minor>", nargs="?", help="only this minor")
    p = _command(sub, "status", status, "print every minor (or one) as a table, one line "
                 "each: minor, state, origin, COW file, used / limit, changed blocks, error")
    p.add_argument("minor", metavar="<minor>", nargs="?", help="only this minor")
    _command(sub, "get-free-minor", get_free_minor, "print the lowest minor not in use")
    p = _command(sub, "watch", watch, "print the daemon's events (of every minor, or of "
                 "<minor>) as they happen, one line each", details=WATCH_DETAILS)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("minor", metavar="<minor>", nargs="?",
                   help="only this minor's events (it need not exist yet)")
    _command(sub, "help", show_help, "show this help")


def _socket(args: argparse.Namespace) -> str:
    return RunDir(args.run_dir).ctl_socket


def _path(name: str) -> str:
    """Absolute, for a daemon whose cwd is not ours; a trailing slash (a directory) kept."""
    path = os.path.abspath(name)
    return path + "/" if name.endswith("/") and path != "/" else path


def _device(args: argparse.Namespace) -> dict[str, Any]:
    raw = args.block_device
    return {"block_device": raw, "block_device_path": os.path.abspath(raw)}


def _opts(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _parts(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The positional parts: one (plain values) or several (a list per field)."""
    first = [getattr(args, n) for n in names]
    if len(args.more) % len(names):
        raise SnapError(errno.EINVAL, f"each part needs {len(names)} values: "
                        f"{' '.join(f'<{n}>' for n in names)} (see 'elioctl help')")
    rows = [first] + [args.more[i:i + len(names)] for i in range(0, len(args.more), len(names))]
    columns = {n: [row[k] for row in rows] for k, n in enumerate(names)}
    if "cow_file" in columns:
        columns["cow_file"] = [_path(c) for c in columns["cow_file"]]
    if "block_device" in columns:
        columns["block_device_path"] = [os.path.abspath(b) for b in columns["block_device"]]
    out = {n: v if len(rows) > 1 else v[0] for n, v in columns.items()}
    if args.freeze:
        out["freeze"] = [os.path.abspath(m) for m in args.freeze]
    return out


def setup_snapshot(args: argparse.Namespace) -> None:
    request(_socket(args), "setup-snapshot",
            **_parts(args, ("block_device", "cow_file", "minor")),
            **_opts(args, "cache_mb", "fallocate_mb"))


def reload(args: argparse.Namespace) -> None:
    request(_socket(args), args.command, **_device(args), minor=args.minor,
            cow_file=_path(args.cow_file), **_opts(args, "cache_mb"))


def transition_to_incremental(args: argparse.Namespace) -> None:
    request(_socket(args), "transition-to-incremental", minor=args.minor)


def transition_to_snapshot(args: argparse.Namespace) -> None:
    request(_socket(args), "transition-to-snapshot", **_parts(args, ("cow_file", "minor")),
            **_opts(args, "fallocate_mb"))


def destroy(args: argparse.Namespace) -> None:
    note = request(_socket(args), "destroy", minor=args.minor)
    if note:  # the COW file was left in place: say so, it is not a failure
        print(f"elioctl: destroy: {note}", file=sys.stderr)


def reconfigure(args: argparse.Namespace) -> None:
    request(_socket(args), "reconfigure", minor=args.minor, **_opts(args, "cache_mb"))


def expand_cow_file(args: argparse.Namespace) -> None:
    request(_socket(args), "expand-cow-file", minor=args.minor, size_mb=args.size_mb)


def reconfigure_auto_expand(args: argparse.Namespace) -> None:
    request(_socket(args), "reconfigure-auto-expand", minor=args.minor, step_mb=args.step_mb,
            **_opts(args, "reserved_mb"))


def watch(args: argparse.Namespace) -> None:
    """Until Ctrl-C or the daemon stops (exit 0); SnapError (ENOBUFS) if dropped."""
    try:
        watchcli.follow(client.watch(_socket(args), args.minor), args.json)
    except KeyboardInterrupt:
        pass


def info(args: argparse.Namespace) -> None:
    print(json.dumps(request(_socket(args), "info", **_opts(args, "minor")), indent=4))


def status(args: argparse.Namespace) -> None:
    """The same ``info`` request; with <minor> its reply is that one device."""
    reply = request(_socket(args), "info", **_opts(args, "minor"))
    print(format_status([reply] if args.minor is not None else reply["devices"]))


def changed_blocks(args: argparse.Namespace) -> None:
    changed = changes.read_closed(args.cow_file)
    if not args.json:
        for offset, length in changed.byte_extents():
            print(offset, length)
        return
    h = changed.header
    print(json.dumps({"cow_file": os.path.abspath(args.cow_file), "uuid": h.uuid.hex(),
                      "seq_id": h.seq_id, "block_size": BLOCK_SIZE, "origin_size": h.origin_size,
                      "nr_changed_blocks": h.nr_changed_blocks,
                      "extents": [{"offset": o, "length": n} for o, n in changed.byte_extents()]},
                     indent=4))


def get_free_minor(args: argparse.Namespace) -> None:
    print(request(_socket(args), "get-free-minor"))


def show_help(args: argparse.Namespace) -> None:
    build_parser().print_help()


def error_line(e: OSError) -> str:
    """``<strerror>: <what>`` for any OSError: a SnapError's own detail, else the file it
    names (an open() refused by permissions, say), else its message."""
    if isinstance(e, SnapError):
        return str(e)
    strerror = e.strerror or os.strerror(e.errno or errno.EIO)
    if e.filename is not None:
        names = [os.fsdecode(n) for n in (e.filename, e.filename2) if n is not None]
        return f"{strerror}: {' -> '.join(names)}"
    detail = str(e) if e.strerror is None else ""
    return f"{strerror}: {detail}" if detail else strerror


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            raise UsageError(args.command or "elioctl",
                             f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as e:
        print(f"elioctl: {e.command}: {os.strerror(errno.EINVAL)}: {e} (see 'elioctl help')",
              file=sys.stderr)
        return errno.EINVAL
    if args.command is None:
        parser.print_help(sys.stderr)
        return errno.EINVAL
    try:
        args.func(args)
    except OSError as e:  # SnapError, or a file it cannot read (EACCES): one line
        print(f"elioctl: {args.command}: {error_line(e)}", file=sys.stderr)
        return e.errno or errno.EIO
    except KeyboardInterrupt:
        return errno.EINTR
    return 0


if __name__ == "__main__":
    sys.exit(main())
