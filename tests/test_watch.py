"""elioctl watch and the control protocol's ``watch`` stream; expand-cow-file and
reconfigure-auto-expand as ops and sub-commands (INTERFACE.md §8, docs/control-protocol.md).

Most tests need no daemon: a real ``ControlServer`` serves a fake engine that has a real
``events.EventBus``, so a test emits exactly the events it wants, when it wants, and
``elioctl`` (a real process) or a raw socket watches them. The server's poll interval
and send timeout are shortened (monkeypatched) so that hang-ups and stalls show in
well under a second. The last test runs the real daemon.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from datetime import datetime
from types import SimpleNamespace

import pytest

from snapengine import client, control, events
from snapengine.arguments import minor_number
from snapengine.client import request
from snapengine.control import ControlServer
from snapengine.errors import SnapError
from snapengine.rundir import RunDir
from snapengine.watchcli import format_event, size
from tests.harness import BIN, daemon, run, sparse_file, wait_for

MiB = 1 << 20
MAX_MINORS = 24
POLL = 0.1  # seconds: control.WATCH_POLL in these tests, instead of 1
SEND_TIMEOUT = 0.5  # seconds: control.WATCH_SEND_TIMEOUT, instead of 10
LINE_TIMEOUT = 10.0  # seconds to wait for one line of elioctl watch's output
DROPPED = {"ok": False, "errno": errno.ENOBUFS,
           "message": "this watcher fell behind and was dropped"}


class FakeEngine:
    """What ControlServer needs of an Engine for these ops; records what it is asked."""

    def __init__(self) -> None:
        self.events = events.EventBus()
        self.limit = events.QUEUE_LIMIT  # queue size of the next watcher
        self.watchers: list[events.Watcher] = []  # every watcher it handed out
        self.calls: list[tuple] = []
        self.stopped = False

    def watch(self, minor=None) -> events.Watcher:
        if self.stopped:
            raise SnapError(errno.ESHUTDOWN, "the daemon is shutting down")
        n = None if minor is None else minor_number(minor, MAX_MINORS)
        w = self.events.subscribe(n, limit=self.limit)
        self.watchers.append(w)
        return w

    def expand_cow_file(self, minor, size_mb) -> None:
        self.calls.append(("expand_cow_file", minor, size_mb))

    def reconfigure_auto_expand(self, minor, step_mb, reserved_mb=None) -> None:
        self.calls.append(("reconfigure_auto_expand", minor, step_mb, reserved_mb))

    def get_free_minor(self) -> int:
        return 0


@pytest.fixture
def server(monkeypatch):
    """A ControlServer on a FakeEngine at RUN/ctl.sock; yields (run_dir, path, engine).
    At most 2 watchers (MAX_WATCHERS), so that the cap is cheap to reach."""
    monkeypatch.setattr(control, "WATCH_POLL", POLL)
    monkeypatch.setattr(control, "WATCH_SEND_TIMEOUT", SEND_TIMEOUT)
    monkeypatch.setattr(control, "MAX_WATCHERS", 2)
    run_dir = tempfile.mkdtemp(prefix="snapengine-watch-", dir="/tmp")  # short socket path
    engine = FakeEngine()
    path = RunDir(run_dir).ctl_socket
    srv = ControlServer(engine, path)
    srv.start()
    try:
        yield SimpleNamespace(run_dir=run_dir, path=path, engine=engine)
    finally:
        srv.stop()
        engine.events.close()
        os.rmdir(run_dir)


# -- helpers ------------------------------------------------------------------------------

def subscribed(engine: FakeEngine, n: int) -> None:
    """Wait until ``n`` watchers were handed out: events emitted from now reach them."""
    wait_for(lambda: len(engine.watchers) >= n, timeout=10, what=f"{n} watchers")


def raw_watch(path: str, **fields) -> tuple[socket.socket, object]:
    """A watch on a plain socket, its "watching" line read; (socket, reader)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(json.dumps({"op": "watch", **fields}).encode() + b"\n")
    replies = s.makefile("rb")
    assert json.loads(replies.readline()) == {"ok": True, "result": "watching"}
    return s, replies


def watch_place(path: str) -> socket.socket | None:
    """A new watch on a plain socket, or None if the server says EAGAIN (no place)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(b'{"op": "watch"}\n')
    reply = json.loads(s.makefile("rb").readline())
    if reply == {"ok": True, "result": "watching"}:
        return s
    s.close()
    assert reply["errno"] == errno.EAGAIN, reply
    return None


def read_until_closed(replies) -> list[dict]:
    out = []
    try:
        for line in replies:
            out.append(json.loads(line))
    except ConnectionResetError:
        pass
    return out


def collect(path: str, **kw) -> tuple[threading.Thread, dict]:
    """client.watch in a thread; the result dict gets "events" and, if any, "error"."""
    result: dict = {"events": []}

    def body() -> None:
        try:
            for event in client.watch(path, **kw):
                result["events"].append(event)
        except SnapError as e:
            result["error"] = e
    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, result


def emit_script(bus: events.EventBus) -> list[tuple]:
    """One event of every kind, for minor 4, with the fields of its kind."""
    script = [
        (4, "setup", 3, {}), (4, "dormant", 1, {}), (4, "active", 3, {}),
        (4, "expanded", 3, {"old_limit": 64 * MiB, "new_limit": 128 * MiB, "auto": True}),
        (4, "space-low", 3, {"free": 10 * MiB, "used": 120 * MiB, "limit": 128 * MiB}),
        (4, "failed", 3, {"error": -27, "tracking": True, "reason": "COW file full"}),
        (4, "transition-to-incremental", 2, {}), (4, "transition-to-snapshot", 3, {}),
        (4, "destroy", None, {}), (4, "reload", 5, {}), (4, "verified", 3, {}),
    ]
    assert sorted({kind for _, kind, _, _ in script}) == sorted(events.EVENTS)
    for minor, kind, state, fields in script:
        bus.emit(minor, kind, state, **fields)
    return script


def check_events(got: list[dict], script: list[tuple]) -> None:
    assert [(e["minor"], e["event"], e["state"]) for e in got] == \
        [(m, k, s) for m, k, s, _ in script]
    for e, (_, _, _, fields) in zip(got, script):
        assert datetime.fromisoformat(e["time"]).utcoffset().total_seconds() == 0, e
        assert {k: v for k, v in e.items() if k not in ("time", "minor", "event", "state")} \
            == fields


def elioctl(run_dir: str, *args: str) -> subprocess.CompletedProcess:
    return run([os.path.join(BIN, "elioctl"), "--run-dir", run_dir, *args], check=False)


def start_elioctl_watch(run_dir: str, *args: str) -> tuple[subprocess.Popen, queue.Queue]:
    """``elioctl watch ARGS`` in the background; its stdout lines go to the queue (None
    at its end)."""
    proc = subprocess.Popen([os.path.join(BIN, "elioctl"), "--run-dir", run_dir, "watch",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)
    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# -- the stream ----------------------------------------------------------------------------

def test_events_arrive_in_order_with_their_fields(server):
    """Every kind of event, in order, with time (ISO 8601, UTC) and the fields of its
    kind; the bus closing (the daemon stops) ends the client's generator."""
    t, result = collect(server.path)
    subscribed(server.engine, 1)
    script = emit_script(server.engine.events)
    server.engine.events.close()
    t.join(10)
    assert not t.is_alive() and "error" not in result
    check_events(result["events"], script)


def test_stream_lines_and_end(server):
    """On the wire: "watching", {"event": ...} lines, then "end" and the hang-up."""
    s, replies = raw_watch(server.path)
    with s:
        server.engine.events.emit(3, "setup", 3)
        server.engine.events.close()
        lines = read_until_closed(replies)
    assert [set(x) for x in lines] == [{"event"}, {"ok", "result"}]
    assert lines[0]["event"]["event"] == "setup"
    assert lines[1] == {"ok": True, "result": "end"}


def test_watch_of_one_minor_filters(server):
    t, result = collect(server.path, minor="4")  # a string, as elioctl sends it
    subscribed(server.engine, 1)
    for minor in (3, 4, 5, 4, 0):
        server.engine.events.emit(minor, "setup", 3, n=minor)
    server.engine.events.close()
    t.join(10)
    assert [e["minor"] for e in result["events"]] == [4, 4]


@pytest.mark.parametrize("minor, err", [("x", errno.EINVAL), (99, errno.EINVAL),
                                        ("-1", errno.EINVAL), (True, errno.EINVAL),
                                        (1.5, errno.EINVAL)],
                         ids=["not-a-number", "out-of-range", "negative", "bool", "float"])
def test_watch_checks_the_minor(server, minor, err):
    """A refused watch is an ordinary error line; the connection goes on serving."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(server.path)
        replies = s.makefile("rb")
        s.sendall(json.dumps({"op": "watch", "minor": minor}).encode() + b"\n")
        reply = json.loads(replies.readline())
        assert reply["ok"] is False and reply["errno"] == err, reply
        s.sendall(b'{"op": "get-free-minor"}\n')
        assert json.loads(replies.readline()) == {"ok": True, "result": 0}
    assert server.engine.watchers == []


def test_watch_while_stopping_is_eshutdown(server):
    server.engine.stopped = True
    t, result = collect(server.path)
    t.join(10)
    assert result["error"].errno == errno.ESHUTDOWN and result["events"] == []


def test_watcher_cap_and_hang_up(server):
    """At most MAX_WATCHERS (2 here) watch at once: the next gets EAGAIN while ordinary
    requests are served; one that hangs up frees its place within a poll or two."""
    first, _ = raw_watch(server.path)
    second, _ = raw_watch(server.path)
    with second:
        with pytest.raises(SnapError) as e:
            next(client.watch(server.path))
        assert e.value.errno == errno.EAGAIN
        assert request(server.path, "get-free-minor") == 0
        t0 = time.monotonic()
        first.close()
        wait_for(lambda: watch_place(server.path), timeout=5, what="a free watcher place")
        assert time.monotonic() - t0 < 5 * POLL + 2


def test_half_closed_client_still_watches(server):
    """shutdown(SHUT_WR) after the request, as socat does: not a hang-up."""
    s, replies = raw_watch(server.path)
    with s:
        s.shutdown(socket.SHUT_WR)
        time.sleep(5 * POLL)  # several polls see the half-close
        server.engine.events.emit(1, "dormant", 0)
        assert json.loads(replies.readline())["event"]["event"] == "dormant"


def test_slow_watcher_is_dropped_and_nobody_waits(server):
    """A watcher that does not read, with a queue of 8: 10000 events are emitted at full
    speed all the same; it gets the events before the overflow, without a gap, then the
    ENOBUFS line. A watcher of another minor and ordinary requests are not disturbed."""
    other = collect(server.path, minor=7)
    subscribed(server.engine, 1)
    server.engine.limit = 8
    slow, replies = raw_watch(server.path)
    with slow:
        t0 = time.monotonic()
        for i in range(10000):
            server.engine.events.emit(1, "space-low", 3, free=i, used=i, limit=i)
        elapsed = time.monotonic() - t0
        assert elapsed < 5, f"10000 emits took {elapsed:.1f} s"
        assert server.engine.watchers[1].dropped
        lines = read_until_closed(replies)
    assert lines[-1] == DROPPED
    seen = [x["event"]["free"] for x in lines[:-1]]
    assert seen == list(range(len(seen))) and len(seen) < 10000, seen  # a prefix, no gap
    assert request(server.path, "get-free-minor") == 0
    server.engine.events.emit(7, "setup", 3)
    server.engine.events.close()
    other[0].join(10)
    assert [e["event"] for e in other[1]["events"]] == ["setup"]


def test_watcher_that_stops_reading_is_hung_up(server):
    """A client whose socket buffer is full: after WATCH_SEND_TIMEOUT the server ends
    the watch (its place is free again) though the client neither reads nor closes."""
    server.engine.limit = 100000  # never dropped: the send timeout must end it
    stuck, _ = raw_watch(server.path)
    second, _ = raw_watch(server.path)
    with stuck, second:
        big = "x" * 60000
        t0 = time.monotonic()
        for _ in range(300):  # 18 MB: far more than a Unix socket buffers
            server.engine.events.emit(2, "failed", 3, error=-5, tracking=False, reason=big)
        assert time.monotonic() - t0 < 5
        wait_for(lambda: watch_place(server.path), timeout=SEND_TIMEOUT + 5,
                 what="the stuck watcher's place")
        assert not server.engine.watchers[0].dropped


# -- the new ops ---------------------------------------------------------------------------

def test_expand_and_auto_expand_ops(server):
    assert request(server.path, "expand-cow-file", minor="4", size_mb="64") is None
    assert request(server.path, "expand-cow-file", minor=4, size_mb=64) is None
    request(server.path, "reconfigure-auto-expand", minor="4", step_mb="16")
    request(server.path, "reconfigure-auto-expand", minor="4", step_mb=16, reserved_mb=None)
    request(server.path, "reconfigure-auto-expand", minor="4", step_mb="0", reserved_mb="512")
    assert server.engine.calls == [
        ("expand_cow_file", "4", "64"), ("expand_cow_file", 4, 64),
        ("reconfigure_auto_expand", "4", "16", None),
        ("reconfigure_auto_expand", "4", 16, None),
        ("reconfigure_auto_expand", "4", "0", "512")]


@pytest.mark.parametrize("op, fields, text", [
    ("expand-cow-file", {"minor": 4}, "field 'size_mb' is missing"),
    ("expand-cow-file", {"size_mb": 4}, "field 'minor' is missing"),
    ("expand-cow-file", {"minor": 4, "size_mb": None}, "field 'size_mb' has the wrong type"),
    ("expand-cow-file", {"minor": 4, "size_mb": 1.5}, "field 'size_mb' has the wrong type"),
    ("expand-cow-file", {"minor": 4, "size_mb": 4, "step_mb": 1}, "unknown field 'step_mb'"),
    ("reconfigure-auto-expand", {"minor": 4}, "field 'step_mb' is missing"),
    ("reconfigure-auto-expand", {"minor": 4, "step_mb": True}, "has the wrong type"),
    ("reconfigure-auto-expand", {"minor": 4, "step_mb": 1, "reserved_mb": [1]},
     "field 'reserved_mb' has the wrong type"),  # lists: only a group command's fields
    ("watch", {"minor": 4, "json": True}, "unknown field 'json'"),
], ids=["no-size", "no-minor", "null-size", "float-size", "foreign-field", "no-step",
        "bool-step", "list-reserved", "watch-unknown-field"])
def test_schema_of_the_new_ops(server, op, fields, text):
    with pytest.raises(SnapError) as e:
        request(server.path, op, **fields)
    assert e.value.errno == errno.EINVAL and text in e.value.detail, e.value
    assert server.engine.calls == [] and server.engine.watchers == []


def test_cli_expand_and_auto_expand(server):
    for args in (["expand-cow-file", "64", "4"],
                 ["reconfigure-auto-expand", "16", "4"],
                 ["reconfigure-auto-expand", "-r", "512", "16", "3"]):
        r = elioctl(server.run_dir, *args)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), args
    assert server.engine.calls == [("expand_cow_file", "4", "64"),
                                   ("reconfigure_auto_expand", "4", "16", None),
                                   ("reconfigure_auto_expand", "3", "16", "512")]


USAGE = {
    "expand-no-args": ["expand-cow-file"],
    "expand-no-minor": ["expand-cow-file", "64"],
    "expand-extra": ["expand-cow-file", "64", "4", "5"],
    "auto-no-args": ["reconfigure-auto-expand"],
    "auto-no-minor": ["reconfigure-auto-expand", "16"],
    "auto-r-no-value": ["reconfigure-auto-expand", "16", "4", "-r"],
    "watch-two-minors": ["watch", "1", "2"],
    "watch-unknown-option": ["watch", "--yaml"],
}


@pytest.mark.parametrize("args", USAGE.values(), ids=USAGE.keys())
def test_cli_usage_errors(tmp_path, args):
    """EINVAL and one line, before any daemon is asked (none runs here)."""
    r = elioctl(str(tmp_path), *args)
    assert r.returncode == errno.EINVAL and r.stdout == "", r
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"elioctl: {args[0]}: {os.strerror(errno.EINVAL)}: ")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command, words", [
    ("expand-cow-file", ["<MB>", "<minor>", "ENOSPC", "incremental"]),
    ("reconfigure-auto-expand", ["-r <reserved MB>", "<step MB>", "0 turns it off"]),
    ("watch", ["--json", "<minor>", "ENOBUFS", "SIGINT", *events.EVENTS]),
])
def test_cli_help(tmp_path, command, words):
    r = elioctl(str(tmp_path), command, "--help")
    assert r.returncode == 0 and r.stderr == "", r
    assert r.stdout.startswith(f"usage: elioctl {command} ")
    for word in words:
        assert word in r.stdout, f"{word!r} not in the help of {command}"
    listing = elioctl(str(tmp_path), "help").stdout
    assert re.search(rf"^\s+{re.escape(command)}(\s|$)", listing, re.M)


# -- elioctl watch ---------------------------------------------------------------------------

def test_cli_watch_json_until_sigint(server):
    """--json: one object per line, each as soon as it is emitted; SIGINT exits 0."""
    proc, lines = start_elioctl_watch(server.run_dir, "--json")
    try:
        subscribed(server.engine, 1)
        for i, kind in enumerate(["setup", "dormant", "active"]):
            server.engine.events.emit(i, kind, 3)
            event = json.loads(lines.get(timeout=LINE_TIMEOUT))  # flushed at once
            assert (event["minor"], event["event"], event["state"]) == (i, kind, 3)
            assert set(event) == {"time", "minor", "event", "state"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert lines.get(timeout=LINE_TIMEOUT) is None and proc.stderr.read() == ""
    finally:
        stop_process(proc)


def test_cli_watch_ends_when_the_daemon_stops(server):
    """Readable lines; the bus closing (the "end" line) exits 0."""
    proc, lines = start_elioctl_watch(server.run_dir, "4")
    try:
        subscribed(server.engine, 1)
        server.engine.events.emit(4, "failed", 3, error=-27, tracking=True, reason="full")
        server.engine.events.emit(5, "setup", 3)  # another minor: not shown
        server.engine.events.close()
        assert proc.wait(10) == 0
        out = [lines.get(timeout=LINE_TIMEOUT) for _ in range(2)]
        assert out[1] is None, out
        assert re.fullmatch(r"\S+ minor 4 failed \(state 3\): error -27, change list kept "
                            r"\(tracking\): full\n", out[0]), out
        assert proc.stderr.read() == ""
    finally:
        stop_process(proc)


@pytest.mark.parametrize("reads", [True, False], ids=["closed", "reset"])
def test_cli_watch_ends_when_the_connection_closes(tmp_path, reads):
    """A daemon that goes away without an "end" line (killed): what it sent is printed,
    then exit 0, whether the connection is closed or reset (the request left unread)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(RunDir(str(tmp_path)).ctl_socket)
    listener.listen(1)
    event = {"time": T, "minor": 1, "event": "setup", "state": 3}

    def dies() -> None:
        conn, _ = listener.accept()
        with conn:
            if reads:
                conn.makefile("rb").readline()
            else:
                time.sleep(0.5)  # the request arrives, and stays unread
            conn.sendall(b'{"ok": true, "result": "watching"}\n'
                         + json.dumps({"event": event}).encode() + b"\n")
    t = threading.Thread(target=dies, daemon=True)
    t.start()
    try:
        r = elioctl(str(tmp_path), "watch", "--json")
    finally:
        t.join(10)
        listener.close()
    assert (r.returncode, r.stderr) == (0, ""), r
    assert [json.loads(x) for x in r.stdout.splitlines()] == [event]


def test_cli_watch_dropped_exits_enobufs(server):
    proc, lines = start_elioctl_watch(server.run_dir, "--json")
    try:
        subscribed(server.engine, 1)
        w = server.engine.watchers[0]
        w.dropped = True  # as EventBus does to a watcher whose queue overflows
        server.engine.events.unsubscribe(w)
        assert proc.wait(10) == errno.ENOBUFS
        assert proc.stderr.read() == (f"elioctl: watch: {os.strerror(errno.ENOBUFS)}: "
                                      "this watcher fell behind and was dropped\n")
    finally:
        stop_process(proc)


def test_cli_watch_bad_minor(server):
    r = elioctl(server.run_dir, "watch", "99")
    assert r.returncode == errno.EINVAL and r.stdout == "" and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"elioctl: watch: {os.strerror(errno.EINVAL)}: minor 99")


# -- the readable format -------------------------------------------------------------------

T = "2026-12-03T14:00:00.123+00:00"
LINES = {
    "failed-kept": ({"event": "failed", "state": 3, "error": -27, "tracking": True,
                     "reason": "COW file /c reached its limit"},
                    f"{T} minor 4 failed (state 3): error -27, change list kept (tracking): "
                    "COW file /c reached its limit"),
    "failed-lost": ({"event": "failed", "state": 3, "error": -5, "tracking": False,
                     "reason": "cannot write /c"},
                    f"{T} minor 4 failed (state 3): error -5, change list lost (the next "
                    "backup must be full): cannot write /c"),
    "expanded-auto": ({"event": "expanded", "state": 3, "old_limit": 64 * MiB,
                       "new_limit": 128 * MiB, "auto": True},
                      f"{T} minor 4 expanded (state 3): limit 64 MiB -> 128 MiB (auto-expand)"),
    "expanded-by-hand": ({"event": "expanded", "state": 1, "old_limit": 3 * MiB // 2,
                          "new_limit": 2 * MiB, "auto": False},
                         f"{T} minor 4 expanded (state 1): limit 1.5 MiB -> 2 MiB "
                         "(expand-cow-file)"),
    "space-low": ({"event": "space-low", "state": 3, "free": 100 * MiB, "used": 58 * MiB,
                   "limit": 64 * MiB},
                  f"{T} minor 4 space-low (state 3): 100 MiB free on the COW file's file "
                  "system, 58 MiB used of the 64 MiB limit"),
    "space-low-free-unknown": ({"event": "space-low", "state": 3, "free": -1, "used": 0,
                                "limit": MiB},
                               f"{T} minor 4 space-low (state 3): unknown free on the COW "
                               "file's file system, 0 MiB used of the 1 MiB limit"),
    "destroy": ({"event": "destroy", "state": None}, f"{T} minor 4 destroy (gone)"),
    "future-kind": ({"event": "frozen", "state": 3, "mount": "/mnt"},
                    f'{T} minor 4 frozen (state 3): mount="/mnt"'),
}


@pytest.mark.parametrize("event, text", LINES.values(), ids=LINES.keys())
def test_format_event(event, text):
    assert format_event({"time": T, "minor": 4, **event}) == text


@pytest.mark.parametrize("kind", events.EVENTS)
def test_format_every_kind(kind):
    """Every kind the daemon sends has a line; the plain ones have nothing after the state."""
    line = format_event({"time": T, "minor": 4, "event": kind, "state": 2})
    assert line.startswith(f"{T} minor 4 {kind} (state 2)")
    if kind not in ("failed", "expanded", "space-low"):
        assert line == f"{T} minor 4 {kind} (state 2)"


@pytest.mark.parametrize("value, text", [(0, "0 MiB"), (MiB, "1 MiB"), (MiB + MiB // 10, "1.1 MiB"),
                                         (-1, "unknown"), (None, "unknown"), (True, "unknown")])
def test_size(value, text):
    assert size(value) == text


def finish_watch(proc, lines, seen: list) -> None:
    """The daemon has stopped: elioctl watch exits 0; the events it printed last join
    ``seen``."""
    try:
        assert proc.wait(30) == 0, proc.stderr.read()
        while (line := lines.get(timeout=LINE_TIMEOUT)) is not None:
            seen.append(json.loads(line))
    finally:
        stop_process(proc)


# -- through the real daemon -----------------------------------------------------------------

def test_daemon_session_events(tmp_path):
    """elioctl watch --json against snapengine serve: a backup cycle of minor 0 gives
    setup (3), transition-to-incremental (2), transition-to-snapshot (3), destroy (gone),
    in that order, with nothing else for minor 0; the daemon stopping ends it with 0.
    Minor 5 (disk1) is set up and destroyed until its events show: then the watcher is
    surely subscribed (nothing tells when elioctl's watch request has been read)."""
    disks = [(sparse_file(str(tmp_path / f"disk{i}.img"), 16 * MiB), f"disk{i}")
             for i in range(2)]
    with daemon(str(tmp_path / "run"), disks) as d:
        proc, lines = start_elioctl_watch(d.run_dir, "--json")
        try:
            seen = warm_up(d, lines, tmp_path)
            d.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow1"), "0")
            d.elioctl("transition-to-incremental", "0")
            d.elioctl("transition-to-snapshot", str(tmp_path / "cow2"), "0")
            d.elioctl("destroy", "0")
            for _ in range(4):
                seen.append(json.loads(lines.get(timeout=LINE_TIMEOUT)))
        except BaseException:
            stop_process(proc)
            raise
    finish_watch(proc, lines, seen)
    mine = [e for e in seen if e["minor"] == 0]
    assert [(e["event"], e["state"]) for e in mine] == [
        ("setup", 3), ("transition-to-incremental", 2), ("transition-to-snapshot", 3),
        ("destroy", None)], seen
    for e in mine:
        assert set(e) == {"time", "minor", "event", "state"}, e
        assert datetime.fromisoformat(e["time"]).utcoffset().total_seconds() == 0
    assert [e["time"] for e in mine] == sorted(e["time"] for e in mine)
    assert {e["minor"] for e in seen} <= {0, 5}


def warm_up(d, lines: queue.Queue, tmp_path) -> list[dict]:
    """Set up and destroy minor 5 until elioctl watch prints something; return what it
    printed (late lines of minor 5 may follow later)."""
    for i in range(20):
        d.elioctl("setup-snapshot", "disk1", str(tmp_path / f"warm{i}"), "5")
        d.elioctl("destroy", "5")
        try:
            return [json.loads(lines.get(timeout=1))]
        except queue.Empty:
            continue
    raise AssertionError("elioctl watch printed nothing")


# -- COW space events through the real daemon ----------------------------------------------

KiB = 1 << 10
CLUSTER = 64 * KiB  # a first touch saves its whole 64 KiB clusters (docs/design.md)
LOW_SHARE = 0.9  # "data past 90 % of the limit" (INTERFACE.md §8)


def next_event(lines: queue.Queue, seen: list[dict], minor: int, kind: str) -> dict:
    """Read elioctl watch's lines (each kept in ``seen``) until the next event of
    ``minor``, within LINE_TIMEOUT; it must be of ``kind``."""
    deadline = time.monotonic() + LINE_TIMEOUT
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no {kind!r} event of minor {minor} within "
                                 f"{LINE_TIMEOUT:.0f} s; seen: {seen}") from None
        assert line is not None, f"elioctl watch ended before {kind!r}; seen: {seen}"
        seen.append(json.loads(line))
        if seen[-1]["minor"] == minor:
            assert seen[-1]["event"] == kind, f"expected {kind!r}; seen: {seen}"
            return seen[-1]


def test_daemon_space_events(tmp_path):
    """elioctl watch --json against snapengine serve, minor 0 on a 16 MiB origin full of
    data, ``-f 1``: setup (3); with ``reconfigure-auto-expand 1 0`` a 2 MiB rewrite at
    half a cluster saves 33 clusters (2 MiB + 64 KiB), over the 1 MiB limit, so the
    limit is raised to 3 MiB: expanded (auto; one event, or a chain of them, by whole
    1 MiB steps); auto-expand off (``0 0``), a rewrite that brings the data to 2816 KiB,
    past 90 % of 3 MiB: space-low (free, used, limit); one more that does not fit:
    failed (-27, change list kept, the reason names the limit), the writes all
    succeeding; transition-to-incremental (2); our only client leaves: dormant (0);
    destroy (gone). Nothing else for minor 0: setup makes it active at once, so our
    connection brings no "active". Minor 5's warm-up (see warm_up) gives setup/destroy
    pairs only (the first may lack its setup: the watch began between the two). Each
    step waits for its event, with a deadline."""
    import nbd

    disk0 = str(tmp_path / "disk0.img")
    with open(disk0, "wb") as f:
        f.write(os.urandom(16 * MiB))  # written before the snapshot: first touches save it
    disks = [(disk0, "disk0"), (sparse_file(str(tmp_path / "disk1.img"), 16 * MiB), "disk1")]
    first = 2 * MiB + CLUSTER  # saved by the 2 MiB rewrite at CLUSTER // 2
    limit = 3 * MiB  # 1 MiB raised by whole 1 MiB steps until ``first`` fits
    low = (int(LOW_SHARE * limit) // CLUSTER + 1) * CLUSTER  # past 90 %, whole clusters
    with daemon(str(tmp_path / "run"), disks) as d:
        proc, lines = start_elioctl_watch(d.run_dir, "--json")
        try:
            seen = warm_up(d, lines, tmp_path)
            d.elioctl("setup-snapshot", "-f", "1", "disk0", str(tmp_path / "cow"), "0")
            next_event(lines, seen, 0, "setup")
            d.elioctl("reconfigure-auto-expand", "1", "0")
            h = nbd.NBD()
            h.connect_uri(d.uri("disk0"))
            h.pwrite(os.urandom(2 * MiB), CLUSTER // 2)
            h.flush()
            grown = [next_event(lines, seen, 0, "expanded")]
            while grown[-1]["new_limit"] < limit:
                grown.append(next_event(lines, seen, 0, "expanded"))
            assert d.info(0)["fallocate"] == limit
            d.elioctl("reconfigure-auto-expand", "0", "0")
            h.pwrite(os.urandom(low - first), first)
            h.flush()
            space_low = next_event(lines, seen, 0, "space-low")
            h.pwrite(os.urandom(limit - low + CLUSTER), low)  # the writes never fail
            h.flush()
            failed = next_event(lines, seen, 0, "failed")
            d.elioctl("transition-to-incremental", "0")
            next_event(lines, seen, 0, "transition-to-incremental")
            h.shutdown()
            next_event(lines, seen, 0, "dormant")
            d.elioctl("destroy", "0")
            next_event(lines, seen, 0, "destroy")
        except BaseException:
            stop_process(proc)
            raise
    finish_watch(proc, lines, seen)
    mine = [e for e in seen if e["minor"] == 0]
    assert [(e["event"], e["state"]) for e in mine] == \
        [("setup", 3)] + [("expanded", 3)] * len(grown) + [
            ("space-low", 3), ("failed", 3), ("transition-to-incremental", 2),
            ("dormant", 0), ("destroy", None)], seen
    limits = [MiB] + [e["new_limit"] for e in grown]
    for e, old in zip(grown, limits):
        assert set(e) == {"time", "minor", "event", "state", "old_limit", "new_limit", "auto"}
        assert e["old_limit"] == old and e["auto"] is True, grown
        assert e["new_limit"] > old and (e["new_limit"] - old) % MiB == 0, grown
    assert limits[-1] == limit, grown
    assert set(space_low) == {"time", "minor", "event", "state", "free", "used", "limit"}
    assert (space_low["used"], space_low["limit"]) == (low, limit), space_low
    assert isinstance(space_low["free"], int) and space_low["free"] > 0, space_low
    assert set(failed) == {"time", "minor", "event", "state", "error", "tracking", "reason"}
    assert (failed["error"], failed["tracking"]) == (-errno.EFBIG, True), failed
    assert "limit" in failed["reason"], failed
    for e in seen:
        assert {"time", "minor", "event", "state"} <= set(e), e
        assert datetime.fromisoformat(e["time"]).utcoffset().total_seconds() == 0, e
    assert [e["time"] for e in mine] == sorted(e["time"] for e in mine)
    warm = [(e["event"], e["state"]) for e in seen if e["minor"] == 5]
    warm = warm[1:] if warm[:1] == [("destroy", None)] else warm
    assert warm == [("setup", 3), ("destroy", None)] * (len(warm) // 2), seen
    assert {e["minor"] for e in seen} == {0, 5}
