"""Running as a service: READY=1 to systemd, nbd.sock's mode, the TCP connection limit,
``make install`` and the units it installs."""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import nbd
import pytest

from snapengine.client import request
from snapengine.ready import nbd_answers
from snapengine.rundir import RunDir

from tests.harness.daemon import Daemon, daemon
from tests.harness.files import sparse_file
from tests.harness.nbdclient import connect, shutdown_quietly
from tests.harness.process import BIN, require, run, stop_process
from tests.harness.sockets import free_tcp_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRANGER = 65534
pytestmark = pytest.mark.e2e


def notify_socket(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(60)
    return s


def test_ready_only_once_both_sockets_answer(tmp_path):
    """Under a test's own NOTIFY_SOCKET: the first message is READY=1, and at that
    moment (no retry) the control socket replies and the NBD socket serves the origin;
    SIGTERM then sends STOPPING=1 and the daemon exits 0."""
    require("nbdkit")
    run_dir = RunDir(str(tmp_path / "run"))
    origin = sparse_file(str(tmp_path / "disk0.img"), 64 << 20)
    listener = notify_socket(str(tmp_path / "notify"))
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    proc = subprocess.Popen([os.path.join(BIN, "snapengine"), "serve", "--run-dir",
                             run_dir.path, "--state-dir", str(tmp_path / "state"),
                             "--origin", f"{origin}=disk0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        message = listener.recv(4096).decode()
        assert message.splitlines()[0] == "READY=1", message
        assert f"MAINPID={proc.pid}" in message.splitlines()  # the unit's main process
        assert request(run_dir.ctl_socket, "info")["devices"] == []
        h = connect(run_dir.nbd_uri("disk0"))
        assert h.get_size() == 64 << 20
        shutdown_quietly(h)
        proc.send_signal(signal.SIGTERM)
        assert listener.recv(4096).decode() == "STOPPING=1"
        assert proc.wait(60) == 0
    finally:
        stop_process(proc)
        listener.close()


def test_no_ready_when_the_daemon_cannot_start(tmp_path):
    """An origin that cannot be opened: no READY=1, and a non-zero exit."""
    held = sparse_file(str(tmp_path / "held.img"), 16 << 20)
    with daemon(str(tmp_path / "first"), [(held, "held")]):
        listener = notify_socket(str(tmp_path / "notify"))
        listener.settimeout(0.5)
        env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
        r = subprocess.run([os.path.join(BIN, "snapengine"), "serve", "--run-dir",
                            str(tmp_path / "run"), "--origin", f"{held}=held"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == errno.EBUSY, r
        with pytest.raises(TimeoutError):
            listener.recv(4096)
        listener.close()


@pytest.fixture
def open_dir():
    """A directory other users may search (tmp_path is 0700): only a socket's own mode
    can keep a stranger out of a socket in it."""
    top = tempfile.mkdtemp(prefix="snapengine-svc-", dir="/tmp")
    os.chmod(top, 0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def umask_daemon(top: str, umask: int, extra: list[str] = ()) -> Iterator[Daemon]:
    """A daemon started under ``umask`` (inherited by snapengine serve and nbdkit)."""
    origin = sparse_file(os.path.join(top, "disk0.img"), 16 << 20)
    old = os.umask(umask)
    try:
        ctx = daemon(os.path.join(top, "run"), [(origin, "disk0")], list(extra))
        d = ctx.__enter__()
    finally:
        os.umask(old)
    with contextlib.ExitStack() as stack:
        stack.push(ctx)
        yield d


def stranger_connects(path: str, groups: list[int]) -> bool:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another uid")
    code = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n")
    r = subprocess.run([sys.executable, "-c", code, path], user=STRANGER, group=STRANGER,
                       extra_groups=groups, capture_output=True, timeout=60, check=False)
    assert r.returncode in (0, 13), r
    return r.returncode == 0


def test_nbd_socket_is_0600_whatever_the_umask(open_dir):
    with umask_daemon(open_dir, 0) as d:
        st = os.stat(d.nbd_socket)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert not stranger_connects(d.nbd_socket, [])
        os.chmod(d.nbd_socket, 0o666)  # the control: the mode alone kept it out
        assert stranger_connects(d.nbd_socket, [])


def test_socket_group_gives_0660_to_that_group(open_dir):
    group = grp.getgrnam("disk")  # a group every Debian has
    with umask_daemon(open_dir, 0o022, ["--socket-group", "disk"]) as d:
        st = os.stat(d.nbd_socket)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid
        assert stranger_connects(d.nbd_socket, [group.gr_gid])
        assert not stranger_connects(d.nbd_socket, [])
        assert stat.S_IMODE(os.stat(d.ctl).st_mode) == 0o600  # control stays root's


def test_unknown_socket_group(tmp_path):
    r = run([os.path.join(BIN, "snapengine"), "serve", "--run-dir", str(tmp_path),
             "--socket-group", "no-such-group-here"], check=False)
    assert r.returncode == errno.EINVAL and "no-such-group-here" in r.stderr, r


def test_tcp_connection_limit(open_dir):
    """--max-connections 2: a third TCP client is closed at once (logged), and a slot
    freed by a client that leaves is served again."""
    port = free_tcp_port()
    with umask_daemon(open_dir, 0o022, ["--tcp", f"127.0.0.1:{port}",
                                        "--max-connections", "2"]) as d:
        uri = f"nbd://127.0.0.1:{port}/disk0"
        first, second = connect(uri), connect(uri)
        with pytest.raises(nbd.Error):
            connect(uri)
        assert "refused 127.0.0.1: 2 connections already" in d.log()
        shutdown_quietly(first)
        third = None
        for _ in range(50):  # the relay sees the close shortly after
            try:
                third = connect(uri)
                break
            except nbd.Error:
                time.sleep(0.1)
        assert third is not None and third.get_size() == 16 << 20
        for h in (second, third):
            shutdown_quietly(h)


def test_busy_tcp_port_fails_the_start_cleanly(tmp_path):
    """--tcp on a port another process holds: the daemon exits non-zero, its log names
    the address, and nothing is left listening or running."""
    origin = sparse_file(str(tmp_path / "disk0.img"), 16 << 20)
    run_dir = RunDir(str(tmp_path / "run"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([os.path.join(BIN, "snapengine"), "serve", "--run-dir", run_dir.path,
                            "--state-dir", run_dir.path, "--origin", f"{origin}=disk0",
                            "--tcp", f"127.0.0.1:{port}"], capture_output=True, text=True,
                           timeout=60)
    assert r.returncode != 0, r
    with open(os.path.join(run_dir.path, "daemon.log")) as f:
        log = f.read()
    assert f"cannot start: {os.strerror(errno.EADDRINUSE)}: tcp: cannot listen on " \
        f"127.0.0.1:{port}" in log, log
    assert "tracking stopped: every COW file closed cleanly" in log, log
    assert not os.path.exists(run_dir.ctl_socket) and not os.path.exists(run_dir.nbd_socket)


# -- make install ---------------------------------------------------------------------------

UNITS = ("snapengine.service", "snapengine-attach@.service")
PAGES = ("snapengine.8", "elioctl.8", "update-img.8")
TOOLS = ("snapengine", "elioctl", "update-img")


def make_install(**variables: str) -> None:
    args = [f"{k}={v}" for k, v in variables.items()]
    run(["make", "-s", "-C", ROOT, "install", *args])


def installed_files(top: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), top)
            for d, _, files in os.walk(top) for f in files}


def test_install_layout_and_verify(tmp_path):
    """Every file where it belongs under DESTDIR, none naming the checkout, and
    systemd-analyze verify silent on each unit (the man pages it checks for found in
    the same DESTDIR)."""
    dest = str(tmp_path / "dest")
    make_install(DESTDIR=dest, PREFIX="/usr")
    files = installed_files(dest)
    expected = {f"usr/bin/{t}" for t in TOOLS} | {f"usr/lib/systemd/system/{u}" for u in UNITS} \
        | {f"usr/share/man/man8/{p}" for p in PAGES} \
        | {f"usr/share/bash-completion/completions/{c}" for c in TOOLS} \
        | {"usr/lib/snapengine/nbd_plugin.py", "usr/lib/snapengine/snapengine/engine.py",
           "etc/snapengine/snapengine.toml", "usr/share/doc/snapengine/snapengine.toml.example"}
    assert expected <= files, expected - files
    assert all(f.startswith(("usr/", "etc/")) for f in files), files
    for f in files:
        with open(os.path.join(dest, f), "rb") as fh:
            assert ROOT.encode() not in fh.read(), f"{f} names the checkout {ROOT}"
    for f in (f"usr/bin/{t}" for t in TOOLS):
        assert os.stat(os.path.join(dest, f)).st_mode & 0o111
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (make setup installs systemd)")
    units = os.path.join(dest, "usr/lib/systemd/system")
    env = dict(os.environ, MANPATH=os.path.join(dest, "usr/share/man"))
    for unit in ("snapengine.service", "snapengine-attach@disk0.service"):
        r = subprocess.run(["systemd-analyze", "verify", f"--root={dest}", unit], cwd=units,
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (unit, r)


def test_installed_copy_runs_on_its_own(tmp_path):
    """Installed under a PREFIX (DESTDIR empty): the daemon (its nbdkit plugin too) and
    elioctl run from there with /usr/bin/python3, not from this checkout's venv."""
    prefix, etc = str(tmp_path / "prefix"), str(tmp_path / "etc")
    make_install(PREFIX=prefix, SYSCONFDIR=etc)
    with open(os.path.join(prefix, "bin/elioctl")) as f:
        assert f.readline() == "#!/usr/bin/python3\n"
    origin = sparse_file(str(tmp_path / "disk0.img"), 16 << 20)
    run_dir = RunDir(str(tmp_path / "run"))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # no venv anywhere
    try:
        r = subprocess.run([os.path.join(prefix, "bin/snapengine"), "serve", "--run-dir",
                            run_dir.path, "--state-dir", str(tmp_path / "state"),
                            "--origin", f"{origin}=disk0", "--daemon"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r
        assert nbd_answers(run_dir.nbd_socket)
        with open(run_dir.nbdkit_pid) as f:
            with open(f"/proc/{int(f.read())}/cmdline", "rb") as c:
                cmdline = c.read().decode()
        assert f"{prefix}/lib/snapengine/nbd_plugin.py" in cmdline and ROOT not in cmdline
        r = run([os.path.join(prefix, "bin/elioctl"), "--run-dir", run_dir.path,
                 "get-free-minor"], env=env)
        assert r.stdout.strip() == "0"
    finally:
        if os.path.exists(run_dir.supervisor_pid):
            with open(run_dir.supervisor_pid) as f:
                os.kill(int(f.read()), signal.SIGTERM)
        for _ in range(100):
            if not os.path.exists(run_dir.ctl_socket):
                break
            time.sleep(0.1)
