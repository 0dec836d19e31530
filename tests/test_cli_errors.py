"""elioctl's errors and its basic success paths, through the real CLI against the real daemon.

INTERFACE.md §4: a failing sub-command exits with the errno, prints exactly one line
``elioctl: <sub-command>: <strerror>: <what was wrong>`` on stderr, and changes nothing
(no COW file left behind, an existing file untouched, ``elioctl info`` as before).

One daemon with three origins (disk0, disk1, disk2) serves the whole module. The error
cases (class ``TestErrors``) share one set-up (minor 0 incremental on disk0, minor 1 a
snapshot of disk1, disk2 free), which each of them must leave exactly as it found it;
every other test sets up its own minors and fixture ``d`` destroys them afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
from types import SimpleNamespace

import pytest

from snapengine.client import request
from tests.harness import BIN, daemon, run, sparse_file, wait_for

MiB = 1 << 20  # elioctl's "MB" (-c, -f) is 2**20 bytes, as in the kernel tool
ORIGIN_SIZE = 64 * MiB
MAX_MINORS = 24  # the daemon's default --max-minors: minors 0..23
DEFAULT_CACHE = 300 * MiB  # -c default
SUB_COMMANDS = ("setup-snapshot", "reload-snapshot", "reload-incremental",
                "transition-to-incremental", "transition-to-snapshot", "destroy",
                "reconfigure", "info", "get-free-minor", "help")
FREE = "5"  # a minor the error cases never set up
NEVER = "/tmp/elioctl-test-never-created"  # a COW path in usage errors and no-daemon cases


# -- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One daemon for the module, serving disk0..disk2 (64 MiB sparse files)."""
    base = tmp_path_factory.mktemp("cli-errors")
    origins = [(sparse_file(str(base / f"disk{i}.img"), ORIGIN_SIZE), f"disk{i}")
               for i in range(3)]
    with daemon(str(base / "run"), origins) as d:
        d.paths = {name: path for path, name in origins}
        d.kept = set()  # minors a class-scoped fixture owns
        yield d


@pytest.fixture
def d(server):
    """The daemon; every minor the test set up is destroyed when it ends, pass or fail."""
    try:
        yield server
    finally:
        for dev in state_of(server)["devices"]:
            if dev["minor"] not in server.kept:
                server.elioctl("destroy", str(dev["minor"]))


@pytest.fixture(scope="class")
def state(server, tmp_path_factory):
    """Minor 0: disk0 in incremental mode (state 2). Minor 1: a snapshot of disk1 (state 3).
    disk2 is free. COW files in ``state.dir``."""
    top = tmp_path_factory.mktemp("state")
    s = SimpleNamespace(dir=top, cow0=str(top / "cow0"), cow1=str(top / "cow1"))
    server.kept = {0, 1}
    try:
        server.elioctl("setup-snapshot", "disk0", s.cow0, "0")
        server.elioctl("transition-to-incremental", "0")
        server.elioctl("setup-snapshot", "disk1", s.cow1, "1")
        states = [(dev["minor"], dev["state"]) for dev in server.info()["devices"]]
        assert states == [(0, 2), (1, 3)]
        yield s
    finally:
        server.kept = set()
        for minor in ("0", "1"):
            server.elioctl("destroy", minor, check=False)


# -- helpers ------------------------------------------------------------------------------

def elioctl(run_dir, *args: str):
    """elioctl with ``--run-dir run_dir``, where no daemon need be running."""
    return run([os.path.join(BIN, "elioctl"), "--run-dir", str(run_dir), *args], check=False)


def files(top) -> dict[str, tuple]:
    """Everything under ``top``: relative path -> (size, sha256), link target or "dir"."""
    out = {}
    for root, dirs, names in os.walk(top):
        for name in names + dirs:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, top)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                out[rel] = ("dir",)
            else:
                with open(path, "rb") as f:
                    out[rel] = (os.fstat(f.fileno()).st_size, hashlib.sha256(f.read()).hexdigest())
    return out


def state_of(d) -> dict:
    """What ``elioctl info`` prints, asked in-process over the control socket (the same
    request; it saves starting a Python per check)."""
    return request(os.path.join(d.run_dir, "ctl.sock"), "info")


def origin_stats(d) -> dict[str, tuple[int, int]]:
    return {p: (os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in d.paths.values()}


def check_error(r, err: int, command: str) -> str:
    """Exit status ``err`` and exactly one stderr line in elioctl's form; return the detail."""
    name = errno.errorcode.get(err, str(err))
    assert r.returncode == err, \
        f"exit {r.returncode}, expected {err} ({name}); stderr: {r.stderr!r}"
    assert r.stdout == ""
    assert r.stderr.endswith("\n") and r.stderr.count("\n") == 1, \
        f"not exactly one line on stderr: {r.stderr!r}"
    line = r.stderr.rstrip("\n")
    prefix = f"elioctl: {command}: {os.strerror(err)}: "
    assert line.startswith(prefix), f"{line!r} does not start with {prefix!r}"
    detail = line[len(prefix):]
    assert detail.strip(), f"no detail in {line!r}"
    return detail


def fails(d, err: int, *args, watch=()) -> str:
    """Run ``elioctl args`` expecting ``err``; check that nothing changed; return the detail.

    Nothing changed: ``elioctl info`` is identical, nothing under the ``watch``
    directories was created, removed or modified, the origins' files were not touched."""
    args = [str(a) for a in args]
    info, origins = state_of(d), origin_stats(d)
    trees = [files(w) for w in watch]
    detail = check_error(d.elioctl(*args, check=False), err, args[0])
    assert state_of(d) == info, f"'{' '.join(args)}' failed but changed elioctl info"
    assert origin_stats(d) == origins, f"'{' '.join(args)}' failed but touched an origin"
    for w, tree in zip(watch, trees):
        assert files(w) == tree, f"'{' '.join(args)}' failed but changed files in {w}"
    return detail


# -- the error table, against one shared set-up -------------------------------------------

MINOR_COMMANDS = {
    "setup-snapshot": lambda cow, m: ["setup-snapshot", "disk2", cow, m],
    "transition-to-incremental": lambda cow, m: ["transition-to-incremental", m],
    "transition-to-snapshot": lambda cow, m: ["transition-to-snapshot", cow, m],
    "destroy": lambda cow, m: ["destroy", m],
    "reconfigure": lambda cow, m: ["reconfigure", "-c", "16", m],
    "reconfigure-no-c": lambda cow, m: ["reconfigure", m],
    "info": lambda cow, m: ["info", m],
    "reload-snapshot": lambda cow, m: ["reload-snapshot", "disk2", cow, m],
    "reload-incremental": lambda cow, m: ["reload-incremental", "disk2", cow, m],
}
BAD_MINORS = {"max-minors": str(MAX_MINORS), "negative": "-1", "not-a-number": "abc",
              "huge": "1" + "0" * 30, "fraction": "1.5", "empty": ""}
NOT_SET_UP = {k: v for k, v in MINOR_COMMANDS.items()
              if k not in ("setup-snapshot", "reload-snapshot", "reload-incremental")}

# Commands that create a new COW file: setup-snapshot (disk2 as minor FREE) and
# transition-to-snapshot (minor 0, incremental). ``opts`` go before the positionals.
CREATORS = {
    "setup-snapshot": lambda cow, *opts: ["setup-snapshot", *opts, "disk2", cow, FREE],
    "transition-to-snapshot": lambda cow, *opts: ["transition-to-snapshot", *opts, cow, "0"],
}
creators = pytest.mark.parametrize("create", CREATORS.values(), ids=CREATORS.keys())

USAGE_ERRORS = {
    "destroy-no-minor": ["destroy"],
    "setup-no-minor": ["setup-snapshot", "disk2", NEVER],
    "setup-nothing": ["setup-snapshot"],
    "transition-to-snapshot-no-minor": ["transition-to-snapshot", NEVER],
    "transition-to-incremental-no-minor": ["transition-to-incremental"],
    "reconfigure-c-without-value": ["reconfigure", "0", "-c"],
    "info-extra-argument": ["info", "0", "1"],
    "destroy-unknown-option": ["destroy", "--bogus", "0"],
}


@pytest.mark.usefixtures("state")
class TestErrors:
    @pytest.mark.parametrize("minor", BAD_MINORS.values(), ids=BAD_MINORS.keys())
    @pytest.mark.parametrize("command", MINOR_COMMANDS.values(), ids=MINOR_COMMANDS.keys())
    def test_minor_out_of_range_or_not_a_number(self, d, tmp_path, command, minor):
        """EINVAL, and never taken for another minor (24 is not 0, -1 is not 23)."""
        detail = fails(d, errno.EINVAL, *command(tmp_path / "cow", minor), watch=[tmp_path])
        assert "minor" in detail

    @pytest.mark.parametrize("minor", ["2", str(MAX_MINORS - 1)], ids=["2", "highest"])
    @pytest.mark.parametrize("command", NOT_SET_UP.values(), ids=NOT_SET_UP.keys())
    def test_minor_not_set_up(self, d, tmp_path, command, minor):
        fails(d, errno.ENOENT, *command(tmp_path / "cow", minor), watch=[tmp_path])

    @pytest.mark.parametrize("minor", ["0", "1"], ids=["incremental", "snapshot"])
    def test_minor_already_in_use(self, d, tmp_path, minor):
        detail = fails(d, errno.EBUSY, "setup-snapshot", "disk2", tmp_path / "cow", minor,
                       watch=[tmp_path])
        assert minor in detail

    @pytest.mark.parametrize("spec", ["name", "path", "symlink"])
    @pytest.mark.parametrize("origin", ["disk0", "disk1"], ids=["incremental", "snapshot"])
    def test_origin_already_tracked_by_another_minor(self, d, tmp_path, origin, spec):
        device = {"name": origin, "path": d.paths[origin], "symlink": tmp_path / "link"}[spec]
        if spec == "symlink":
            os.symlink(d.paths[origin], device)
        fails(d, errno.EBUSY, "setup-snapshot", device, tmp_path / "cow", FREE, watch=[tmp_path])

    def test_block_device_is_a_directory(self, d, tmp_path):
        (tmp_path / "dir").mkdir()
        fails(d, errno.ENOTBLK, "setup-snapshot", tmp_path / "dir", tmp_path / "cow", FREE,
              watch=[tmp_path])

    @pytest.mark.parametrize("kind", ["unknown-name", "unserved-file", "missing-path"])
    def test_block_device_not_served(self, d, tmp_path, kind):
        device = {"unknown-name": "disk9", "unserved-file": tmp_path / "other.img",
                  "missing-path": tmp_path / "absent.img"}[kind]
        if kind == "unserved-file":
            sparse_file(str(device), MiB)
        fails(d, errno.ENODEV, "setup-snapshot", device, tmp_path / "cow", FREE, watch=[tmp_path])

    @creators
    def test_cow_file_is_a_directory(self, d, tmp_path, create):
        (tmp_path / "dir").mkdir()
        fails(d, errno.EISDIR, *create(tmp_path / "dir"), watch=[tmp_path])

    @creators
    @pytest.mark.parametrize("kind", ["regular-file", "empty-file", "dangling-symlink",
                                      "cow-of-minor-0", "cow-of-minor-1"])
    def test_cow_file_exists_and_is_left_alone(self, d, state, tmp_path, create, kind):
        """Never overwrite a changed-block list, nor anything else."""
        cow = {"cow-of-minor-0": state.cow0, "cow-of-minor-1": state.cow1}.get(
            kind, str(tmp_path / "existing"))
        if kind == "regular-file":
            with open(cow, "wb") as f:
                f.write(b"a changed-block list from last night\n" * 100)
        elif kind == "empty-file":
            open(cow, "wb").close()
        elif kind == "dangling-symlink":
            os.symlink(tmp_path / "nowhere", cow)
        mtime = os.lstat(cow).st_mtime_ns
        fails(d, errno.EEXIST, *create(cow), watch=[tmp_path, state.dir])
        assert os.lstat(cow).st_mtime_ns == mtime

    @creators
    @pytest.mark.parametrize("depth", ["parent", "grandparent"])
    def test_cow_parent_directory_missing(self, d, tmp_path, create, depth):
        cow = tmp_path / "missing" / "cow" if depth == "parent" else tmp_path / "a" / "b" / "cow"
        fails(d, errno.ENOENT, *create(cow), watch=[tmp_path])

    @creators
    @pytest.mark.parametrize("kind", ["disk0", "disk2", "symlink-to-disk1"])
    def test_cow_file_is_an_origin_backing_file(self, d, state, tmp_path, create, kind):
        """EINVAL, not EEXIST although the file exists; no origin touched (``fails``)."""
        cow = d.paths[kind] if kind in d.paths else tmp_path / "link"
        if kind == "symlink-to-disk1":
            os.symlink(d.paths["disk1"], cow)
        fails(d, errno.EINVAL, *create(cow), watch=[tmp_path, state.dir])

    @pytest.mark.parametrize("mode", ["snapshot", "incremental"])
    @pytest.mark.parametrize("kind", ["disk2", "disk0", "symlink-to-disk1", "hardlink-to-disk2"])
    def test_reload_cow_file_is_an_origin_backing_file(self, d, state, tmp_path, mode, kind):
        """EINVAL: a later destroy must never unlink a served disk's image."""
        cow = d.paths[kind] if kind in d.paths else tmp_path / "link"
        if kind == "symlink-to-disk1":
            os.symlink(d.paths["disk1"], cow)
        elif kind == "hardlink-to-disk2":
            os.link(d.paths["disk2"], cow)
        fails(d, errno.EINVAL, f"reload-{mode}", "disk2", cow, FREE, watch=[tmp_path, state.dir])

    @pytest.mark.parametrize("mode", ["snapshot", "incremental"])
    @pytest.mark.parametrize("kind", ["cow-of-minor-0", "cow-of-minor-1", "symlink", "hardlink"])
    def test_reload_cow_file_held_by_another_minor(self, d, state, tmp_path, mode, kind):
        """EBUSY: two minors never share one COW file (by path, or by inode)."""
        cow = {"cow-of-minor-0": state.cow0, "cow-of-minor-1": state.cow1}.get(
            kind, str(tmp_path / "link"))
        if kind == "symlink":
            os.symlink(state.cow1, cow)
        elif kind == "hardlink":
            os.link(state.cow0, cow)
        fails(d, errno.EBUSY, f"reload-{mode}", "disk2", cow, FREE, watch=[tmp_path, state.dir])

    @creators
    @pytest.mark.parametrize("value", ["-1", "-100", "0.5", "abc"])
    def test_fallocate_below_1mb(self, d, tmp_path, create, value):
        detail = fails(d, errno.EINVAL, *create(tmp_path / "cow", "-f", value), watch=[tmp_path])
        assert "-f" in detail

    @creators
    def test_fallocate_too_large_for_a_cow_header(self, d, tmp_path, create):
        """Not in the table, but a user's mistake all the same: EINVAL, not EIO."""
        fails(d, errno.EINVAL, *create(tmp_path / "cow", "-f", str(2 ** 44)), watch=[tmp_path])

    @creators
    @pytest.mark.parametrize("value", ["65", str(1 << 30)], ids=["one-over", "bytes"])
    def test_fallocate_above_the_origin_says_the_unit(self, d, tmp_path, create, value):
        """-f 1073741824 (bytes typed as MB) on a 64 MiB origin: EINVAL, not 1 PiB."""
        detail = fails(d, errno.EINVAL, *create(tmp_path / "cow", "-f", value), watch=[tmp_path])
        assert "-f is in MB, not bytes" in detail and "64 MB" in detail

    @pytest.mark.parametrize("op", ["setup-snapshot", "reconfigure"])
    def test_cache_above_the_memory_says_the_unit(self, d, state, tmp_path, op):
        big = str(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MiB + 1)
        args = (["setup-snapshot", "-c", big, "disk2", tmp_path / "cow", FREE] if op ==
                "setup-snapshot" else ["reconfigure", "-c", big, "1"])
        detail = fails(d, errno.EINVAL, *args, watch=[tmp_path, state.dir])
        assert "-c is in MB, not bytes" in detail

    def test_to_incremental_when_already_incremental(self, d, state, tmp_path):
        fails(d, errno.EINVAL, "transition-to-incremental", "0", watch=[tmp_path, state.dir])

    def test_to_snapshot_when_not_incremental(self, d, state, tmp_path):
        fails(d, errno.EINVAL, "transition-to-snapshot", tmp_path / "cow", "1",
              watch=[tmp_path, state.dir])

    @pytest.mark.parametrize("args", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
    def test_usage_error(self, d, state, tmp_path, args):
        """EINVAL and one line naming the sub-command; nothing reaches the daemon."""
        fails(d, errno.EINVAL, *args, watch=[tmp_path, state.dir])
        assert not os.path.lexists(NEVER)


def test_to_incremental_after_an_overflow_goes_on_with_the_chain(d, tmp_path):
    """-f 1 and 2 MiB of data overwritten through NBD: the snapshot fails with EFBIG (the
    write does not), its change list is kept: transition-to-incremental is allowed and
    clears the error (INTERFACE §8; before §8 it was EINVAL)."""
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    h.connect_uri(d.uri("disk0"))
    h.pwrite(os.urandom(2 * MiB), 0)  # data: a first write into holes saves nothing
    h.flush()
    d.elioctl("setup-snapshot", "-f", "1", "disk0", str(tmp_path / "cow0"), "0")
    try:
        h.pwrite(os.urandom(2 * MiB), 0)
        h.flush()
        wait_for(lambda: "error" in d.info(0), what="the snapshot of minor 0 to fail")
        info = d.info(0)
        assert info["error"] == -errno.EFBIG and info["state"] == 3 and info["tracking"]
        assert "reached its limit" in info["error_text"]  # why, not just a number
        assert info["nr_changed_blocks"] == 2 * MiB // 4096
        fails(d, errno.EINVAL, "expand-cow-file", "8", "0", watch=[tmp_path])
        d.elioctl("transition-to-incremental", "0")
        info = d.info(0)
        assert info["state"] == 2 and "error" not in info
    finally:
        h.shutdown()
    # The last client left: wait until minor 0 is dormant, so that the detach cannot
    # land on a minor set up by a later test.
    wait_for(lambda: d.info(0)["state"] == 0, what="minor 0 to go dormant")


# -- success paths ------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [("0", None), ("1", MiB), ("16", 16 * MiB)],
                         ids=["zero-means-default", "one", "sixteen"])
@pytest.mark.parametrize("via", ["setup-snapshot", "transition-to-snapshot"])
def test_fallocate_accepted(d, tmp_path, via, value, expected):
    d.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow0"), "0")
    default = d.info(0)["fallocate"]  # no -f: the default (the origins are alike)
    cow = str(tmp_path / "cow")
    if via == "setup-snapshot":
        d.elioctl("setup-snapshot", "-f", value, "disk1", cow, "1")
        dev = d.info(1)
    else:
        d.elioctl("transition-to-incremental", "0")
        d.elioctl("transition-to-snapshot", "-f", value, cow, "0")
        dev = d.info(0)
    assert dev["state"] == 3 and "error" not in dev
    assert dev["cow_file"] == cow and os.path.isfile(cow)
    assert dev["fallocate"] == (default if expected is None else expected)


def test_backup_cycle(d, tmp_path):
    cow1, cow2 = str(tmp_path / "cow1"), str(tmp_path / "cow2")
    r = d.elioctl("setup-snapshot", "disk0", cow1, "4")
    assert (r.stdout, r.stderr) == ("", "")
    first = d.info(4)
    assert first["state"] == 3 and "error" not in first
    assert first["minor"] == 4 and first["cow_file"] == cow1
    assert first["block_device"] == d.paths["disk0"]
    assert first["max_cache"] == DEFAULT_CACHE and first["seq_id"] == 1
    assert re.fullmatch(r"[0-9a-f]{32}", first["uuid"])
    assert os.path.isfile(cow1)
    assert d.info()["devices"] == [first]

    d.elioctl("transition-to-incremental", "4")
    inc = d.info(4)
    assert inc["state"] == 2
    assert (inc["uuid"], inc["seq_id"], inc["cow_file"]) == (first["uuid"], 1, cow1)

    d.elioctl("transition-to-snapshot", cow2, "4")
    second = d.info(4)
    assert second["state"] == 3 and "error" not in second
    assert second["seq_id"] == first["seq_id"] + 1 and second["uuid"] == first["uuid"]
    assert second["cow_file"] == cow2
    assert os.path.isfile(cow1) and os.path.isfile(cow2)  # the old list of changes stays

    d.elioctl("destroy", "4")
    assert not os.path.exists(cow2)
    assert os.path.isfile(cow1)  # destroy unlinks the current COW file only
    assert d.info()["devices"] == []
    check_error(d.elioctl("info", "4", check=False), errno.ENOENT, "info")


@pytest.mark.parametrize("mode", ["snapshot", "incremental"])
def test_destroy(d, tmp_path, mode):
    cow = str(tmp_path / "cow")
    d.elioctl("setup-snapshot", "disk1", cow, "7")
    if mode == "incremental":
        d.elioctl("transition-to-incremental", "7")
    r = d.elioctl("destroy", "7")
    assert (r.stdout, r.stderr) == ("", "")
    assert not os.path.exists(cow)
    assert d.info()["devices"] == []
    d.elioctl("setup-snapshot", "disk1", cow, "7")  # the origin and the minor are free again


@pytest.mark.parametrize("mode", ["snapshot", "incremental"])
def test_reconfigure(d, tmp_path, mode):
    d.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow"), "0")
    if mode == "incremental":
        d.elioctl("transition-to-incremental", "0")
    before = d.info(0)
    d.elioctl("reconfigure", "-c", "16", "0")
    after = d.info(0)
    assert after["max_cache"] == 16 * MiB
    assert {**after, "max_cache": before["max_cache"],  # and the disk space, which a
            "cow_size_current": before["cow_size_current"]} == before  # resize may write


def test_get_free_minor(d, tmp_path):
    def free() -> str:
        r = d.elioctl("get-free-minor")
        assert r.stderr == ""
        return r.stdout

    assert free() == "0\n"
    d.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow0"), "0")
    assert free() == "1\n"
    d.elioctl("setup-snapshot", "disk1", str(tmp_path / "cow1"), "1")
    assert free() == "2\n"
    d.elioctl("destroy", "0")
    assert free() == "0\n"  # the lowest free minor, not the one after the highest


# -- no daemon ------------------------------------------------------------------------------

NO_DAEMON = {
    "info": ["info"],
    "info-minor": ["info", "0"],
    "get-free-minor": ["get-free-minor"],
    "destroy": ["destroy", "0"],
    "setup-snapshot": ["setup-snapshot", "disk0", NEVER, "0"],
}


@pytest.mark.parametrize("args", NO_DAEMON.values(), ids=NO_DAEMON.keys())
def test_daemon_not_running(tmp_path, args):
    """The socket is missing: ENOENT, naming the socket and how to start the daemon."""
    detail = check_error(elioctl(tmp_path, *args), errno.ENOENT, args[0])
    assert str(tmp_path / "ctl.sock") in detail
    assert "snapengine serve" in detail
    assert os.listdir(tmp_path) == [] and not os.path.lexists(NEVER)


def test_daemon_socket_stale(tmp_path):
    """A socket file with nobody listening (a killed daemon): ECONNREFUSED."""
    path = str(tmp_path / "ctl.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    detail = check_error(elioctl(tmp_path, "info"), errno.ECONNREFUSED, "info")
    assert path in detail and "snapengine serve" in detail


# -- help and usage -------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["help"], ["--help"], ["-h"]], ids=["help", "--help", "-h"])
def test_help(tmp_path, args):
    r = elioctl(tmp_path, *args)  # needs no daemon
    assert r.returncode == 0 and r.stderr == ""
    for command in SUB_COMMANDS:
        assert re.search(rf"^\s+{re.escape(command)}(\s|$)", r.stdout, re.M), \
            f"{command} not listed by elioctl {' '.join(args)}"


def test_unknown_sub_command(tmp_path):
    r = elioctl(tmp_path, "frobnicate", "0")
    assert r.returncode == errno.EINVAL and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("elioctl: ")
    assert os.strerror(errno.EINVAL) in r.stderr and "frobnicate" in r.stderr


def test_no_sub_command(tmp_path):
    """As the original elioctl: the usage on stderr, EINVAL."""
    r = elioctl(tmp_path)
    assert r.returncode == errno.EINVAL and r.stdout == ""
    assert "usage" in r.stderr.lower()


# -- files it cannot read, a busy origin, --help: every CLI's one line ---------------------

import signal  # noqa: E402  (this section's own, so that it is appended whole)
import subprocess  # noqa: E402

from snapengine.rundir import RUN_DIR_ENV, RunDir, log_path  # noqa: E402
from tests.harness import stop_process  # noqa: E402
from tests.harness.sockets import START_TIMEOUT  # noqa: E402

NOBODY = 65534  # the unprivileged user the permission cases run as, when run by root


def unprivileged() -> dict:
    """subprocess.run's keywords to run a command as ``nobody`` when we are root (a mode
    000 file is readable to root); nothing otherwise: the mode already keeps us out."""
    if os.geteuid() != 0:
        return {}

    def drop() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    return {"preexec_fn": drop}


def one_line(r, err: int, prefix: str) -> str:
    """Exit status ``err``, nothing on stdout, exactly one stderr line ``prefix<strerror>:
    ...`` and no traceback; return the line."""
    assert r.returncode == err, f"exit {r.returncode}, expected {err}; stderr: {r.stderr!r}"
    assert r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.endswith("\n") and r.stderr.count("\n") == 1, \
        f"not exactly one line on stderr: {r.stderr!r}"
    assert r.stderr.startswith(f"{prefix}{os.strerror(err)}: "), r.stderr
    return r.stderr.rstrip("\n")


@pytest.fixture
def unreadable_cow(tmp_path):
    """A COW file nobody but root may read (mode 000), and an image beside it."""
    cow, image = tmp_path / "cow", tmp_path / "full.img"
    cow.write_bytes(b"\0" * 4096)
    cow.chmod(0o000)
    image.write_bytes(b"x" * 4096)
    return SimpleNamespace(cow=str(cow), image=str(image), run=str(tmp_path / "run"))


def test_update_img_cow_file_unreadable(unreadable_cow):
    f = unreadable_cow
    r = run([os.path.join(BIN, "update-img"), "--run-dir", f.run, "4", f.cow, f.image],
            check=False, **unprivileged())
    assert f.cow in one_line(r, errno.EACCES, "update-img: ")
    with open(f.image, "rb") as image:
        assert image.read() == b"x" * 4096


def test_changed_blocks_cow_file_unreadable(unreadable_cow):
    r = run([os.path.join(BIN, "elioctl"), "changed-blocks", unreadable_cow.cow],
            check=False, **unprivileged())
    assert unreadable_cow.cow in one_line(r, errno.EACCES, "elioctl: changed-blocks: ")


def stop_background(run_dir: str) -> None:
    """Stop a ``serve --daemon`` that should not have started: SIGTERM its supervisor."""
    try:
        with open(RunDir(run_dir).supervisor_pid) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what=f"daemon {pid} to exit")


@pytest.mark.parametrize("mode", [[], ["--daemon"]], ids=["foreground", "daemon"])
def test_serve_origin_locked(tmp_path, mode):
    """A second daemon on an origin the first one holds (flock): EBUSY naming the origin,
    one line on stderr and in the second one's log; the first one serves on."""
    origin = sparse_file(str(tmp_path / "disk0.img"), ORIGIN_SIZE)
    run2, state2 = str(tmp_path / "run2"), str(tmp_path / "state2")
    with daemon(str(tmp_path / "run1"), [(origin, "disk0")]) as first:
        cmd = [os.path.join(BIN, "snapengine"), "serve", "--run-dir", run2,
               "--state-dir", state2, "--origin", f"{origin}=disk0", *mode]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True)
        try:
            out, err = proc.communicate(timeout=START_TIMEOUT)
        finally:
            stop_process(proc)
            stop_background(run2)
        r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        line = one_line(r, errno.EBUSY, "snapengine: serve: ")
        assert f"origin {origin} is locked by another process" in line
        with open(log_path(state2)) as f:
            log = f.read()
        assert log.count("\n") <= 1 and "locked by another process" in log, log
        assert first.proc.poll() is None and "devices" in first.request("info")


def test_update_img_help_names_the_run_dir_variable():
    r = run([os.path.join(BIN, "update-img"), "--help"])
    assert r.stderr == ""
    assert re.search(rf"--run-dir.*\(env\s+{RUN_DIR_ENV}\b", r.stdout, re.S), r.stdout
