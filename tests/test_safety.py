"""Ways to lose data or the daemon, tried from outside through elioctl, libnbd and signals.

Each test is one finding of the safety review: it failed before the fix.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import pytest

from tests.harness import (
    BIN,
    Daemon,
    attached,
    connect,
    daemon,
    digest,
    mounted,
    run,
    socket_answers,
    sparse_file,
    wait_for,
)

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.e2e

MiB = 1 << 20
SIZE = 16 * MiB


def touch_origin(d, name: str, data: bytes | None = None) -> None:
    """One client connects (the minor comes online), optionally writes, and leaves."""
    h = connect(d.uri(name))
    try:
        if data is not None:
            h.pwrite(data, 0)
            h.flush()
    finally:
        h.shutdown()


def origins(tmp_path, *names: str) -> list[tuple[str, str]]:
    return [(sparse_file(str(tmp_path / f"{n}.img"), SIZE), n) for n in names]


def serve(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return run([os.path.join(BIN, "snapengine"), "serve", "--run-dir", str(tmp_path / "run"),
                "--state-dir", str(tmp_path / "run"), *args], check=False, timeout=60)


def one_line_error(r: subprocess.CompletedProcess, err: int, *words: str) -> str:
    assert r.returncode == err, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("mode", ["snapshot", "incremental"])
def test_destroy_after_failed_verification_keeps_the_file(tmp_path, mode):
    """reload-* of a file that is not a COW file: verification fails at the first client;
    destroy then leaves the file where it is (and says so)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("the administrator's notes\n" * 100)
    before = digest(notes)
    with daemon(str(tmp_path / "run"), origins(tmp_path, "d")) as d:
        d.elioctl(f"reload-{mode}", "d", str(notes), "1")
        touch_origin(d, "d")
        assert d.info(1)["error"] == -errno.EINVAL
        r = d.elioctl("destroy", "1")
        assert "left in place" in r.stderr
        assert digest(notes) == before
        touch_origin(d, "d", b"x" * 4096)  # the origin is served as before


def test_reload_of_the_origins_own_image_is_refused(tmp_path):
    """The finding: destroy used to unlink the image being served."""
    specs = origins(tmp_path, "d")
    image = specs[0][0]
    with daemon(str(tmp_path / "run"), specs) as d:
        r = d.elioctl("reload-incremental", "d", image, "0", check=False)
        assert r.returncode == errno.EINVAL, r.stderr
        assert "backing file" in r.stderr
        assert d.info()["devices"] == []
    assert os.path.exists(image)
    with daemon(str(tmp_path / "run"), specs):  # and the next start works
        pass


def test_a_cow_file_is_never_shared(tmp_path):
    """Two same-size origins; minor 0's dormant COW file offered to minor 1 (by path and
    through a hard link): EBUSY; minor 0's snapshot and COW file untouched, across a restart."""
    specs = origins(tmp_path, "d", "e")
    old_d = os.urandom(SIZE)
    with open(specs[0][0], "wb") as f:
        f.write(old_d)
    cow = str(tmp_path / "c1")
    with daemon(str(tmp_path / "run"), specs) as d:
        d.elioctl("setup-snapshot", "d", cow, "0")
        touch_origin(d, "d", os.urandom(16 * 4096))
        wait_for(lambda: d.info(0)["state"] == 1, what="minor 0 dormant")
        os.link(cow, tmp_path / "c1-link")
        for path in (cow, str(tmp_path / "c1-link")):
            r = d.elioctl("reload-snapshot", "e", path, "1", check=False)
            assert r.returncode == errno.EBUSY, r.stderr
            assert "minor 0" in r.stderr
        touch_origin(d, "e", os.urandom(16 * 4096))
    with daemon(str(tmp_path / "run"), specs) as d:
        assert "error" not in d.info(0) and [m["minor"] for m in d.info()["devices"]] == [0]
        h = connect(d.uri("elastio-snap0"))
        try:
            assert h.pread(SIZE, 0) == old_d
        finally:
            h.shutdown()


@pytest.mark.parametrize("name", ["elastio-snap0", "elastio-snap", "elastio-snap12x"])
def test_an_origin_cannot_take_the_snapshot_prefix(tmp_path, name):
    image = sparse_file(str(tmp_path / "disk.img"), SIZE)
    r = serve(tmp_path, "--origin", f"{image}={name}")
    one_line_error(r, errno.EINVAL, name, "elastio-snap")


@pytest.mark.parametrize("how", ["twice", "symlink", "hardlink"])
def test_one_file_cannot_be_served_twice(tmp_path, how):
    image = sparse_file(str(tmp_path / "disk.img"), SIZE)
    other = str(tmp_path / "other")
    if how == "symlink":
        os.symlink(image, other)
    elif how == "hardlink":
        os.link(image, other)
    second = image if how == "twice" else other
    r = serve(tmp_path, "--origin", f"{image}=a", "--origin", f"{second}=b")
    one_line_error(r, errno.EINVAL, "same file")


def test_kill9_of_the_supervisor_takes_nbdkit_with_it(tmp_path):
    """With a client attached, kill -9 of `snapengine serve`: nbdkit must go too (its COW
    files closed cleanly), so a new daemon serves the run directory within seconds."""
    specs = origins(tmp_path, "d")
    d = Daemon(str(tmp_path / "run"), specs).start()
    try:
        d.elioctl("setup-snapshot", "d", str(tmp_path / "cow"), "0")
        nbdkit_pid = d.pid
        h = connect(d.uri("d"))  # stays attached throughout
        h.pwrite(b"a" * 4096, 0)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()

        def gone() -> bool:
            try:
                os.kill(nbdkit_pid, 0)
                return False
            except ProcessLookupError:
                return True
        wait_for(gone, timeout=15, what="nbdkit to exit after its supervisor")
        start = time.monotonic()
        with daemon(d.run_dir, specs) as d2:
            assert time.monotonic() - start < 15
            info = d2.info(0)
            assert info["state"] == 1 and "error" not in info, info
            touch_origin(d2, "d", b"b" * 4096)
        del h
    finally:
        d.stop()


def test_a_snapshot_failed_at_resume_answers_eio(tmp_path):
    """The origin changed size while the daemon was down: the minor fails at resume; its
    snapshot export still opens (listed) and every read is EIO."""
    specs = origins(tmp_path, "d")
    with daemon(str(tmp_path / "run"), specs) as d:
        d.elioctl("setup-snapshot", "d", str(tmp_path / "cow"), "0")
    with open(specs[0][0], "r+b") as f:
        f.truncate(2 * SIZE)
    with daemon(str(tmp_path / "run"), specs) as d:
        assert d.info(0)["error"] == -errno.EINVAL
        h = connect(d.uri("elastio-snap0"))
        try:
            with pytest.raises(nbd.Error) as e:
                h.pread(4096, 0)
            assert e.value.errnum == errno.EIO
        finally:
            h.shutdown()
        assert socket_answers(d.nbd_socket)


def test_a_cow_file_on_the_origins_own_file_system_is_refused(tmp_path):
    """ext4 mounted from the origin through nbdfuse + loop: a COW path on it is refused
    by every command that takes one (EINVAL, saying where COW files must go), at once;
    the same commands work with a COW path elsewhere."""
    specs = origins(tmp_path, "disk0")
    with daemon(str(tmp_path / "run"), specs) as d:
        with attached(d.uri("disk0"), str(tmp_path / "fuse")) as dev:
            run(["mkfs.ext4", "-q", "-F", dev])
            with mounted(dev, str(tmp_path / "fs")) as fs:
                inside = os.path.join(fs, "sub")
                os.mkdir(inside)
                for args in (["setup-snapshot", "disk0", os.path.join(fs, "cow"), "4"],
                             ["reload-snapshot", "disk0", os.path.join(inside, "cow"), "4"],
                             ["reload-incremental", "disk0", os.path.join(fs, "cow"), "4"]):
                    r = run([os.path.join(BIN, "elioctl"), "--run-dir", d.run_dir, *args],
                            check=False, timeout=60)
                    assert r.returncode == errno.EINVAL, r.stderr
                    assert "carried by origin disk0" in r.stderr and "no origin" in r.stderr
                d.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow1"), "4")
                d.elioctl("transition-to-incremental", "4")
                r = d.elioctl("transition-to-snapshot", os.path.join(fs, "cow2"), "4",
                              check=False)
                assert r.returncode == errno.EINVAL, r.stderr
                assert d.info(4)["state"] == 2 and "error" not in d.info(4)
                assert sorted(os.listdir(fs)) == ["lost+found", "sub"]
                with open(os.path.join(fs, "data"), "wb") as f:  # the disk works as usual
                    f.write(os.urandom(MiB))
                run(["sync"], timeout=60)
                d.elioctl("destroy", "4")
