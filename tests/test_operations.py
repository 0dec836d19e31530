"""Running it on a server: what a reboot, a logrotate and a bare `make run` do.

* The registry lives in the state dir (``--state-dir``), not in the run dir (a tmpfs at
  /run): a daemon started with an empty run dir, as after a reboot, resumes every minor.
* SIGHUP does not stop the daemon; the log moved away by logrotate is reopened.
* Without ``--origin``, the embedded origin is served as ``disk0``, the name the README
  uses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal

import pytest

from snapengine import serve
from tests.harness import (
    Daemon,
    attached,
    digest,
    export_digest,
    frozen,
    mounted,
    require,
    run,
    sparse_file,
    wait_for,
)

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def test_a_reboot_loses_the_run_dir_and_every_minor_resumes(tmp_path):
    origins = [(sparse_file(str(tmp_path / f"disk{i}.img"), 64 * MiB), f"disk{i}")
               for i in range(2)]
    run_dir, state = str(tmp_path / "run"), str(tmp_path / "state")
    d = Daemon(run_dir, origins, state_dir=state)
    d.start()
    try:
        with open(origins[0][0], "r+b") as f:
            f.write(os.urandom(MiB))
        d.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow3"), "3")
        d.elioctl("setup-snapshot", "disk1", str(tmp_path / "cow4"), "4")
        d.elioctl("transition-to-incremental", "4")
        before = [d.info(3), d.info(4)]
        image = export_digest(d.uri("elastio-snap3"))
    finally:
        assert d.stop() == 0
    assert os.path.exists(os.path.join(state, "registry.json"))
    assert not os.path.exists(os.path.join(run_dir, "registry.json"))
    shutil.rmtree(run_dir)  # /run is a tmpfs: gone after a reboot
    d = Daemon(run_dir, origins, state_dir=state)
    d.start()
    try:
        after = [d.info(3), d.info(4)]  # dormant (1, 0): no client yet
        assert after == [{**before[0], "state": 1}, {**before[1], "state": 0}], after
        assert export_digest(d.uri("elastio-snap3")) == image
        with open(os.path.join(state, "daemon.log")) as f:
            assert "2 minors resumed, 0 failed" in f.read()
    finally:
        d.stop()


def test_sighup_reopens_the_log_and_does_not_stop_the_daemon(tmp_path):
    origin = sparse_file(str(tmp_path / "disk0.img"), 16 * MiB)
    state = str(tmp_path / "state")
    d = Daemon(str(tmp_path / "run"), [(origin, "disk0")], state_dir=state)
    d.start()
    try:
        log = os.path.join(state, "daemon.log")
        os.rename(log, log + ".1")  # what logrotate does, then it sends SIGHUP
        d.proc.send_signal(signal.SIGHUP)
        d.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow1"), "0")
        assert d.proc.poll() is None, "SIGHUP stopped the daemon"
        wait_for(lambda: os.path.exists(log) and "minor 0: snapshot" in open(log).read(),
                 what="the daemon to log into a new daemon.log")
        assert d.info(0)["state"] == 3
    finally:
        assert d.stop() == 0


def test_the_embedded_origin_is_served_as_disk0():
    path, name = serve.default_origin()
    assert name == "disk0" and path.endswith(serve.DEFAULT_ORIGIN)
    help_text = serve.build_parser().format_help() + "".join(
        a.format_help() for a in serve.build_parser()._subparsers._group_actions[0]
        .choices.values())
    assert f"{serve.DEFAULT_ORIGIN}=disk0" in help_text
    assert "SIGHUP does not stop it" in help_text


def test_destroy_of_a_snapshot_in_use_says_so(tmp_path):
    """elioctl destroy is allowed while elastio-snapN is open (as in elastio-snap), but it
    says on stderr and in the log that those readers now fail."""
    import nbd
    origin = sparse_file(str(tmp_path / "disk0.img"), 16 * MiB)
    state = str(tmp_path / "state")
    d = Daemon(str(tmp_path / "run"), [(origin, "disk0")], state_dir=state)
    d.start()
    try:
        d.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow1"), "0")
        reader = nbd.NBD()
        reader.connect_uri(d.uri("elastio-snap0"))
        r = d.elioctl("destroy", "0")
        assert r.returncode == 0
        assert "elastio-snap0 had 1 open connection(s)" in r.stderr, r.stderr
        with open(os.path.join(state, "daemon.log")) as f:
            assert "destroyed with 1 clients on elastio-snap0" in f.read()
        reader.shutdown()
        d.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow2"), "0")
        r = d.elioctl("destroy", "0")  # nobody reading: nothing to say
        assert r.returncode == 0 and "open connection" not in r.stderr, r.stderr
    finally:
        assert d.stop() == 0


@contextlib.contextmanager
def readonly_loop(path: str):
    """``losetup -r``: a read-only loop device on ``path``, detached on the way out."""
    dev = run(["losetup", "-r", "-f", "--show", path]).stdout.strip()
    try:
        yield dev
    finally:
        run(["losetup", "-d", dev], check=False)


def test_the_restore_procedures_of_docs_operations(tmp_path):
    """docs/operations.md, "Restoring": a file from the backup image mounted read-only,
    then the whole disk written back through the origin export with nbdcopy; the restore
    is tracked, so the next change list holds the blocks it changed back."""
    require("nbdcopy", "mkfs.ext4", "fsfreeze", "losetup")
    origin = sparse_file(str(tmp_path / "disk0.img"), 128 * MiB)
    image = str(tmp_path / "full.img")
    content = os.urandom(2 * MiB)
    d = Daemon(str(tmp_path / "run"), [(origin, "disk0")], state_dir=str(tmp_path / "state"))
    d.start()
    try:
        with attached(d.uri("disk0"), str(tmp_path / "fuse")) as dev:
            run(["mkfs.ext4", "-q", "-F", dev])
            with mounted(dev, str(tmp_path / "fs")) as fs:
                with open(os.path.join(fs, "precious"), "wb") as f:
                    f.write(content)
                with frozen(fs):
                    d.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow1"), "0")
                r = d.update_img("--full", "0", image)
                assert r.returncode == 0, r.stderr
                d.elioctl("transition-to-incremental", "0")
                with open(os.path.join(fs, "precious"), "r+b") as f:  # the accident
                    f.write(bytes(len(content)))
            with readonly_loop(image) as backup:  # a file: from the image, read-only
                with mounted(backup, str(tmp_path / "restore"), "ro,noload") as restore:
                    with open(os.path.join(restore, "precious"), "rb") as f:
                        assert f.read() == content
        # the whole disk, through the origin export: unmounted and detached first (the
        # loop device and nbdfuse cache the old blocks), then nbdcopy, then attach again
        run(["nbdcopy", image, d.uri("disk0")])
        assert digest(origin) == digest(image)
        with attached(d.uri("disk0"), str(tmp_path / "fuse")) as dev:
            with mounted(dev, str(tmp_path / "fs")) as fs:
                with open(os.path.join(fs, "precious"), "rb") as f:
                    assert f.read() == content, "the restored disk lost the file"
        d.elioctl("transition-to-snapshot", str(tmp_path / "cow2"), "0")
        listed = d.elioctl("changed-blocks", str(tmp_path / "cow1")).stdout.split()
        assert listed, "the restore was not tracked: the next incremental would miss it"
    finally:
        assert d.stop() == 0


def test_a_stop_with_a_client_attached_is_clean_and_leaves_no_socket(tmp_path):
    """SIGTERM while a client is still connected (what docs/operations.md says not to do,
    but what happens): exit 0, the log says every COW file was closed cleanly, and no
    stale socket is left for the next start to trip over."""
    import nbd
    origin = sparse_file(str(tmp_path / "disk0.img"), 16 * MiB)
    state = str(tmp_path / "state")
    d = Daemon(str(tmp_path / "run"), [(origin, "disk0")], state_dir=state)
    d.start()
    client = nbd.NBD()
    try:
        client.connect_uri(d.uri("disk0"))
        d.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow1"), "0")
        assert d.stop() == 0
    finally:
        try:
            client.shutdown()
        except nbd.Error:
            pass  # the daemon is gone: nothing to tell it
    with open(os.path.join(state, "daemon.log")) as f:
        assert "tracking stopped: every COW file closed cleanly" in f.read()
    for sock in ("ctl.sock", "nbd.sock"):
        assert not os.path.exists(os.path.join(d.run_dir, sock)), f"{sock} left behind"
