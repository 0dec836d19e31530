"""Which NBD exports exist, who may open them, and what each one allows.

INTERFACE.md §3: an origin NAME is read-write (FLUSH and FUA honoured, multi-conn);
``elastio-snapN`` is the read-only snapshot of minor N while that minor is in a (live or
dormant) snapshot state; nothing else opens. NBD_OPT_LIST lists exactly those exports
without opening any. A write to a snapshot export fails with EPERM.

One real daemon serves the module (``server``), on its Unix socket and on a TCP listener
(``--tcp 127.0.0.1:PORT``), with four 16 MiB origins:

    disk0  minor 0, snapshot, dormant (state 1); its first MiB holds PATTERN
    disk1  minor 1, incremental, dormant (state 0): no snapshot export
    disk2  free: tests set up minor 2 on it
    disk3  free: the TCP test writes here

Each test leaves minors 0 and 1 as they were (``settle`` waits for them to go dormant
again and destroys any other minor). Clients are real: libnbd (``import nbd``), and a
raw newstyle handshake for the names libnbd refuses to send (NUL, non-UTF-8, too long).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
import struct

import pytest

from snapengine.client import request
from tests.harness import daemon, sparse_file, wait_for
from tests.harness.nbdclient import export_names as harness_export_names
from tests.harness.sockets import free_tcp_port

nbd = pytest.importorskip("nbd")

MiB = 1 << 20
SIZE = 16 * MiB
PATTERN = random.Random(20260101).randbytes(MiB)  # disk0's first MiB, frozen by minor 0
ORIGINS = ("disk0", "disk1", "disk2", "disk3")
DORMANT = {0: 1, 1: 0}  # minor -> state between tests


# -- fixtures and helpers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("nbd-exports")
    origins = [(sparse_file(str(base / f"{name}.img"), SIZE), name) for name in ORIGINS]
    with open(origins[0][0], "r+b") as f:
        f.write(PATTERN)
    port = free_tcp_port()
    with daemon(str(base / "run"), origins, ["--tcp", f"127.0.0.1:{port}"]) as d:
        d.port = port
        d.paths = {name: path for path, name in origins}
        d.cow_dir = base / "cow"
        d.cow_dir.mkdir()
        d.elioctl("setup-snapshot", "disk0", str(d.cow_dir / "cow0"), "0")
        d.elioctl("setup-snapshot", "disk1", str(d.cow_dir / "cow1"), "1")
        d.elioctl("transition-to-incremental", "1")
        for name in ("disk0", "disk1"):  # a client comes and goes: both minors go dormant
            with client(d, name) as h:
                h.pread(4096, 0)
        wait_dormant(d)
        yield d


def states(d) -> dict[int, int]:
    return {dev["minor"]: dev["state"] for dev in request(d.ctl, "info")["devices"]}


def wait_dormant(d) -> None:
    wait_for(lambda: states(d) == DORMANT, timeout=10, what=f"minors back to {DORMANT}")


@pytest.fixture(autouse=True)
def settle(server):
    """Each test starts and ends with the module's minors dormant and no other minor."""
    yield
    for minor in states(server):
        if minor not in DORMANT:
            server.elioctl("destroy", str(minor))
    wait_dormant(server)


@contextlib.contextmanager
def client(d, name: str | None = None, uri: str | None = None):
    """A libnbd handle connected to export ``name`` on the Unix socket (or to ``uri``)."""
    h = nbd.NBD()
    if uri is not None:
        h.connect_uri(uri)
    else:
        h.set_export_name(name)
        h.connect_unix(d.nbd_socket)
    try:
        yield h
    finally:
        h.shutdown()


def export_names(d, uri: str | None = None) -> list[tuple[str, str]]:
    """NBD_OPT_LIST of the daemon ``d`` (on its Unix socket, or at ``uri``)."""
    return harness_export_names(uri or d.uri(""))


def still_serves(d) -> None:
    """The daemon is up and serves: an origin opens and reads, the listing answers."""
    assert d.proc.poll() is None, f"the daemon died:\n{d.log()[-3000:]}"
    with client(d, "disk0") as h:
        assert h.get_size() == SIZE
        assert h.pread(4096, SIZE - 4096) is not None
    with client(d, "elastio-snap0") as h:
        assert h.pread(4096, 0) == PATTERN[:4096]
    assert "disk0" in dict(export_names(d))


def daemon_log(d) -> str:
    with open(os.path.join(d.run_dir, "daemon.log"), errors="replace") as f:
        return f.read()


def cow_stats(d) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.cow_dir.iterdir())}


# -- a raw newstyle client, for names libnbd will not send -----------------------------------

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # option request magic, "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9  # option reply magic
FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_GO = 1, 2, 7
REP_ACK, REP_INFO = 1, 3
REP_FLAG_ERROR = 1 << 31


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError(f"server closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def raw_open(d, name: bytes, option: int) -> str:
    """Ask for export ``name`` with NBD_OPT_GO or NBD_OPT_EXPORT_NAME; return "opened",
    "error 0x8000000N" (an NBD_REP_ERR_* reply to GO) or "closed" (EXPORT_NAME refused)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(d.nbd_socket)
        greeting = _recv_exactly(s, 18)
        assert greeting[:16] == NBDMAGIC + struct.pack(">Q", IHAVEOPT), greeting
        s.sendall(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
        if option == OPT_EXPORT_NAME:
            s.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, len(name)) + name)
            try:
                size, _flags = struct.unpack(">QH", _recv_exactly(s, 10))
            except (EOFError, ConnectionResetError):
                return "closed"
            assert size == SIZE
            return "opened"
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        while True:
            magic, opt, reply, length = struct.unpack(">QIII", _recv_exactly(s, 20))
            assert (magic, opt) == (REPLY_MAGIC, OPT_GO)
            _recv_exactly(s, length)
            if reply & REP_FLAG_ERROR:
                s.sendall(struct.pack(">QII", IHAVEOPT, OPT_ABORT, 0))
                return f"error {reply:#x}"
            if reply == REP_ACK:
                return "opened"  # transmission phase: just hang up
            assert reply == REP_INFO, f"unexpected reply {reply:#x}"


# -- which names open -----------------------------------------------------------------------

@pytest.mark.parametrize("name", [*ORIGINS, "elastio-snap0"])
def test_configured_exports_open(server, name):
    with client(server, name) as h:
        assert h.get_size() == SIZE
        assert h.is_read_only() == name.startswith("elastio-snap")
        data = h.pread(MiB, 0)
    if name in ("disk0", "elastio-snap0"):
        assert data == PATTERN


ORIGIN_PATH = object()  # stands for disk0's PATH (served as NAME "disk0")
BAD_NAMES = {
    "dot-dot": "../../etc/passwd",
    "absolute": "/etc/passwd",
    "empty": "",
    "4000-chars": "x" * 4000,
    "4096-chars": "elastio-snap0" + "0" * 4083,
    "huge-minor": "elastio-snap" + "9" * 4084,
    "cyrillic": "диск0",
    "accented": "dísk0",
    "emoji": "\U0001F4BE",
    "arabic-indic-digit": "elastio-snap\u0660",
    "fullwidth-digit": "elastio-snap\uff10",
    "superscript-digit": "elastio-snap\u00b2",
    "newline": "disk0\n",
    "newline-snapshot": "elastio-snap0\n",
    "crlf": "disk0\r\n",
    "no-number": "elastio-snap",
    "leading-zero": "elastio-snap00",
    "leading-zero-01": "elastio-snap01",
    "negative": "elastio-snap-1",
    "plus": "elastio-snap+0",
    "space": "elastio-snap 0",
    "underscore": "elastio-snap0_0",
    "hex": "elastio-snap0x0",
    "trailing-space": "disk0 ",
    "upper-case": "DISK0",
    "prefix-of-origin": "disk",
    "no-such-minor": "elastio-snap99",
    "free-minor": "elastio-snap5",
    "beyond-max-minors": "elastio-snap24",
    "incremental-minor": "elastio-snap1",
    "origin-path": ORIGIN_PATH,
}


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_bad_export_name_refused(server, name):
    """libnbd reports the refusal (ENOENT: no such export); nothing changes; the daemon
    still serves."""
    if name is ORIGIN_PATH:
        name = server.paths["disk0"]
    before = request(server.ctl, "info")
    h = nbd.NBD()
    h.set_export_name(name)
    with pytest.raises(nbd.Error) as e:
        h.connect_unix(server.nbd_socket)
    assert e.value.errnum == errno.ENOENT, e.value
    assert request(server.ctl, "info") == before
    still_serves(server)


RAW_NAMES = {
    "nul-suffix": b"disk0\0",
    "nul-inside": b"disk0\0junk",
    "nul-snapshot": b"elastio-snap0\0",
    "nul-only": b"\0",
    "non-utf8": b"\xff\xfe",
    "non-utf8-suffix": b"disk0\xff",
    "non-utf8-minor": b"elastio-snap\xb00",
    "overlong-utf8-zero": b"elastio-snap\xc0\xb0",
    "4097-bytes": b"x" * 4097,
    "origin-times-1000": b"disk0" * 1000,
}
OPTIONS = {"opt-go": OPT_GO, "opt-export-name": OPT_EXPORT_NAME}


@pytest.mark.parametrize("option", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("name", RAW_NAMES.values(), ids=RAW_NAMES.keys())
def test_raw_bad_export_name_refused(server, name, option):
    """Names libnbd cannot send (NUL, invalid UTF-8, over 4096 bytes): never taken for a
    valid export (``disk0\\0junk`` is not ``disk0``), with either way of asking."""
    result = raw_open(server, name, option)
    if option == OPT_GO:
        assert result.startswith("error "), result
    else:
        assert result == "closed", result
    still_serves(server)


@pytest.mark.parametrize("option", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("name", [b"disk0", b"elastio-snap0"])
def test_raw_good_export_name_opens(server, name, option):
    """The raw client itself works: the names above fail for their own sake."""
    assert raw_open(server, name, option) == "opened"


def test_non_utf8_export_name_is_not_an_internal_error(server):
    offset = len(daemon_log(server))
    assert raw_open(server, b"\xff\xfe", OPT_GO).startswith("error ")
    new = daemon_log(server)[offset:]
    assert "Traceback" not in new and "open failed" not in new, new[-2000:]


# -- NBD_OPT_LIST ---------------------------------------------------------------------------

def test_list_shows_exactly_the_exports(server):
    """The origins and the snapshot of minor 0 (dormant: still readable); not minor 1
    (incremental). Listing opens nothing: the dormant minors stay dormant, their COW
    files are not touched, and the daemon logs no activation."""
    offset, cows = len(daemon_log(server)), cow_stats(server)
    for _ in range(3):
        found = export_names(server)
        names = [name for name, _ in found]
        assert sorted(names) == sorted([*ORIGINS, "elastio-snap0"]), found
        assert all(description for _, description in found), found
        assert states(server) == DORMANT
    assert cow_stats(server) == cows
    assert ": active" not in daemon_log(server)[offset:]


def test_list_follows_the_minors(server, tmp_path):
    """A snapshot export appears with setup-snapshot, goes with transition-to-incremental,
    comes back with transition-to-snapshot and goes with destroy; it opens exactly while
    it is listed."""
    def listed() -> bool:
        present = "elastio-snap2" in dict(export_names(server))
        h = nbd.NBD()
        h.set_export_name("elastio-snap2")
        try:
            h.connect_unix(server.nbd_socket)
            h.shutdown()
            opens = True
        except nbd.Error as e:
            assert e.errnum == errno.ENOENT
            opens = False
        assert opens == present
        return present

    assert not listed()
    server.elioctl("setup-snapshot", "disk2", str(tmp_path / "cow-a"), "2")
    assert listed()
    server.elioctl("transition-to-incremental", "2")
    assert not listed()
    server.elioctl("transition-to-snapshot", str(tmp_path / "cow-b"), "2")
    assert listed()
    server.elioctl("destroy", "2")
    assert not listed()


# -- what each export allows ----------------------------------------------------------------

OLD = random.Random(1).randbytes(MiB)  # disk2 before the snapshot
NEW = random.Random(2).randbytes(64 * 1024)  # written over disk2's start after it

WRITES = {  # name -> (call, errno libnbd gives before sending: the export is read-only)
    "pwrite": (lambda h: h.pwrite(b"\xaa" * 4096, 0), errno.EPERM),
    "pwrite-fua": (lambda h: h.pwrite(b"\xaa" * 4096, 8192, nbd.CMD_FLAG_FUA), errno.EPERM),
    "trim": (lambda h: h.trim(64 * 1024, 0), errno.EINVAL),  # "does not support trim"
    "zero": (lambda h: h.zero(64 * 1024, 0), errno.EINVAL),  # "does not support zero"
    "zero-no-hole": (lambda h: h.zero(4096, MiB - 4096, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL),
}


@pytest.fixture
def snapshot2(server, tmp_path):
    """Minor 2: a snapshot of disk2 taken over OLD; NEW written to the origin since."""
    with client(server, "disk2") as h:
        h.pwrite(OLD, 0)
        h.flush()
        server.elioctl("setup-snapshot", "disk2", str(tmp_path / "cow2"), "2")
        h.pwrite(NEW, 0)
        h.flush()
    return tmp_path / "cow2"


def check_snapshot2(server) -> None:
    """The snapshot still reads OLD; the origin (over NBD and on disk) reads NEW, then OLD."""
    with client(server, "elastio-snap2") as h:
        assert h.pread(MiB, 0) == OLD
    expected = NEW + OLD[len(NEW):]
    with client(server, "disk2") as h:
        assert h.pread(MiB, 0) == expected
    with open(server.paths["disk2"], "rb") as f:
        assert f.read(MiB) == expected


@pytest.mark.parametrize("write", WRITES.values(), ids=WRITES.keys())
def test_snapshot_export_refuses_writes(server, snapshot2, write):
    """Refused by libnbd (the export is read-only), and, with libnbd's checks off so the
    command reaches the daemon, by the server with EPERM. The data is as it was."""
    call, client_errno = write
    changed = request(server.ctl, "info", minor=2)["nr_changed_blocks"]
    with client(server, "elastio-snap2") as h:
        assert h.is_read_only() and h.can_flush() and h.can_multi_conn()
        with pytest.raises(nbd.Error) as e:
            call(h)
        assert e.value.errnum == client_errno, e.value
        h.set_strict_mode(0)
        with pytest.raises(nbd.Error) as e:
            call(h)
        assert e.value.errnum == errno.EPERM, e.value
        assert "command failed" in e.value.string, e.value  # the server's answer
        h.flush()
        assert h.pread(MiB, 0) == OLD  # the same connection is still usable
    check_snapshot2(server)
    assert request(server.ctl, "info", minor=2)["nr_changed_blocks"] == changed


def test_origin_honours_flush_and_fua(server):
    """disk0 (under minor 0's snapshot): FLUSH, FUA and multi-conn advertised; a FUA write
    and zero are seen at once by a second connection and in the file, a FUA trim is
    dropped (during a snapshot the content stays); the snapshot still reads PATTERN; the
    changes are tracked."""
    data = random.Random(3).randbytes(128 * 1024)
    changed = request(server.ctl, "info", minor=0)["nr_changed_blocks"]
    with client(server, "disk0") as h, client(server, "disk0") as h2:
        assert not h.is_read_only()
        assert h.can_flush() and h.can_fua() and h.can_multi_conn()
        assert h.can_trim() and h.can_zero()
        h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
        assert h2.pread(len(data), 0) == data
        h.zero(4096, 256 * 1024, nbd.CMD_FLAG_FUA)
        kept = h2.pread(4096, 512 * 1024)
        h.trim(4096, 512 * 1024, nbd.CMD_FLAG_FUA)
        h.flush()
        h2.flush()
        assert h2.pread(4096, 256 * 1024) == bytes(4096)
        assert h2.pread(4096, 512 * 1024) == kept
        with open(server.paths["disk0"], "rb") as f:
            assert f.read(len(data)) == data
            f.seek(256 * 1024)
            assert f.read(4096) == bytes(4096)
        with client(server, "elastio-snap0") as s:
            assert s.pread(MiB, 0) == PATTERN
        now = request(server.ctl, "info", minor=0)["nr_changed_blocks"]
        assert now >= max(changed, len(data) // 4096 + 1)  # written and zeroed (not trimmed)
        assert states(server)[0] == 3  # active while clients are connected


# -- the TCP listener -----------------------------------------------------------------------

def test_tcp_listener_reads_and_writes_the_origin(server):
    """nbd://127.0.0.1:PORT/disk3 reads and writes the origin like the Unix socket does;
    it lists the same exports, refuses the same bad names, and serves snapshots
    read-only."""
    tcp = f"nbd://127.0.0.1:{server.port}"
    data = random.Random(4).randbytes(128 * 1024)
    with client(server, uri=f"{tcp}/disk3") as h:
        assert h.get_size() == SIZE and not h.is_read_only()
        h.pwrite(data, MiB)
        h.flush()
        assert h.pread(len(data), MiB) == data
    with client(server, "disk3") as h:
        assert h.pread(len(data), MiB) == data
    with open(server.paths["disk3"], "rb") as f:
        f.seek(MiB)
        assert f.read(len(data)) == data
    assert sorted(export_names(server, tcp)) == sorted(export_names(server))
    with client(server, uri=f"{tcp}/elastio-snap0") as h:
        assert h.is_read_only() and h.pread(MiB, 0) == PATTERN
        h.set_strict_mode(0)
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"x" * 4096, 0)
        assert e.value.errnum == errno.EPERM
    h = nbd.NBD()
    with pytest.raises(nbd.Error) as e:
        h.connect_uri(f"{tcp}/..%2F..%2Fetc%2Fpasswd")
    assert e.value.errnum == errno.ENOENT
    still_serves(server)


def test_tcp_listener_is_bound_where_asked(server):
    """--tcp 127.0.0.1:PORT listens on the loopback address only, not on every interface."""
    listening = []
    with open("/proc/net/tcp") as f:
        for row in f.readlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, port = local.split(":")
            if state == "0A" and int(port, 16) == server.port:  # 0A: LISTEN
                listening.append(socket.inet_ntoa(struct.pack("<I", int(address, 16))))
    assert listening == ["127.0.0.1"]


def ipv6_loopback_port() -> int | None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
            return s.getsockname()[1]
    except OSError:
        return None


def test_tcp_listener_on_ipv6_loopback(tmp_path):
    port = ipv6_loopback_port()
    if port is None:
        pytest.skip("no IPv6 loopback here")
    disk = sparse_file(str(tmp_path / "disk0.img"), SIZE)
    with daemon(str(tmp_path / "run"), [(disk, "disk0")], ["--tcp", f"[::1]:{port}"]) as d, \
            client(d, uri=f"nbd://[::1]:{port}/disk0") as h:
        h.pwrite(b"v6" * 2048, 0)
        assert h.pread(4096, 0) == b"v6" * 2048
