"""Requests with flags or commands the export did not advertise never kill the daemon.

nbdkit 1.32 validates most of them itself (server/protocol.c validate_request), but not
FAST_ZERO: backend_zero asserts can_fast_zero == 1 and aborts the whole server. Each case
sends one such request with libnbd's strict mode off; afterwards the daemon is up, a fresh
connection reads the origin, and origin and snapshot data are intact.
"""

from __future__ import annotations

import random

import pytest

from tests.harness import daemon, sparse_file

nbd = pytest.importorskip("nbd")
pytestmark = pytest.mark.e2e

MiB = 1 << 20
SIZE = 16 * MiB
PATTERN = random.Random(20261202).randbytes(MiB)
ORIGIN, SNAP = "disk0", "elastio-snap0"


def _connect(d, export, structured=True):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    if structured:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(d.uri(export))
    return h


CASES = [  # (id, export, structured replies, request)
    ("origin-zero-fast", ORIGIN, True, lambda h: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)),
    ("origin-zero-fast-fua", ORIGIN, True,
     lambda h: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)),
    ("origin-cache", ORIGIN, True, lambda h: h.cache(4096, 0)),
    ("origin-pread-df-no-structured", ORIGIN, False, lambda h: h.pread(4096, 0, nbd.CMD_FLAG_DF)),
    ("origin-pread-req-one", ORIGIN, True, lambda h: h.pread(4096, 0, nbd.CMD_FLAG_REQ_ONE)),
    ("origin-write-no-hole", ORIGIN, True,
     lambda h: h.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_NO_HOLE)),
    ("snap-write-fua", SNAP, True, lambda h: h.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA)),
    ("snap-trim-fua", SNAP, True, lambda h: h.trim(4096, 0, nbd.CMD_FLAG_FUA)),
    ("snap-zero-fua", SNAP, True, lambda h: h.zero(4096, 0, nbd.CMD_FLAG_FUA)),
    ("snap-zero-fast", SNAP, True, lambda h: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)),
    ("snap-zero-may-trim", SNAP, True, lambda h: h.zero(4096, 0)),
    ("snap-write", SNAP, True, lambda h: h.pwrite(b"x" * 4096, 0)),
    ("snap-trim", SNAP, True, lambda h: h.trim(4096, 0)),
    ("snap-cache", SNAP, True, lambda h: h.cache(4096, 0)),
    ("snap-pread-fua", SNAP, True, lambda h: h.pread(4096, 0, nbd.CMD_FLAG_FUA)),
    ("snap-pread-df-no-structured", SNAP, False, lambda h: h.pread(4096, 0, nbd.CMD_FLAG_DF)),
    ("snap-block-status-req-one", SNAP, True,
     lambda h: h.block_status(4096, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)),
    ("origin-block-status-req-one", ORIGIN, True,
     lambda h: h.block_status(4096, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)),
]


@pytest.mark.parametrize("export,structured,send", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_unadvertised_request_keeps_daemon_and_data(tmp_path, export, structured, send):
    path = sparse_file(str(tmp_path / "disk0.img"), SIZE)
    with open(path, "r+b") as f:
        f.write(PATTERN)
    with daemon(str(tmp_path / "run"), [(path, ORIGIN)]) as d:
        d.elioctl("setup-snapshot", ORIGIN, str(tmp_path / "cow"), "0")
        h = _connect(d, export, structured)
        try:
            send(h)  # an error reply or a correct answer: either is fine
        except nbd.Error:
            pass
        try:
            h.shutdown()
        except nbd.Error:
            pass
        assert d.proc.poll() is None, d.log()[-3000:]
        o = _connect(d, ORIGIN)
        assert o.pread(MiB, 0) == PATTERN
        o.shutdown()
        s = _connect(d, SNAP)
        assert s.pread(MiB, 0) == PATTERN
        assert s.pread(MiB, MiB) == bytes(MiB)
        s.shutdown()
        assert d.proc.poll() is None, d.log()[-3000:]
