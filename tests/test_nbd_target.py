"""update-img into NBD targets: three nights of qcow2 overlays served by qemu-nbd, the
checks made before anything is written, and a target that fails half-way."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import subprocess
import sys
from typing import Iterator

import pytest

from tests.harness.daemon import Daemon, daemon
from tests.harness.files import sparse_file
from tests.harness.nbdclient import connect, connected, read_all, shutdown_quietly
from tests.harness.process import require, run, stop_process, wait_for

pytestmark = pytest.mark.e2e
SIZE = 64 << 20
BLOCK = 4096
CLUSTER = 64 * 1024  # qcow2's default cluster
FAILING_TARGET = os.path.join(os.path.dirname(__file__), "data", "failing_target.py")


@contextlib.contextmanager
def qemu_nbd(image: str, sock: str, *options: str) -> Iterator[str]:
    """qemu-nbd serving the qcow2 ``image`` on the Unix socket ``sock`` (-t: it stays
    up between clients); its URI."""
    require("qemu-nbd")
    proc = subprocess.Popen(["qemu-nbd", "-t", "-k", sock, "-f", "qcow2", *options, image],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.path.exists(sock) or proc.poll() is not None, what="qemu-nbd")
        assert proc.poll() is None, proc.stderr.read()
        yield f"nbd+unix:///?socket={sock}"
    finally:
        stop_process(proc)


def qcow2(path: str, backing: str | None = None) -> str:
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    cmd += ["-b", backing, "-F", "qcow2"] if backing else []
    run(cmd + [path, str(SIZE)])
    return path


def top_layer(path: str) -> tuple[int, int]:
    """Bytes the top layer of a qcow2 holds as data, and as zero clusters."""
    entries = json.loads(run(["qemu-img", "map", "--output=json", path]).stdout)
    data = sum(e["length"] for e in entries if e["depth"] == 0 and e["data"])
    zeros = sum(e["length"] for e in entries
                if e["depth"] == 0 and e["present"] and e["zero"] and not e["data"])
    return data, zeros


def write_blocks(d: Daemon, rng: random.Random, count: int) -> set[int]:
    """``count`` random blocks of the origin rewritten with random data; the 64 KiB
    clusters they touch."""
    h = connect(d.uri("disk0"))
    blocks = rng.sample(range(SIZE // BLOCK), count)
    for b in blocks:
        h.pwrite(rng.randbytes(BLOCK), b * BLOCK)
    h.flush()
    shutdown_quietly(h)
    return {b * BLOCK // CLUSTER for b in blocks}


def night(d: Daemon, uri: str, cow: str | None) -> bytes:
    """One night: update-img of snapshot 0 into ``uri`` (--full without a COW file);
    what the target reads afterwards, checked equal to the snapshot."""
    args = ["0", cow, uri] if cow else ["--full", "0", uri]
    r = d.update_img(*args)
    assert r.returncode == 0, r
    assert "errors" in r.stdout and ", 0 errors" in r.stdout, r
    snapshot = read_all(d.uri("elastio-snap0"))
    assert read_all(uri) == snapshot
    return snapshot


def test_three_nights_of_qcow2_overlays(tmp_path):
    """Night 1 a full copy into a qcow2, nights 2 and 3 each into an overlay of the
    night before; each equals its snapshot, the overlays hold about the changed data
    (whole 64 KiB clusters), zeroed ranges as zero clusters, and night 1 is still night 1."""
    require("qemu-img", "qemu-nbd")
    rng = random.Random(15)
    origin = sparse_file(str(tmp_path / "disk0.img"), SIZE)
    with daemon(str(tmp_path / "run"), [(origin, "disk0")]) as d:
        with connected(d.uri("disk0")) as h:
            h.pwrite(rng.randbytes(16 << 20), 8 << 20)  # 16 MiB of data before night 1
        d.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow1"), "0")
        nights = [str(tmp_path / f"night{n}.qcow2") for n in (1, 2, 3)]
        with qemu_nbd(qcow2(nights[0]), str(tmp_path / "q1.sock")) as uri:
            snapshots = [night(d, uri, None)]
        for n in (2, 3):
            d.elioctl("transition-to-incremental", "0")
            clusters = write_blocks(d, rng, 300)
            with connected(d.uri("disk0")) as h:  # zeros over data: as write-zeroes and
                h.zero(1 << 20, (9 << 20) + n * (1 << 20))  # as literal zero bytes
                h.pwrite(bytes(1 << 20), (16 << 20) + n * (1 << 20))
            d.elioctl("transition-to-snapshot", str(tmp_path / f"cow{n}"), "0")
            qcow2(nights[n - 1], backing=nights[n - 2])
            with qemu_nbd(nights[n - 1], str(tmp_path / f"q{n}.sock")) as uri:
                snapshots.append(night(d, uri, str(tmp_path / f"cow{n - 1}")))
            data, zeros = top_layer(nights[n - 1])
            assert data <= len(clusters) * CLUSTER, (data, len(clusters))
            assert data >= 300 * BLOCK and zeros >= 2 << 20, (data, zeros)
        for n, path in enumerate(nights):  # every night restorable, unchanged
            with qemu_nbd(path, str(tmp_path / f"r{n}.sock"), "-r") as uri:
                assert read_all(uri) == snapshots[n]


def test_wrong_size_and_read_only_targets_untouched(tmp_path):
    require("qemu-img", "qemu-nbd")
    origin = sparse_file(str(tmp_path / "disk0.img"), SIZE)
    with daemon(str(tmp_path / "run"), [(origin, "disk0")]) as d:
        with connected(d.uri("disk0")) as h:
            h.pwrite(b"\x5a" * (1 << 20), 0)
        d.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow1"), "0")
        small = str(tmp_path / "small.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", small, str(SIZE // 2)])
        with qemu_nbd(small, str(tmp_path / "s.sock")) as uri:
            r = d.update_img("--full", "0", uri)
            assert r.returncode == errno.EINVAL, r
            assert f"sizes differ: target {uri} {SIZE // 2}, snapshot {SIZE} bytes" in r.stderr
        ro = qcow2(str(tmp_path / "ro.qcow2"))
        with qemu_nbd(ro, str(tmp_path / "ro.sock"), "-r") as uri:
            r = d.update_img("--full", "0", uri)
            assert r.returncode == errno.EROFS, r
            assert f"target {uri} is read-only" in r.stderr, r.stderr
        for path in (small, ro):
            assert top_layer(path) == (0, 0), path  # nothing was written
        r = d.update_img("--stamp", "0", "nbd+unix:///?socket=/nonexistent")
        assert r.returncode == errno.EINVAL and "nowhere to keep a stamp" in r.stderr, r


def test_a_target_failing_half_way(tmp_path):
    """A target whose writes past 32 MiB fail with EIO: exit EIO, the summary counts the
    errors, and the first failed extent is named."""
    require("nbdkit")
    origin = sparse_file(str(tmp_path / "disk0.img"), SIZE)
    sock = str(tmp_path / "t.sock")
    target = subprocess.Popen(["nbdkit", "-U", sock, "-f", "python", FAILING_TARGET,
                               f"size={SIZE}", f"fail_from={32 << 20}"],
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.path.exists(sock) or target.poll() is not None, what="nbdkit")
        with daemon(str(tmp_path / "run"), [(origin, "disk0")]) as d:
            with connected(d.uri("disk0")) as h:
                h.pwrite(random.Random(1).randbytes(SIZE), 0)
            d.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow1"), "0")
            r = d.update_img("--full", "0", f"nbd+unix:///?socket={sock}")
            assert r.returncode == errno.EIO, r
            assert ", 0 errors" not in r.stdout, r
            first = [line for line in r.stderr.splitlines() if "blocks at" in line]
            assert first, r.stderr
            offset = int(first[0].split("blocks at ")[1].split()[0])
            assert offset >= 32 << 20 and "Input/output error" in first[0], first
    finally:
        stop_process(target)
