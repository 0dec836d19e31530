"""The control socket under attack: strangers, garbage, floods and stalled clients.

docs/control-protocol.md: the socket is mode 0600 and checks its peer (SO_PEERCRED: root
or the daemon's uid, others EACCES); a request is one flat JSON object on one line of at
most 65536 bytes, checked against a schema; anything wrong is answered with an error
(EINVAL for bad input) and never reaches the engine; at most 64 connections are served at
once (more get EAGAIN); a client has CONN_TIMEOUT seconds to send each request. The
server never dies of a request.

One real daemon serves the module (``server``): minor 0 is a snapshot of disk0, minor 1
tracks disk1 incrementally, disk2 is free. Every test leaves it as it found it, and
``unchanged`` proves it: the same ``info``, the same registry file, the same COW files.
The run directory lives in a world-readable temporary directory so that uid 65534 can
reach the socket, and only the socket's own mode (or the peer check) keeps it out.

The per-connection timeout is tested in-process, on ``ControlServer`` with a real
``Engine`` and a timeout of a fraction of a second (monkeypatched), since the daemon's
30 s cannot be changed from outside.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapengine import client, control
from snapengine.client import request
from snapengine.control import ControlServer
from snapengine.engine import Engine
from snapengine.errors import SnapError
from tests.harness import BIN, control_answers, daemon, sparse_file, wait_for

MiB = 1 << 20
STRANGER = 65534  # nobody
MAX_REQUEST = 65536  # bytes in one request line, "\n" included (docs/control-protocol.md)
MAX_CONNECTIONS = 64
MAX_MINORS = 24

# The schema of docs/control-protocol.md ("Operations", "Fields"), written out here rather
# than taken from control.OPS, so that a change of the server's table shows up as a failure.
STR, MINOR, INFO_MINOR, MB = "str", "minor", "info-minor", "mb"
FIELDS: dict[str, dict[str, str]] = {
    "setup-snapshot": {"block_device": STR, "block_device_path": STR, "cow_file": STR,
                       "minor": MINOR, "cache_mb": MB, "fallocate_mb": MB},
    "reload-snapshot": {"block_device": STR, "block_device_path": STR, "cow_file": STR,
                        "minor": MINOR, "cache_mb": MB},
    "reload-incremental": {"block_device": STR, "block_device_path": STR, "cow_file": STR,
                           "minor": MINOR, "cache_mb": MB},
    "transition-to-incremental": {"minor": MINOR},
    "transition-to-snapshot": {"cow_file": STR, "minor": MINOR, "fallocate_mb": MB},
    "destroy": {"minor": MINOR},
    "reconfigure": {"minor": MINOR, "cache_mb": MB},
    "info": {"minor": INFO_MINOR},
    "get-free-minor": {},
}
ACCEPTED = {STR: (str,), MINOR: (int, str), INFO_MINOR: (int, str, type(None)),
            MB: (int, str, type(None))}
# A value of the right type that the engine refuses anyway (minor out of range): a request
# built around it can never change anything, even if a schema check were missing.
HARMLESS = {STR: "/nonexistent/x", MINOR: "99", INFO_MINOR: "99", MB: "1"}
WRONG_TYPES = {"true": True, "false": False, "null": None, "float": 1.5, "zero-float": 0.0,
               "int": 7, "string": "7", "list": [1], "empty-list": [], "object": {"a": 1},
               "empty-object": {}}


# -- fixtures and helpers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    """The module's daemon; its run dir is reachable (not writable) by other users."""
    top = tempfile.mkdtemp(prefix="snapengine-ctl-", dir="/tmp")
    try:
        os.chmod(top, 0o755)
        origins = [(sparse_file(os.path.join(top, f"disk{i}.img"), 16 * MiB), f"disk{i}")
                   for i in range(3)]
        cow_dir = os.path.join(top, "cow")
        os.mkdir(cow_dir)
        with daemon(os.path.join(top, "run"), origins) as d:
            d.paths = {name: path for path, name in origins}
            d.cow_dir = cow_dir
            d.elioctl("setup-snapshot", "disk0", os.path.join(cow_dir, "cow0"), "0")
            d.elioctl("setup-snapshot", "disk1", os.path.join(cow_dir, "cow1"), "1")
            d.elioctl("transition-to-incremental", "1")
            d.baseline = snapshot_state(d)
            assert [(dev["minor"], dev["state"]) for dev in d.baseline.info["devices"]] == \
                [(0, 3), (1, 2)]
            yield d
    finally:
        shutil.rmtree(top, ignore_errors=True)


def snapshot_state(d) -> SimpleNamespace:
    with open(os.path.join(d.run_dir, "registry.json"), "rb") as f:
        registry = f.read()
    cows = {name: os.stat(os.path.join(d.cow_dir, name)).st_size
            for name in sorted(os.listdir(d.cow_dir))}
    return SimpleNamespace(info=request(d.ctl, "info"), registry=registry, cows=cows)


@pytest.fixture(autouse=True)
def restore(request):
    """After each test, destroy any minor it created by mistake, so that one failure
    does not fail every test after it."""
    yield
    if "server" in request.fixturenames:
        d = request.getfixturevalue("server")
        for dev in request_info(d)["devices"]:
            if dev["minor"] not in (0, 1):
                d.elioctl("destroy", str(dev["minor"]), check=False)


def request_info(d) -> dict:
    return request(d.ctl, "info")


def unchanged(d) -> None:
    """The daemon is up, answers ``info``, and nothing about its minors changed."""
    assert d.proc.poll() is None, f"the daemon died:\n{d.log()[-3000:]}"
    now = snapshot_state(d)
    assert now.info == d.baseline.info, "elioctl info changed"
    assert now.registry == d.baseline.registry, "the registry changed"
    assert now.cows == d.baseline.cows, "COW files were created, removed or resized"


def connect(path: str, timeout: float = 20.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)  # blocking: waits for room in the listen backlog (a timeout would not)
    s.settimeout(timeout)
    return s


def exchange(path: str, payload: bytes, timeout: float = 20.0) -> list[dict]:
    """Send ``payload`` on one connection, then EOF; return every reply, parsed.

    The server may hang up early (a framing error): a send that fails is not an error,
    and ECONNRESET after the replies (the server closed with unread data) is an EOF."""
    s = connect(path, timeout)
    data = b""
    try:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # EPIPE, ECONNRESET: it hung up first; its replies are there
            pass
        while True:
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    assert data == b"" or data.endswith(b"\n"), f"a reply without its newline: {data[-200:]!r}"
    return [parse_reply(line) for line in data.split(b"\n")[:-1]]


def parse_reply(line: bytes) -> dict:
    reply = json.loads(line)
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    if reply["ok"]:
        assert set(reply) == {"ok", "result"}, reply
    else:
        assert set(reply) == {"ok", "errno", "message"}, reply
        assert isinstance(reply["errno"], int) and reply["errno"] > 0, reply
        assert isinstance(reply["message"], str) and reply["message"], reply
    return reply


def line(req) -> bytes:
    return json.dumps(req).encode() + b"\n"


def check_error(reply: dict, err: int, text: str | None = None) -> None:
    assert reply["ok"] is False and reply["errno"] == err, \
        f"expected {errno.errorcode[err]}, got {reply}"
    if text is not None:
        assert text in reply["message"], reply


def as_stranger(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``cmd`` as uid/gid 65534: privileges are dropped before exec, so the command
    connects as the stranger (not a connection inherited from root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another uid")
    return subprocess.run(list(cmd), user=STRANGER, group=STRANGER, extra_groups=[],
                          capture_output=True, timeout=timeout, check=False)


STRANGER_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(f"connect failed: errno {e.errno}")
    sys.exit(0)
try:
    s.sendall(sys.argv[2].encode())
except OSError:
    pass  # refused before reading: the reply is still there to read
data = b""
try:
    while chunk := s.recv(65536):
        data += chunk
except ConnectionResetError:
    pass
sys.stdout.write(data.decode())
"""


@pytest.fixture
def socket_mode_0666(server):
    """The control socket opened to everybody, for the duration of one test."""
    os.chmod(server.ctl, 0o666)
    try:
        yield
    finally:
        os.chmod(server.ctl, 0o600)


# -- who may connect ------------------------------------------------------------------------

def test_socket_mode_is_0600(server):
    st_ = os.stat(server.ctl)
    assert stat.S_ISSOCK(st_.st_mode)
    assert stat.S_IMODE(st_.st_mode) == 0o600
    assert st_.st_uid == os.getuid()  # the daemon's user (this test started it)


def test_cow_files_are_private(server):
    """COW files hold old origin data: mode 0600, the daemon's user (docs/security.md)."""
    for name in server.baseline.cows:
        st_ = os.stat(os.path.join(server.cow_dir, name))
        assert stat.S_IMODE(st_.st_mode) == 0o600, name
        assert st_.st_uid == os.getuid()


def test_stranger_cannot_connect_to_the_0600_socket(server):
    """The socket's mode alone keeps uid 65534 out (the directories are searchable)."""
    r = as_stranger(sys.executable, "-c", STRANGER_CLIENT, server.ctl,
                    json.dumps({"op": "destroy", "minor": 0}) + "\n")
    assert r.stdout.decode() == f"connect failed: errno {errno.EACCES}\n", r
    unchanged(server)


def test_stranger_refused_by_the_peer_check(server, socket_mode_0666):
    """With the socket opened to all, SO_PEERCRED still refuses uid 65534 with EACCES,
    before reading anything: its ``destroy 0`` (and the requests after it) never run."""
    offset = len(server.log())
    requests = line({"op": "destroy", "minor": 0}) + line({"op": "destroy", "minor": 1})
    r = as_stranger(sys.executable, "-c", STRANGER_CLIENT, server.ctl, requests.decode())
    out = r.stdout.decode()
    assert r.returncode == 0 and out.count("\n") == 1, r  # one refusal, then EOF
    reply = parse_reply(out.encode())
    check_error(reply, errno.EACCES, f"uid {STRANGER} may not control snapengine")
    unchanged(server)
    wait_for(lambda: f"refused a client with uid {STRANGER}" in server.log()[offset:],
             timeout=5, what="the refusal in the daemon's log")


@pytest.mark.parametrize("mode", ["socket-0600", "peer-check"])
def test_elioctl_as_stranger(server, mode):
    """elioctl run by uid 65534: exit EACCES, exactly one line on stderr, no traceback,
    nothing changed. Refused by the socket's mode, or (socket 0666) by the daemon."""
    if mode == "peer-check":
        os.chmod(server.ctl, 0o666)
    try:
        r = as_stranger(os.path.join(BIN, "elioctl"), "--run-dir", server.run_dir, "destroy", "0")
    finally:
        os.chmod(server.ctl, 0o600)
    stderr = r.stderr.decode()
    assert r.returncode == errno.EACCES, r
    assert r.stdout == b""
    assert stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    assert stderr.startswith(f"elioctl: destroy: {os.strerror(errno.EACCES)}: "), stderr
    if mode == "socket-0600":
        assert f"no permission to use {server.ctl}" in stderr, stderr
    else:
        assert f"uid {STRANGER} may not control snapengine" in stderr, stderr
    unchanged(server)


# -- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("op, field", [(op, f) for op, fields in FIELDS.items() for f in fields],
                         ids=[f"{op}-{f}" for op, fields in FIELDS.items() for f in fields])
def test_wrong_type_for_every_field(server, op, field):
    """Every JSON type a field does not accept (booleans, floats, lists and objects never
    are) is EINVAL, all on one connection, one reply per request, in order."""
    kind = FIELDS[op][field]
    wrong = {k: v for k, v in WRONG_TYPES.items()
             if isinstance(v, bool) or not isinstance(v, ACCEPTED[kind])}
    payload = b""
    for value in wrong.values():
        req = {"op": op, **{f: HARMLESS[k] for f, k in FIELDS[op].items()}, field: value}
        payload += line(req)
    replies = exchange(server.ctl, payload)
    assert len(replies) == len(wrong)
    many = isinstance(control.OPS[op][1][field], control.Many)  # a group's list field
    for value, reply in zip(wrong.values(), replies):
        if many and isinstance(value, list):  # a list is a group: refused for what is in it
            check_error(reply, errno.EINVAL)  # (or for the other fields not being lists)
        else:
            check_error(reply, errno.EINVAL, f"field {field!r} has the wrong type")
    unchanged(server)


def nested_json(kind: str, depth: int) -> bytes:
    if kind == "arrays":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


DEPTHS = [2, 3, 100, 500, 900, 950, 990, 1000, 1100, 10000, 30000]
NESTED = [(kind, depth) for kind in ("arrays", "objects") for depth in DEPTHS
          if len(nested_json(kind, depth)) < MAX_REQUEST - 64]  # longer: see the size test


@pytest.mark.parametrize("where", ["top-level", "in-a-field"])
@pytest.mark.parametrize("kind, depth", NESTED, ids=[f"{k}-{d}" for k, d in NESTED])
def test_deeply_nested_json(server, kind, depth, where):
    """EINVAL at any depth: neither the JSON decoder nor the schema check may recurse
    itself to death (a RecursionError would be an EIO "internal error")."""
    nested = nested_json(kind, depth)
    req = nested if where == "top-level" else b'{"op": "info", "minor": ' + nested + b"}"
    replies = exchange(server.ctl, req + b"\n")
    assert len(replies) == 1
    check_error(replies[0], errno.EINVAL)
    unchanged(server)


UNENCODABLE = ["\ud800", "\udbff", "\udc00", "\udc7f", "\udd00", "\udfff"]


@pytest.mark.parametrize("field", ["block_device", "block_device_path", "cow_file"])
@pytest.mark.parametrize("char", UNENCODABLE, ids=[f"U+{ord(c):04X}" for c in UNENCODABLE])
def test_unencodable_string_is_einval(server, field, char):
    """A lone surrogate (valid in JSON, not in a file name) in a path field of an otherwise
    valid setup-snapshot (free origin disk2, free minor 5) is EINVAL, not an internal
    error from os.stat, and creates no COW file."""
    req = {"op": "setup-snapshot", "block_device": "disk2", "minor": 5,
           "cow_file": os.path.join(server.cow_dir, "new")}
    if field == "block_device_path":  # used only when block_device names no origin
        req["block_device"] = "not-served"
    req[field] = req.get(field, server.paths["disk2"]) + char
    replies = exchange(server.ctl, line(req))
    assert len(replies) == 1
    check_error(replies[0], errno.EINVAL, "not a valid string")
    unchanged(server)


def test_surrogate_escaped_bytes_are_a_valid_file_name(server):
    """The other side of the check above: "\\udc80".."\\udcff" are how elioctl passes a
    non-UTF-8 byte of a path, and must keep working (here: an unserved file, ENODEV)."""
    reply = exchange(server.ctl, line({"op": "setup-snapshot", "minor": 5,
                                       "block_device": "/nonexistent/\udcff",
                                       "cow_file": os.path.join(server.cow_dir, "new")}))
    check_error(reply[0], errno.ENODEV)
    unchanged(server)


def test_request_size_limit(server):
    """65536 bytes with the newline are served; one byte more is EINVAL and the
    connection is closed (what follows is never read)."""
    def padded(size: int) -> bytes:
        head = b'{"op": "info"'
        return head + b" " * (size - len(head) - 2) + b"}\n"

    replies = exchange(server.ctl, padded(MAX_REQUEST) * 2)
    assert [r["ok"] for r in replies] == [True, True]
    assert replies[0]["result"] == server.baseline.info
    for size in (MAX_REQUEST + 1, 4 * MAX_REQUEST, 64 * MAX_REQUEST):
        replies = exchange(server.ctl, padded(size) + line({"op": "info"}))
        assert len(replies) == 1, replies
        check_error(replies[0], errno.EINVAL, str(MAX_REQUEST))
    unchanged(server)


def test_many_requests_on_one_connection(server):
    """1000 pipelined requests, good and bad mixed: 1000 replies, in order."""
    kinds = [(line({"op": "info"}), "info"), (b"garbage\n", errno.EINVAL),
             (line({"op": "get-free-minor"}), "free"), (line({"op": "info", "minor": 7}), errno.ENOENT),
             (line({"op": "destroy", "minor": 99}), errno.EINVAL), (b"\n", errno.EINVAL)]
    sent = [kinds[i % len(kinds)] for i in range(1000)]
    replies = exchange(server.ctl, b"".join(req for req, _ in sent))
    assert len(replies) == len(sent)
    for (_, want), reply in zip(sent, replies):
        if want == "info":
            assert reply == {"ok": True, "result": server.baseline.info}
        elif want == "free":
            assert reply == {"ok": True, "result": 2}
        else:
            check_error(reply, want)
    unchanged(server)


def test_last_request_without_newline(server):
    """A final request cut short by EOF (no newline) is still a request: answered, once."""
    assert exchange(server.ctl, b'{"op": "get-free-minor"}') == [{"ok": True, "result": 2}]
    replies = exchange(server.ctl, line({"op": "info"}) + b'{"op": "destroy", "mi')
    assert replies[0] == {"ok": True, "result": server.baseline.info}
    check_error(replies[1], errno.EINVAL, "not JSON")
    assert len(replies) == 2
    unchanged(server)


# -- the fuzzer -----------------------------------------------------------------------------
# Each example is a few request lines on one connection, each with the reply it must get:
# ("err", errno, text in the message or None) or ("ok", what). The last line may lack its
# newline, or be longer than a request (answered with EINVAL, then the connection closes).

def _encode(req) -> bytes:
    return json.dumps(req).encode()


def _refusal(req: dict, text: str) -> tuple:
    """EINVAL with ``text``; with a list or object nested in a value, "not flat" (that
    check comes first); with a list or object as a value, EINVAL (the field's own check:
    a group command's fields take lists)."""
    def nested(v) -> bool:
        inner = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        return any(isinstance(x, (list, dict)) for x in inner)
    if any(nested(v) for v in req.values()):
        return "err", errno.EINVAL, "flat JSON object"
    if any(isinstance(v, (list, dict)) for v in req.values()):
        return "err", errno.EINVAL, None
    return "err", errno.EINVAL, text


def json_values(max_leaves: int = 4):
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
        max_leaves=max_leaves)


def _harmless_fields(op: str) -> dict:
    return {f: HARMLESS[k] for f, k in FIELDS[op].items()}


ops = st.sampled_from(sorted(FIELDS))


@st.composite
def random_bytes(draw):
    raw = draw(st.binary(max_size=200)).replace(b"\n", b" ")
    return raw, ("err", errno.EINVAL, None)


@st.composite
def broken_json(draw):
    op = draw(ops)
    text = _encode({"op": op, **_harmless_fields(op)})
    how = draw(st.sampled_from(["truncate", "trailing", "quotes", "raw-nul", "raw-control"]))
    if how == "truncate":  # an object without its closing brace is never JSON
        text = text[:draw(st.integers(0, len(text) - 1))]
    elif how == "trailing":
        text += draw(st.sampled_from([b" x", b"}", b",", b"{}", b" 1"]))
    elif how == "quotes":
        text = text.replace(b'"', b"'")
    else:  # an unescaped control character inside a string
        cut = text.index(b'"op"') + 2
        text = text[:cut] + (b"\0" if how == "raw-nul" else b"\x01") + text[cut:]
    return text, ("err", errno.EINVAL, None)


@st.composite
def deeply_nested(draw):
    depth = draw(st.sampled_from([2, 50, 900, 990, 1000, 5000, 10000]) | st.integers(2, 1200))
    nested = draw(st.sampled_from(["[", '{"a":']))
    body = (nested * depth + ("1" if nested != "[" else "") +
            ("]" if nested == "[" else "}") * depth).encode()
    if draw(st.booleans()):
        body = b'{"op": "' + draw(ops).encode() + b'", "minor": ' + body + b"}"
    return body, ("err", errno.EINVAL, None)


@st.composite
def wrong_type(draw):
    op = draw(ops.filter(lambda o: FIELDS[o]))
    req = {"op": op, **_harmless_fields(op)}
    for field in draw(st.lists(st.sampled_from(sorted(FIELDS[op])), min_size=1, unique=True)):
        accepted = ACCEPTED[FIELDS[op][field]]
        many = isinstance(control.OPS[op][1][field], control.Many)  # may take a list: a
        req[field] = draw(json_values().filter(  # list of good values is not a wrong type
            lambda v, a=accepted, m=many: isinstance(v, bool) or not isinstance(v, a)
            and not (m and isinstance(v, list))))
    return _encode(req), _refusal(req, "wrong type")


@st.composite
def unknown_op(draw):
    op = draw(st.one_of(st.text(max_size=30), json_values(2)).filter(
        lambda o: not (isinstance(o, str) and (o in FIELDS or o == "shutdown"))))
    req = {} if draw(st.booleans()) and op is None else {"op": op}
    req.update(draw(st.dictionaries(st.text(max_size=10).filter(lambda k: k != "op"),
                                    json_values(2), max_size=3)))
    return _encode(req), _refusal(req, "unknown op")


@st.composite
def unknown_field(draw):
    op = draw(st.sampled_from(sorted(FIELDS) + ["shutdown"]))
    req = {"op": op, **(_harmless_fields(op) if op in FIELDS else {})}
    known = set(FIELDS.get(op, {})) | {"op"}
    extra = draw(st.dictionaries(st.text(max_size=20).filter(lambda k: k not in known),
                                 json_values(2), min_size=1, max_size=3))
    req.update(extra)
    return _encode(req), _refusal(req, "unknown field")


@st.composite
def bad_string(draw):
    """A string field with a NUL, a lone surrogate, or more than 4096 characters."""
    op = draw(ops.filter(lambda o: FIELDS[o]))
    req = {"op": op, **_harmless_fields(op)}
    field = draw(st.sampled_from(sorted(FIELDS[op])))
    text = draw(st.text(max_size=30))
    at = draw(st.integers(0, len(text)))
    bad = draw(st.sampled_from(["\0", "\ud800", "\udbff", "\udc00", "\udfff", "long"]))
    if bad == "long":
        text = (text or "1") * (4097 // len(text or "1") + 1)
    else:
        text = text[:at] + bad + text[at:]
    req[field] = text
    return _encode(req), ("err", errno.EINVAL, "not a valid string")


def _bad_minor():
    def valid(s: str) -> bool:
        return s.isascii() and s.isdecimal() and int(s) < MAX_MINORS
    return st.one_of(st.integers(max_value=-1), st.integers(min_value=MAX_MINORS),
                     st.text(max_size=12).filter(lambda s: not valid(s)),
                     st.sampled_from(["-1", "24", "1.5", "0x1", " 1", "1 ", "\u0663", "\uff11",
                                      "1_0", "+1", "٠"]))


@st.composite
def bad_minor(draw):
    """Schema-valid, reaching the engine, whose minor check refuses it (EINVAL)."""
    op = draw(ops.filter(lambda o: "minor" in FIELDS[o]))
    req = {"op": op, **_harmless_fields(op), "minor": draw(_bad_minor())}
    if "block_device" in req:
        req["block_device"] = draw(st.sampled_from(["disk0", "disk1", "disk2"]))
    return _encode(req), ("err", errno.EINVAL, "minor")


@st.composite
def harmless_valid(draw):
    """Valid requests that change nothing: info (whole, or one minor) and get-free-minor."""
    which = draw(st.sampled_from(["info", "info-null", "info-minor", "get-free-minor"]))
    if which == "info":
        return _encode({"op": "info"}), ("ok", "info")
    if which == "info-null":
        return _encode({"op": "info", "minor": None}), ("ok", "info")
    if which == "get-free-minor":
        return _encode({"op": "get-free-minor"}), ("ok", "free")
    n = draw(st.integers(0, MAX_MINORS - 1))
    minor = str(n) if draw(st.booleans()) else n
    expect = ("ok", ("device", n)) if n in (0, 1) else ("err", errno.ENOENT, None)
    return _encode({"op": "info", "minor": minor}), expect


requests_ = st.one_of(random_bytes(), broken_json(), deeply_nested(), wrong_type(),
                      unknown_op(), unknown_field(), bad_string(), bad_minor(),
                      harmless_valid())


@st.composite
def huge_line(draw):
    size = draw(st.integers(MAX_REQUEST + 1, 6 * MAX_REQUEST))
    head = draw(st.sampled_from([b"", b'{"op": "info", "minor": "', b"[" * 100]))
    return head + draw(st.sampled_from([b"x", b"[", b" ", b"\0", b"9"])) * size, \
        ("err", errno.EINVAL, str(MAX_REQUEST))


@st.composite
def sessions(draw):
    lines = draw(st.lists(requests_, min_size=1, max_size=5))
    ending = draw(st.sampled_from(["newline", "eof", "huge"]))
    if ending == "huge":
        lines.append(draw(huge_line()))
    elif ending == "eof" and lines[-1][0] == b"":
        ending = "newline"  # nothing before EOF is no request at all
    payload = b"".join(text + b"\n" for text, _ in lines)
    if ending == "eof":
        payload = payload[:-1]
    return payload, [expect for _, expect in lines]


def check_reply(d, reply: dict, expect: tuple) -> None:
    if expect[0] == "err":
        check_error(reply, expect[1], expect[2])
        return
    assert reply["ok"] is True, reply
    what = expect[1]
    if what == "info":
        assert reply["result"] == d.baseline.info
    elif what == "free":
        assert reply["result"] == 2
    else:
        assert reply["result"] == d.baseline.info["devices"][what[1]]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(session=sessions())
def test_fuzz_control_socket(server, session):
    """Whatever arrives, every line gets exactly one well-formed reply with the documented
    errno (EINVAL for bad input), the daemon keeps serving, and nothing changes."""
    payload, expects = session
    replies = exchange(server.ctl, payload)
    assert len(replies) == len(expects), (payload[:300], replies)
    for reply, expect in zip(replies, expects):
        check_reply(server, reply, expect)
    unchanged(server)


# -- many clients ---------------------------------------------------------------------------

def test_100_concurrent_clients(server):
    """100 clients at once, each asking ``info``: each gets the answer or a clean EAGAIN
    (too many connections, or a full listen backlog); the daemon stays up."""
    n = 100
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def client(i: int) -> None:
        barrier.wait()
        try:
            results[i] = ("ok", request(server.ctl, "info"))
        except SnapError as e:
            results[i] = ("err", e.errno, str(e))
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = ("exception", repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client hung"
    bad = [r for r in results  # EAGAIN never says "start the daemon": it is running
           if not (r[0] == "ok" and r[1] == server.baseline.info
                   or r[0] == "err" and r[1] == errno.EAGAIN and "start" not in r[2])]
    assert not bad, bad[:5]
    assert sum(r[0] == "ok" for r in results) >= MAX_CONNECTIONS // 2, results
    unchanged(server)


def open_served(path: str) -> tuple[socket.socket, object]:
    """A connection the server serves (one round trip done), and its reader. A slot that an
    earlier, closed connection has not yet given back makes the server refuse: try again."""
    def served() -> tuple[socket.socket, object] | None:
        s = connect(path)
        replies = s.makefile("rb")
        try:
            s.sendall(line({"op": "get-free-minor"}))
        except OSError:
            pass  # refused before reading: the reply is there
        reply = parse_reply(replies.readline())
        if reply["ok"]:
            assert reply["result"] == 2
            return s, replies
        check_error(reply, errno.EAGAIN)
        replies.close()
        s.close()
        return None
    return wait_for(served, timeout=10, what="the server to serve a new connection")


def test_connections_beyond_the_limit_are_refused(server):
    """64 connections are served at once; the 65th gets EAGAIN at once and is closed, and
    elioctl says so (exit EAGAIN). The 64 are undisturbed, and a freed slot is reused."""
    held: list[tuple[socket.socket, object]] = []  # (socket, its reader)
    try:
        for _ in range(MAX_CONNECTIONS):  # each is served, and keeps its slot: it stays open
            held.append(open_served(server.ctl))
        for _ in range(2):
            t0 = time.monotonic()
            with connect(server.ctl) as extra:
                data = extra.makefile("rb").read()
            assert time.monotonic() - t0 < 5
            assert data.count(b"\n") == 1, data
            check_error(parse_reply(data), errno.EAGAIN, "too many control connections")
        r = server.elioctl("info", check=False)
        assert r.returncode == errno.EAGAIN and r.stderr.count("\n") == 1, r
        assert r.stderr.startswith(f"elioctl: info: {os.strerror(errno.EAGAIN)}: ")
        for s, replies in held:
            s.sendall(line({"op": "info", "minor": 1}))
            assert parse_reply(replies.readline())["result"] == server.baseline.info["devices"][1]
        s, replies = held.pop()
        replies.close()  # the socket's fd stays open while its makefile() reader does
        s.close()
        wait_for(lambda: control_answers(server.ctl), timeout=10,
                 what="the freed slot to be reused")
    finally:
        for s, replies in held:
            replies.close()
            s.close()
    wait_for(lambda: server.elioctl("info", check=False).returncode == 0, timeout=10,
             what="elioctl to be served again")
    unchanged(server)


# -- per-connection timeout (in-process, small timeout) ---------------------------------------

TIMEOUT = 0.5  # seconds, instead of control.CONN_TIMEOUT's 30


@pytest.fixture
def local(tmp_path, monkeypatch):
    """A ControlServer on a real in-process Engine, with CONN_TIMEOUT = TIMEOUT and at
    most 3 connections."""
    monkeypatch.setattr(control, "CONN_TIMEOUT", TIMEOUT)
    monkeypatch.setattr(control, "MAX_CONNECTIONS", 3)
    disk = sparse_file(str(tmp_path / "disk0.img"), 4 * MiB)
    engine = Engine(str(tmp_path / "run"), [(disk, "disk0")])
    engine.start()
    path = str(tmp_path / "run" / "ctl.sock")
    srv = ControlServer(engine, path)
    try:
        srv.start()
        yield SimpleNamespace(path=path, engine=engine)
    finally:
        srv.stop()
        engine.close()


def read_until_closed(s: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it hangs up, and when it hung up."""
    data = b""
    while True:
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data, time.monotonic()
        data += chunk


def assert_timed_out(s: socket.socket, t0: float) -> None:
    data, t1 = read_until_closed(s)
    assert TIMEOUT * 0.9 <= t1 - t0 <= TIMEOUT + 3, f"disconnected after {t1 - t0:.2f} s"
    assert data.count(b"\n") == 1, data
    check_error(parse_reply(data), errno.ETIMEDOUT)


@pytest.mark.parametrize("sent", [b"", b'{"op": "in', b'{"op": "info"}'],
                         ids=["nothing", "half-a-line", "no-newline"])
def test_stalled_client_is_disconnected(local, sent):
    """Silent, half a line, or a whole request without its newline: after the timeout the
    server says ETIMEDOUT and hangs up."""
    with connect(local.path, timeout=TIMEOUT + 10) as s:
        t0 = time.monotonic()
        s.sendall(sent)
        assert_timed_out(s, t0)
    assert request(local.path, "get-free-minor") == 0


def test_trickling_client_is_disconnected(local):
    """One byte at a time, never a newline: the deadline is for the whole request, not
    for each read, so a slow-loris client cannot hold a slot for ever."""
    with connect(local.path, timeout=TIMEOUT + 10) as s:
        t0 = time.monotonic()
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(TIMEOUT / 10):
                try:
                    s.send(b" ")
                except OSError:
                    return
        t = threading.Thread(target=trickle)
        t.start()
        try:
            assert_timed_out(s, t0)
        finally:
            stop.set()
            t.join()


def test_timeout_is_per_request(local):
    """A connection that sends whole requests, each within the timeout, stays open for
    longer than the timeout."""
    with connect(local.path) as s:
        replies = s.makefile("rb")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 * TIMEOUT:
            s.sendall(line({"op": "get-free-minor"}))
            assert parse_reply(replies.readline()) == {"ok": True, "result": 0}
            time.sleep(TIMEOUT / 2)


def test_timed_out_connections_free_their_slots(local):
    """Stalled clients fill every slot (3 here): the next is refused with EAGAIN; once they
    time out, clients are served again."""
    t0 = time.monotonic()
    stalled = [connect(local.path, timeout=TIMEOUT + 10) for _ in range(3)]
    try:
        with pytest.raises(SnapError) as e:
            request(local.path, "info")
        assert e.value.errno == errno.EAGAIN
        for s in stalled:
            assert_timed_out(s, t0)
    finally:
        for s in stalled:
            s.close()
    wait_for(lambda: control_answers(local.path), timeout=5, what="a free slot")


# -- the client (client.request) against a daemon whose listen backlog is full ---------------

@pytest.fixture
def full_backlog(tmp_path):
    """A listening socket that accepts nobody yet, its backlog full: where a burst of
    elioctl finds a busy daemon. Yields (listener, path)."""
    path = str(tmp_path / "ctl.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    fillers = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)
        assert fillers, "the backlog never filled"
        yield listener, path
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_client_waits_for_a_busy_daemon(full_backlog):
    """EAGAIN on connect is a busy daemon: request() waits for room and gets its answer
    (it used to fail at once, telling the user to start the running daemon)."""
    listener, path = full_backlog

    def serve_late() -> None:
        time.sleep(0.3)  # not waiting for anything: the client must find the backlog full
        while True:  # the fillers first (FIFO), then the client, which sends a request
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(0.2)
                try:
                    if conn.recv(1 << 16):
                        conn.sendall(b'{"ok": true, "result": "served"}\n')
                        return
                except TimeoutError:
                    pass
    t = threading.Thread(target=serve_late, daemon=True)
    t.start()
    assert request(path, "info") == "served"
    t.join(5)


def test_client_gives_up_on_a_daemon_that_stays_busy(full_backlog, monkeypatch):
    monkeypatch.setattr(client, "CONN_TIMEOUT", 0.3)  # the client waits that long
    t0 = time.monotonic()
    with pytest.raises(SnapError) as e:
        request(full_backlog[1], "info")
    assert 0.3 <= time.monotonic() - t0 < 5
    assert e.value.errno == errno.EAGAIN
    assert "busy" in str(e.value) and "start" not in str(e.value), str(e.value)
