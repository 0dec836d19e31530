"""serve --metrics: /metrics over HTTP, parsed with prometheus_client, against what the
workload did and what elioctl info says (docs/metrics.md)."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from snapengine.engine import Engine
from snapengine.metrics import BOUNDS_NS, MetricsServer, OriginRecorders
from snapengine.origin import Origin, open_exclusive
from snapengine.rundir import log_path
from tests.harness.sockets import free_tcp_port
from tests.harness import (BIN, MKFS_EXT4, ServerStartError, attached, connected, daemon,
                           mounted, pipelined, run, sparse_file)

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 4096
DATA = 16 * MiB  # 1 MiB of random data there before the snapshot
PIPELINED = 2048  # 4 KiB writes in flight 32 at a time, into [32 MiB, 48 MiB)
STATE_NAMES = ("dormant incremental", "dormant snapshot", "active incremental",
               "active snapshot", "unverified incremental", "unverified snapshot")

Samples = dict[tuple[str, frozenset], float]
e2e = pytest.mark.e2e  # through the daemon; the rest runs in process


def scrape(port: int) -> Samples:
    """Every sample of /metrics, by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def listening(pid: int) -> list[int]:
    """The TCP ports process ``pid`` listens on (state 0A in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    found.append(int(fields[1].rsplit(":", 1)[1], 16))
    return found


def check_origin(m: Samples, origin: str, op: str, requests: int, nbytes: int) -> None:
    """The counters and the histogram of ``op`` on ``origin`` say ``requests`` requests
    of ``nbytes`` bytes in all, none failed."""
    word = {"read": "read", "write": "written", "trim": "trimmed", "zero": "zeroed"}[op]
    assert value(m, f"snapengine_origin_{word}_bytes_total", origin=origin) == nbytes
    assert value(m, "snapengine_origin_requests_total", origin=origin, op=op) == requests
    assert value(m, "snapengine_origin_request_errors_total", origin=origin, op=op) == 0
    hist = "snapengine_origin_request_duration_seconds"
    assert value(m, f"{hist}_count", origin=origin, op=op) == requests
    buckets = [v for (name, labels), v in m.items() if name == f"{hist}_bucket"
               and ("origin", origin) in labels and ("op", op) in labels]
    assert len(buckets) == len(BOUNDS_NS) + 1 and max(buckets) == requests
    assert value(m, f"{hist}_bucket", origin=origin, op=op, le="+Inf") == requests
    assert (value(m, f"{hist}_sum", origin=origin, op=op) > 0) == (requests > 0)


def workload(h) -> None:
    """Before the snapshot: writes of known sizes (one pipelined run), a trim, a
    write-zeroes, reads."""
    import nbd
    h.pwrite(os.urandom(MiB), DATA)
    for offset in (0, 40 * KiB, 2 * MiB):
        h.pwrite(os.urandom(BLOCK), offset)
    block = nbd.Buffer.from_bytearray(bytearray(os.urandom(BLOCK)))
    pipelined(h, ((h.aio_pwrite, block, 32 * MiB + (i * 7919 % 4096) * BLOCK)
                  for i in range(PIPELINED)))
    h.trim(128 * KiB, 4 * MiB)
    h.zero(64 * KiB, 8 * MiB)
    for length, offset in ((BLOCK, 0), (BLOCK, DATA), (64 * KiB, DATA + 64 * KiB)):
        assert len(h.pread(length, offset)) == length


@e2e
def test_counters_and_minor_gauges_match_the_workload(tmp_path):
    origin = sparse_file(str(tmp_path / "disk.img"), 64 * MiB)
    cow = str(tmp_path / "cow")
    port = free_tcp_port()
    with daemon(str(tmp_path / "run"), [(origin, "disk0")],
                extra=["--metrics", f"127.0.0.1:{port}"]) as d:
        assert listening(d.pid) == [port]
        with connected(d.uri("disk0")) as h:
            workload(h)
            m = scrape(port)
            check_origin(m, "disk0", "write", 4 + PIPELINED, MiB + 3 * BLOCK + PIPELINED * BLOCK)
            check_origin(m, "disk0", "trim", 1, 128 * KiB)
            check_origin(m, "disk0", "zero", 1, 64 * KiB)
            check_origin(m, "disk0", "read", 3, 72 * KiB)
            assert not [k for k in m if k[0].startswith("snapengine_minor_") and k[1]]

            d.elioctl("setup-snapshot", "disk0", cow, "4")
            h.pwrite(os.urandom(BLOCK), DATA)  # its 64 KiB cluster saved: 16 blocks
            h.pwrite(os.urandom(2 * BLOCK), DATA + 128 * KiB)  # and 16 more
            h.flush()
            info = d.info(4)
            m = scrape(port)
            check_origin(m, "disk0", "write", 6 + PIPELINED,
                         MiB + 6 * BLOCK + PIPELINED * BLOCK)
    assert info["state"] == 3 and info["nr_changed_blocks"] == 3 and "error" not in info
    for name in STATE_NAMES:
        assert value(m, "snapengine_minor_state", minor="4", state=name) == \
            (name == "active snapshot")
    assert value(m, "snapengine_minor_state_number", minor="4") == 3
    assert value(m, "snapengine_minor_error", minor="4") == 0
    assert value(m, "snapengine_minor_changed_blocks", minor="4") == info["nr_changed_blocks"]
    assert value(m, "snapengine_minor_saved_blocks", minor="4") == 32
    assert value(m, "snapengine_minor_cow_used_bytes", minor="4") == 32 * BLOCK
    assert value(m, "snapengine_minor_cow_limit_bytes", minor="4") == info["fallocate"]
    assert value(m, "snapengine_minor_cow_allocated_bytes", minor="4") >= 32 * BLOCK
    assert value(m, "snapengine_minor_info", minor="4", origin="disk0", cow_file=cow) == 1


@e2e
def test_ext4_file_written_with_fsync_is_counted(tmp_path):
    origin = sparse_file(str(tmp_path / "disk.img"), 128 * MiB)
    data = os.urandom(3 * MiB + 5)
    port = free_tcp_port()
    with daemon(str(tmp_path / "run"), [(origin, "disk0")],
                extra=["--metrics", f"127.0.0.1:{port}"]) as d:
        with attached(d.uri("disk0"), str(tmp_path / "fuse")) as dev:
            run([*MKFS_EXT4, dev])
            with mounted(dev, str(tmp_path / "fs")) as fs:
                run(["sync"])
                before = value(scrape(port), "snapengine_origin_written_bytes_total",
                               origin="disk0")
                with open(os.path.join(fs, "data"), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                after = scrape(port)
    assert before > 0  # mkfs.ext4's own writes
    assert value(after, "snapengine_origin_written_bytes_total", origin="disk0") - before \
        >= len(data)
    assert value(after, "snapengine_origin_requests_total", origin="disk0", op="write") > 0


def test_without_metrics_no_recorder_is_installed(tmp_path):
    origin = sparse_file(str(tmp_path / "disk.img"), 4 * MiB)
    with Engine(str(tmp_path / "run"), [(origin, "d")]) as engine:
        assert engine.recorders == {}
        export = engine.open_export("d", False)
        assert export.pwrite == engine.origins["d"].pwrite  # the origin's own method
        export.close()
    imported = subprocess.run([sys.executable, "-c", "import sys, snapengine.daemon; "
                               "print('prometheus_client' in sys.modules)"],
                              capture_output=True, text=True, check=True).stdout
    assert imported == "False\n"  # the daemon imports it only for --metrics


def test_metrics_server_records_and_stop_closes_its_port(tmp_path):
    origin = sparse_file(str(tmp_path / "disk.img"), 4 * MiB)
    port = free_tcp_port()
    with Engine(str(tmp_path / "run"), [(origin, "d")]) as engine:
        metrics = MetricsServer(engine, f"127.0.0.1:{port}")
        assert engine.recorders == {}  # bound, nothing installed yet
        metrics.start()
        try:
            export = engine.open_export("d", False)
            export.pwrite(b"x" * 512, 0, False)
            export.close()
            check_origin(scrape(port), "d", "write", 1, 512)
        finally:
            metrics.stop()
        with pytest.raises(urllib.error.URLError):
            scrape(port)
        MetricsServer(engine, f"127.0.0.1:{port}").stop()  # a restarted daemon binds it


@e2e
def test_serve_without_metrics_listens_on_no_tcp_port(tmp_path):
    origin = sparse_file(str(tmp_path / "disk.img"), 4 * MiB)
    with daemon(str(tmp_path / "run"), [(origin, "disk0")]) as d:
        assert listening(d.pid) == []
        assert "metrics on http" not in open(log_path(d.run_dir)).read()


@e2e
def test_a_port_in_use_fails_the_start_with_eaddrinuse(tmp_path):
    origin = sparse_file(str(tmp_path / "disk.img"), 4 * MiB)
    run_dir = str(tmp_path / "run")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServerStartError):
            with daemon(run_dir, [(origin, "disk0")], extra=["--metrics", f"127.0.0.1:{port}"]):
                pass
    text = open(log_path(run_dir)).read()
    assert f"cannot start: {os.strerror(errno.EADDRINUSE)}: metrics: cannot listen on " \
        f"127.0.0.1:{port}" in text
    assert "snapengine stopped cleanly" in text


def test_a_bad_metrics_address_is_einval(tmp_path):
    r = subprocess.run([os.path.join(BIN, "snapengine"), "serve", "--run-dir",
                        str(tmp_path / "run"), "--state-dir", str(tmp_path / "state"),
                        "--metrics", "localhost"], capture_output=True, text=True, timeout=60)
    assert r.returncode == errno.EINVAL
    assert "--metrics 'localhost' is not HOST:PORT" in r.stderr


def test_a_failed_request_counts_as_an_error_only(tmp_path):
    path = sparse_file(str(tmp_path / "disk.img"), 4 * MiB)
    origin = Origin(path, "d", open_exclusive(path))
    try:
        rec = OriginRecorders(origin)
        pread, pwrite, zero, trim = rec.callbacks
        pwrite(b"y" * 4096, 0, False)
        with pytest.raises(OSError):
            pread(bytearray(4096), 4 * MiB)  # past the end: a short read, EIO
        zero(8192, 0, False, False)
        trim(4096, 0, False)
        assert [(sum(r.buckets), r.nbytes, r.errors) for r in rec.ops.values()] == \
            [(0, 0, 1), (1, 4096, 0), (1, 4096, 0), (1, 8192, 0)]
    finally:
        origin.close()
