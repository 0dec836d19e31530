"""Kept Python thread states (snapengine/threadstate.py) on the real daemon.

Each data callback keeps its nbdkit worker thread's Python thread state until the
connection closes. These tests open and close many connections, each with enough
requests in flight to wake every worker thread, and check that the states are given
back: every close releases the states its requests kept (more than one: several
workers served it), resident memory stays flat, the data stays right, and the daemon
still answers. ``--threads 1`` is the case where one thread runs the requests and
``close`` itself: only the extra count is given back there (deleting that state
instead kills the daemon, which this test sees).
"""

from __future__ import annotations

import os
import re

import pytest

from tests.harness import daemon, sparse_file
from tests.harness.nbdclient import connect, pipelined

MiB = 1 << 20
SIZE = 16 * MiB
CONNECTIONS = 150
IN_FLIGHT = 64  # requests queued per connection: every worker thread gets some
RELEASED = re.compile(r"connection closed: (\d+) thread states released")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def busy_connection(uri: str, expected: bytes) -> None:
    """One connection: IN_FLIGHT 4 KiB reads at once, each checked."""
    import nbd
    h = connect(uri)
    try:
        bufs = [nbd.Buffer(4096) for _ in range(IN_FLIGHT)]
        pipelined(h, [(h.aio_pread, buf, i * 4096) for i, buf in enumerate(bufs)],
                  window=IN_FLIGHT)
        for i, buf in enumerate(bufs):
            assert buf.to_bytearray() == expected[i * 4096:(i + 1) * 4096], \
                f"block {i} read wrong"
    finally:
        h.shutdown()


@pytest.mark.parametrize("threads", [16, 1])
def test_thread_states_are_released_with_their_connection(tmp_path, threads):
    origin = sparse_file(str(tmp_path / "disk.img"), SIZE)
    data = os.urandom(IN_FLIGHT * 4096)
    with open(origin, "r+b") as f:
        f.write(data)
    with daemon(str(tmp_path / "run"), [(origin, "disk")], ["--threads", str(threads)],
                verbose=True) as d:
        uri = d.uri("disk")
        for _ in range(20):  # warm up: allocator arenas, caches, the first states
            busy_connection(uri, data)
        before = rss_kib(d.pid)
        for _ in range(CONNECTIONS):
            busy_connection(uri, data)
        grown = rss_kib(d.pid) - before
        busy_connection(uri, data)  # still serving
        assert grown < 4 * 1024, f"daemon RSS grew {grown} KiB over {CONNECTIONS} connections"
        released = [int(n) for n in RELEASED.findall(open(d.log_path).read())]
    assert len(released) >= CONNECTIONS, "close did not release the connections' states"
    assert all(1 <= n <= threads for n in released), released
    if threads == 1:
        assert set(released) == {1}
    else:  # a worker whose ident an older connection still holds keeps nothing yet
        assert sum(n > 1 for n in released) >= CONNECTIONS // 2, released
