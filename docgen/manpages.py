"""Section 8 man pages of snapengine, elioctl and update-img, generated from their parsers.

``python -m docgen.manpages OUTDIR`` writes OUTDIR/snapengine.8, OUTDIR/elioctl.8 and
OUTDIR/update-img.8. argparse-manpage walks each parser (every action group, every
sub-command with its options and positionals); ``RoffFormatter`` escapes all it prints
(roff.py) and lays it out. The sections no parser holds (EXIT STATUS, FILES, EXAMPLES
...) are written here, with file names, errno numbers and state names taken from the
code, never copied.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from dataclasses import dataclass, field
from typing import Callable

from build_manpages.manpage import Manpage, _ManpageFormatter

from snapengine import __version__
from snapengine.arguments import EXPORT_PREFIX
from snapengine.attach import ATTACHED_DIR
from snapengine.minor import ACTIVE, DORMANT, INCREMENTAL, SNAPSHOT, STATES, UNVERIFIED
from snapengine.rundir import (CTL_SOCKET, DAEMON_LOG, DEFAULT_RUN_DIR, DEFAULT_STATE_DIR,
                               INFO_FILE, NBD_SOCKET, NBDKIT_PID, REGISTRY_FILE, RUN_DIR_ENV,
                               STATE_DIR_ENV, SUPERVISOR_PID, RunDir)

from . import command_line, subcommands, write_files
from .roff import (bold, errno_name, escape, is_raw, italic, para, section, synopsis, tagged,
                   text_block, verbatim)

SECTION = 8  # system administration commands
MANUAL = "System Administration"
NO_HYPHENATION = ".nh"  # option names, paths and URIs are never split at a hyphen
LEFT_ADJUST = ".ad l"  # ragged right: long paths would stretch the spaces of a justified line


# -- the generated part ---------------------------------------------------------------
def _has_subcommands(group: argparse._ArgumentGroup) -> bool:
    return any(isinstance(a, argparse._SubParsersAction) for a in group._group_actions)


class RoffFormatter(_ManpageFormatter):
    """argparse-manpage's walk of a parser, each piece escaped: an action is a tagged
    paragraph (its invocation, then its help as --help expands it); the sub-commands
    are listed under COMMANDS, then each gets a sub-section with its synopsis,
    description and actions."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return bold(self._metavar_formatter(action, action.dest)(1)[0])
        if action.nargs == 0:
            return ", ".join(bold(option) for option in action.option_strings)
        value = italic(self._format_args(action, action.dest.upper()))
        return ", ".join(f"{bold(option)} {value}" for option in action.option_strings)

    def _format_action(self, action: argparse.Action) -> list[str]:
        if isinstance(action, argparse._HelpAction):
            return []
        lines = [".TP", self._format_action_invocation(action)]
        if action.help:
            lines.append(escape(" ".join(self._expand_help(action).split())))
        return lines

    def _format_ag_subcommands(self, actions: list[argparse.Action], prog: str) -> str:
        lines = [".SH COMMANDS"]
        for action in actions:
            lines += [".TP", bold(f"{prog} {action.dest}"), escape(action.help or "")]
        return "\n".join(lines)

    def _format_parser(self, parser: argparse.ArgumentParser, name: str) -> list[str]:
        lines = [f'.SS "{escape(name)}"', *synopsis(parser)]
        if parser.description:
            lines += [".PP", text_block(parser.description, is_raw(parser))]
        groups = sorted(parser._action_groups, key=_has_subcommands)
        return lines + [self._format_action_group(group, name) for group in groups]


class Page(Manpage):
    """One program's page: NAME, SYNOPSIS, DESCRIPTION, OPTIONS and COMMANDS from its
    parser, NOTES from its epilog, then the hand-written ``sections`` (roff)."""

    def __init__(self, parser: argparse.ArgumentParser, summary: str,
                 sections: list[str]) -> None:
        super().__init__(parser)
        self.mf = RoffFormatter(self.prog, self.formatter)
        self.summary = summary
        self.sections = sections

    def __str__(self) -> str:
        p = self.parser
        title = f'.TH {escape(p.prog.upper())} {SECTION} "" "snapengine {__version__}" "{MANUAL}"'
        lines = [title, NO_HYPHENATION, LEFT_ADJUST, ".SH NAME",
                 f"{escape(p.prog)} \\- {escape(self.summary)}", ".SH SYNOPSIS", *synopsis(p)]
        if p.description:
            lines += [".SH DESCRIPTION", text_block(p.description, is_raw(p))]
        options = [self.mf.format_action_group(group, p.prog)
                   for group in p._action_groups if not _has_subcommands(group)]
        if any(options):
            lines += [".SH OPTIONS", *options]
        lines += [self.mf.format_action_group(group, p.prog)
                  for group in p._action_groups if _has_subcommands(group)]
        if p.epilog:
            lines += [".SH NOTES", text_block(p.epilog, is_raw(p))]
        text = "\n".join(lines + self.sections)
        return "\n".join(line for line in text.split("\n") if line) + "\n"  # no blank lines


# -- hand-written sections ------------------------------------------------------------
def exit_status(codes: list[tuple[int, str]]) -> str:
    return section("EXIT STATUS", para("0 on success; otherwise the errno of the failure, "
                                       "after one line on stderr saying what was wrong. "
                                       "The common ones:"),
                   tagged([("0", "success")] + [(errno_name(n), text) for n, text in codes]))


def examples(items: list[tuple[str, list[str]]]) -> str:
    return section("EXAMPLES", *(para(caption) + "\n" + verbatim(lines)
                                 for caption, lines in items))


def files() -> str:
    run, state = DEFAULT_RUN_DIR, DEFAULT_STATE_DIR
    return section("FILES", tagged([
        (f"{run}/", f"the run directory (--run-dir, ${RUN_DIR_ENV}); a tmpfs, emptied at "
         "boot"),
        (f"{run}/{CTL_SOCKET}", "the control socket elioctl and update-img talk to "
         "(docs/control-protocol.md), mode 0600"),
        (f"{run}/{NBD_SOCKET}", "the NBD server: every origin, and each snapshot as "
         f"export {EXPORT_PREFIX}N; mode 0600, or 0660 for --socket-group"),
        (f"{run}/{ATTACHED_DIR}/", "snapengine attach's record of each attached export "
         "(NAME.json), nbdfuse's mount point (NAME/) and its log (NAME.log)"),
        (f"{run}/{INFO_FILE}", "the JSON document elioctl info prints, kept up to date by "
         "the daemon (at most a second stale)"),
        (f"{run}/{SUPERVISOR_PID}", "the pid of snapengine serve: send it SIGTERM to stop "
         "the daemon cleanly"),
        (f"{run}/{NBDKIT_PID}", "the pid of the nbdkit process serving the origins"),
        (f"{state}/", f"the state directory (--state-dir, ${STATE_DIR_ENV}): it survives "
         "a reboot"),
        (f"{state}/{REGISTRY_FILE}", "the minors, their COW files and identities: a "
         "restarted daemon resumes every minor from it"),
        (f"{state}/{DAEMON_LOG}", "the daemon's log, reopened by itself once logrotate has "
         "moved it"),
        ("/etc/snapengine/snapengine.toml", "the config file snapengine.service passes to "
         "snapengine serve --config"),
        ("snapengine.service, snapengine-attach@.service", "the systemd units (in "
         "lib/systemd/system under the install prefix): the daemon (Type=notify), and the "
         "attach of one export at boot"),
    ]))


def environment() -> str:
    return section("ENVIRONMENT", tagged([
        (RUN_DIR_ENV, f"the run directory when --run-dir is not given (default "
         f"{DEFAULT_RUN_DIR})"),
        (STATE_DIR_ENV, f"the state directory of snapengine serve when --state-dir is not "
         f"given (default {DEFAULT_STATE_DIR})"),
    ]))


def see_also(prog: str) -> str:
    pages = [(p, SECTION) for p in SPECS if p != prog] + EXTERNAL_PAGES
    refs = [f".BR {escape(name)} ({number})," for name, number in pages]
    return section("SEE ALSO", *refs[:-1], refs[-1].rstrip(","))


EXTERNAL_PAGES = [("nbdkit", 1), ("nbdkit-python-plugin", 3), ("nbd-client", 8),
                  ("nbdfuse", 1), ("nbdcopy", 1), ("nbdinfo", 1), ("losetup", 8),
                  ("fsfreeze", 8), ("qemu-nbd", 8), ("qemu-img", 1), ("systemd.service", 5)]


# -- STATES (elioctl) -----------------------------------------------------------------
PHASE_TEXT = {
    DORMANT: "the origin has no NBD client; the COW file is closed clean",
    ACTIVE: "the origin is in use; every write is tracked as it happens",
    UNVERIFIED: "brought back by reload-snapshot or reload-incremental; the COW file is "
                "checked when the origin's first client connects",
}
MODE_TEXT = {
    SNAPSHOT: "old data is saved in the COW file and the snapshot is served read-only as "
              f"export {EXPORT_PREFIX}N",
    INCREMENTAL: "only the list of changed blocks is kept",
}


def states(_parser: argparse.ArgumentParser) -> list[str]:
    rows = sorted((number, phase, mode) for (phase, mode), number in STATES.items())
    return [section("STATES", para("elioctl info shows each minor's state as a number "
                                   "(the numbers of elastio-snap):"),
                    tagged((f"{n} {phase} {mode}", f"{PHASE_TEXT[phase]}; {MODE_TEXT[mode]}.")
                           for n, phase, mode in rows),
                    para("Failure is not a state: a failed minor keeps its state, and info "
                         "adds error (the errno, negated) and error_text."))]


# -- CONFIGURATION FILE (snapengine) --------------------------------------------------
CONFIG_OPTION = "--config"
ORIGIN_DEST = "origin"  # --origin PATH[=NAME] becomes [[origins]] with path and name
ORIGINS_TABLE = "origins"
TOML_TYPES = {int: "integer", float: "float"}  # argparse type -> TOML type; else string


def config_actions(serve: argparse.ArgumentParser) -> list[argparse.Action]:
    """serve's options that a configuration file may set: all but help, version, --config."""
    return [a for a in serve._actions if any(o.startswith("--") for o in a.option_strings)
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))
            and CONFIG_OPTION not in a.option_strings]


def long_option(action: argparse.Action) -> str:
    return next(o for o in action.option_strings if o.startswith("--"))


def config_key(action: argparse.Action) -> str:
    """``--max-minors`` -> ``max_minors``."""
    return long_option(action).removeprefix("--").replace("-", "_")


def toml_type(action: argparse.Action) -> str:
    return "boolean" if action.nargs == 0 else TOML_TYPES.get(action.type, "string")


def toml_line(action: argparse.Action) -> str:
    """The key at its default, or commented out with its metavar when it has none."""
    key, value = config_key(action), action.default
    if value is None:
        return f"# {key} = {json.dumps(action.metavar or key.upper())}"
    if action.type is float:
        value = float(value)  # 10.0, not the integer 10
    return f"{key} = {json.dumps(value)}"  # JSON and TOML agree on these scalars


def configuration(parser: argparse.ArgumentParser) -> list[str]:
    serve = subcommands(parser)["serve"]
    actions = [a for a in config_actions(serve) if a.dest != ORIGIN_DEST]
    origin = next(a for a in serve._actions if a.dest == ORIGIN_DEST)
    first = actions[0]
    keys = [(f"{config_key(a)} ({toml_type(a)})", serve._get_formatter()._expand_help(a))
            for a in actions]
    keys.append((f"[[{ORIGINS_TABLE}]] (array of tables: path, name)",
                 serve._get_formatter()._expand_help(origin)))
    return [section(
        "CONFIGURATION FILE",
        para(f"snapengine serve {CONFIG_OPTION} FILE reads its options from FILE, in TOML. "
             "Every long option of serve is a key: the option's name without the leading "
             f"dashes, its dashes turned into underscores ({long_option(first)} is "
             f"{config_key(first)}); a flag is a boolean. {long_option(origin)} "
             f"becomes an array of tables, [[{ORIGINS_TABLE}]], each with the keys path "
             "and name (without a name, the path is the export's name). "
             f"{CONFIG_OPTION} itself is not a key. An option given on the "
             "command line wins over the file. A bad file (not TOML, an unknown key, a "
             f"value of the wrong type) exits {errno_name(errno.EINVAL)}, the message "
             "naming the key and the line."), para("The keys:"), tagged(keys),
        para("A file holding every key at its default, and one origin:"),
        verbatim([toml_line(a) for a in actions]
                 + ["", f"[[{ORIGINS_TABLE}]]", 'path = "/srv/disk0.img"', 'name = "disk0"']))]


# -- the pages ------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    summary: str  # the NAME line
    exits: list[tuple[int, str]]  # errno, when
    examples: list[tuple[str, list[str]]]  # caption, command lines
    extra: Callable[[argparse.ArgumentParser], list[str]] = field(default=lambda _: [])


SNAP = f"SNAP='{RunDir(DEFAULT_RUN_DIR).nbd_uri(f'{EXPORT_PREFIX}4')}'"  # fits 80 columns
USAGE_ERROR = "a usage error: an unknown option or sub-command, a missing or bad argument"
SPECS: dict[str, Spec] = {
    "snapengine": Spec(
        "serve block devices over NBD with live snapshots and changed-block tracking",
        [(errno.EINVAL, f"{USAGE_ERROR}, a bad option value or configuration file"),
         (errno.ENOENT, "an origin does not exist, or nbdkit is not installed"),
         (errno.EBUSY, "an origin is held by another daemon or program"),
         (errno.ENOTBLK, "an origin is neither a regular file nor a block device"),
         (errno.EACCES, "an origin is not readable and writable"),
         (errno.ETIMEDOUT, "--daemon: the daemon did not open its sockets in time"),
         (errno.EIO, f"the daemon exited while starting (its log, {DAEMON_LOG}, says why)")],
        [("Serve a file as export disk0 in the foreground (Ctrl-C stops it), or a disk in "
          "the background:", ["snapengine serve --origin /srv/disk0.img=disk0",
                              "snapengine serve --origin /dev/sdb --daemon"]),
         ("Serve what a config file says, command-line options winning:",
          ["snapengine serve --config /etc/snapengine/snapengine.toml --verbose"]),
         ("Attach the origin as a block device (nbd-client where the nbd module exists, "
          "else nbdfuse and a loop device), use it, and detach it:",
          ["snapengine attach disk0          # prints /dev/loopN or /dev/nbdN",
           "mount /dev/loopN /srv/data && ... && umount /srv/data",
           "snapengine detach disk0"]),
         ("The same by hand, with or without the nbd kernel module:",
          [f"nbd-client -unix {DEFAULT_RUN_DIR}/{NBD_SOCKET} -N disk0 /dev/nbd0",
           f"URI='{RunDir(DEFAULT_RUN_DIR).nbd_uri('disk0')}'",
           'nbdfuse /mnt/disk0/disk "$URI" &',
           "losetup -f --show /mnt/disk0/disk"]),
         ("As a service, with a file system on disk0 mounted at boot (an /etc/fstab line):",
          ["systemctl enable --now snapengine.service",
           "UUID=...  /srv/data  ext4  defaults,x-systemd.requires="
           "snapengine-attach@disk0.service  0 2"]),
         ("Stop the daemon cleanly (unmount and detach first):",
          [f"kill -TERM \"$(cat {DEFAULT_RUN_DIR}/{SUPERVISOR_PID})\"",
           "systemctl stop snapengine.service    # under systemd"])],
        configuration),
    "elioctl": Spec(
        "control snapengine's snapshots and change tracking",
        [(errno.EINVAL, f"{USAGE_ERROR}; a minor out of range; an operation the minor's "
          "state refuses"),
         (errno.ENOENT, "no daemon socket in the run directory; the minor is not set up; "
          "the COW file's directory does not exist; no minor is free"),
         (errno.EBUSY, "the minor, the origin or the COW file is already in use"),
         (errno.EEXIST, "a new COW file already exists (it is never overwritten)"),
         (errno.ENODEV, "the block device is not an origin the daemon serves"),
         (errno.ENOSPC, "expand-cow-file: the COW file's file system has too little room"),
         (errno.EACCES, "neither root nor the daemon's user"),
         (errno.EAGAIN, "the daemon has too many connections or watchers"),
         (errno.ENOBUFS, "watch fell too far behind and was dropped"),
         (errno.ESHUTDOWN, "the daemon is shutting down"),
         (errno.EIO, f"a bug in the daemon; the traceback is in {DAEMON_LOG}")],
        [("A snapshot as minor 4, copied in full:",
          ["elioctl setup-snapshot disk0 /var/backup/cow1 4", "elioctl info 4",
           SNAP, 'nbdcopy "$SNAP" /backup/full.img']),
         ("Every night after that, copy only what changed:",
          ["elioctl transition-to-incremental 4", "elioctl transition-to-snapshot "
           "/var/backup/cow2 4", "update-img 4 /var/backup/cow1 /backup/full.img",
           "elioctl transition-to-incremental 4"]),
         ("Room for the snapshot (+256 MB at the limit while 1 GB stays free, or +512 MB "
          "now), and its events:", ["elioctl reconfigure-auto-expand -r 1024 256 4",
                                    "elioctl expand-cow-file 512 4", "elioctl watch 4"]),
         ("One snapshot point for two disks, their file system frozen around it:",
          ["elioctl setup-snapshot --freeze /srv/pg \\", "    disk0 /var/backup/a1 4 "
           "disk1 /var/backup/b1 5"]),
         ("The changed extents of a closed COW file, for another tool:",
          ["elioctl changed-blocks --json /var/backup/cow1"])],
        states),
    "update-img": Spec(
        "bring a backup image up to a snapshot, copying only the changed blocks",
        [(errno.EINVAL, f"{USAGE_ERROR}; a check failed (a COW file dirty, failed or "
          "of another chain, a gap in the chain, sizes or the image's stamp differ): the "
          "image is untouched"),
         (errno.EAGAIN, "a transition changed the snapshot while update-img opened its "
          "connections: the image is untouched, run it again"),
         (errno.ENOENT, "the snapshot or a file does not exist"),
         (errno.EACCES, "a file cannot be read or written"),
         (errno.EROFS, "the NBD target is read-only (checked before anything is "
          "written)"),
         (errno.EIO, "a block could not be copied, or the image not synced or stamped, or "
          "the NBD target not flushed (the snapshot may have failed); the first failed "
          "extent is named")],
        [("Copy the blocks changed since the image's snapshot (cow1's) from snapshot 4:",
          ["update-img 4 /var/backup/cow1 /backup/full.img"]),
         ("An image two snapshots behind (after an overflow, or a night skipped): both COW "
          "files, oldest first:",
          ["update-img 4 /var/backup/cow1 /var/backup/cow2 /backup/full.img"]),
         ("A full backup, holes kept, stamped for the chain; or stamp an nbdcopy'd image:",
          ["update-img --full 4 /backup/disk0.img", SNAP, 'nbdcopy "$SNAP" /backup/full.img',
           "update-img --stamp 4 /backup/full.img"]),
         ("Into an NBD target: tonight's qcow2 overlay of last night's image, served by "
          "qemu-nbd (a backup host's nbd://HOST:PORT/ works alike):",
          ["qemu-img create -f qcow2 -b night1.qcow2 -F qcow2 night2.qcow2",
           "qemu-nbd -t -k /run/q.sock -f qcow2 night2.qcow2 &",
           "update-img 4 /var/backup/cow1 'nbd+unix:///?socket=/run/q.sock'"])]),
}


def render(prog: str, parser: argparse.ArgumentParser) -> str:
    spec = SPECS[prog]
    sections = [*spec.extra(parser), exit_status(spec.exits), environment(), files(),
                examples(spec.examples), see_also(prog)]
    return str(Page(parser, spec.summary, sections))


def write_pages(outdir: str) -> list[str]:
    """Write every program's page into ``outdir``; return their paths."""
    return write_files(outdir, lambda prog: f"{prog}.{SECTION}", render)


def main(argv: list[str] | None = None) -> int:
    return command_line("manpages", "the man pages", write_pages, argv)


if __name__ == "__main__":
    sys.exit(main())
