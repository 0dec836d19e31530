"""The control protocol: JSON lines over the Unix socket ``RUN/ctl.sock``.

One request per line, one response per line (docs/control-protocol.md)::

    -> {"op": "setup-snapshot", "minor": "4", "block_device": "/srv/disk0.img", ...}
    <- {"ok": true, "result": null}
    <- {"ok": false, "errno": 16, "message": "Device or resource busy: minor 4 is ..."}

except ``watch``, which turns its connection into a stream of events, one per line::

    -> {"op": "watch", "minor": 4}
    <- {"ok": true, "result": "watching"}
    <- {"event": {"time": "...", "minor": 4, "event": "dormant", "state": 1}}
    <- {"ok": true, "result": "end"}          (or an ENOBUFS error: dropped)

The server checks the peer (SO_PEERCRED: root or the daemon's uid), the size of a
request, its JSON, its op and the type of every field, and gives each connection a
deadline. Anything wrong is answered with EINVAL (or EACCES for a stranger) and never
reaches the engine; the server never dies of a request.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
from typing import Any, Callable

from .errors import SnapError

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024  # bytes in one request line
CONN_TIMEOUT = 30.0  # seconds a client may take to send one whole request
MAX_CONNECTIONS = 64  # connections served at once; more are refused with EAGAIN
MAX_DEPTH = 1  # a request is a flat object: no nested objects; lists only in Many fields
MAX_WATCHERS = 16  # watch connections at once (each also holds a connection slot); more: EAGAIN
WATCH_POLL = 1.0  # seconds between looks at a quiet watcher's peer (gone?) and drop flag
WATCH_SEND_TIMEOUT = 10.0  # seconds one event may take to send; longer ends the watch
DROPPED = "this watcher fell behind and was dropped"  # the ENOBUFS message

STR = (str,)
MINOR = (str, int)  # the engine checks "not a number" itself, with EINVAL
MB_FIELD = (str, int)  # a required size in MB; the engine checks the number
OPT_MB = MB_FIELD + (type(None),)
OPT_MINOR = MINOR + (type(None),)
MAX_PARTS = 64  # parts of one group command (a list field's values)


class Many(tuple):
    """A field that takes these types, or a list of them: one value per part of a group
    command (INTERFACE §9; group.columns). The only nesting a request may have."""


STRS, MINORS = Many(STR), Many(MINOR)

# op -> (engine method name, {field: accepted types}, required fields)
OPS: dict[str, tuple[str, dict[str, tuple], tuple[str, ...]]] = {
    "setup-snapshot": ("setup_snapshot", {"block_device": STRS, "block_device_path": STRS,
                                          "cow_file": STRS, "minor": MINORS,
                                          "cache_mb": OPT_MB, "fallocate_mb": OPT_MB,
                                          "freeze": STRS},
                       ("block_device", "cow_file", "minor")),
    "reload-snapshot": ("reload_snapshot", {"block_device": STR, "block_device_path": STR,
                                            "cow_file": STR, "minor": MINOR, "cache_mb": OPT_MB},
                        ("block_device", "cow_file", "minor")),
    "reload-incremental": ("reload_incremental", {"block_device": STR, "block_device_path": STR,
                                                  "cow_file": STR, "minor": MINOR,
                                                  "cache_mb": OPT_MB},
                           ("block_device", "cow_file", "minor")),
    "transition-to-incremental": ("transition_to_incremental", {"minor": MINOR}, ("minor",)),
    "transition-to-snapshot": ("transition_to_snapshot", {"cow_file": STRS, "minor": MINORS,
                                                          "fallocate_mb": OPT_MB,
                                                          "freeze": STRS},
                               ("cow_file", "minor")),
    "destroy": ("destroy", {"minor": MINOR}, ("minor",)),
    "reconfigure": ("reconfigure", {"minor": MINOR, "cache_mb": OPT_MB}, ("minor",)),
    "expand-cow-file": ("expand_cow_file", {"minor": MINOR, "size_mb": MB_FIELD},
                        ("minor", "size_mb")),
    "reconfigure-auto-expand": ("reconfigure_auto_expand", {"minor": MINOR, "step_mb": MB_FIELD,
                                                            "reserved_mb": OPT_MB},
                                ("minor", "step_mb")),
    "info": ("info", {"minor": OPT_MINOR}, ()),
    "watch": ("watch", {"minor": OPT_MINOR}, ()),  # a stream: ControlServer._watch
    "get-free-minor": ("get_free_minor", {}, ()),
    "shutdown": ("shutdown", {}, ()),  # for `snapengine serve` on SIGTERM; not in elioctl
}


def _depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a JSON value (a scalar is 0, a flat object 1), counted level by
    level and only up to ``limit`` + 1: no nesting json.loads accepts (up to ~1000 levels)
    can make it raise RecursionError."""
    depth, level = 0, [value]
    while depth <= limit:
        containers = [v for v in level if isinstance(v, (dict, list))]
        if not containers:
            return depth
        depth += 1
        level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]
    return depth


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different ({"op": "info", "op": "destroy"} is not
    a request we dare guess the meaning of)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate keys")
    return obj


def _valid_string(value: str) -> bool:
    """At most 4096 characters, no NUL, and a valid file name: a lone surrogate such as
    "\\ud800" cannot be encoded (os functions would raise UnicodeEncodeError); escaped
    bytes "\\udc80".."\\udcff" (elioctl's non-UTF-8 arguments) can."""
    if len(value) > 4096 or "\0" in value:
        return False
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """Check one request line against the schema; return (op, arguments)."""
    try:
        req = json.loads(line, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:
        raise SnapError(errno.EINVAL, f"request is not JSON: {str(e)[:100]}")
    if not isinstance(req, dict) or _depth(req, MAX_DEPTH + 1) > MAX_DEPTH + 1:
        raise SnapError(errno.EINVAL, "request must be a flat JSON object")
    op = req.pop("op", None)
    if not isinstance(op, str) or op not in OPS:
        raise SnapError(errno.EINVAL, f"unknown op {str(op)[:64]!r}")
    _, fields, required = OPS[op]
    for key, value in req.items():
        if key not in fields:
            raise SnapError(errno.EINVAL, f"{op}: unknown field {key[:64]!r}")
        _check_value(op, key, value, fields[key])
    for key in required:
        if key not in req:
            raise SnapError(errno.EINVAL, f"{op}: field {key!r} is missing")
    return op, req


def _check_value(op: str, key: str, value: Any, types: tuple) -> None:
    """``value`` is one of ``types`` (or, for a Many field, a list of 1..MAX_PARTS of
    them) and every string in it is valid; else EINVAL."""
    values = value if isinstance(types, Many) and isinstance(value, list) else [value]
    if not 0 < len(values) <= MAX_PARTS:
        raise SnapError(errno.EINVAL, f"{op}: field {key!r} needs 1 to {MAX_PARTS} values")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, tuple(types)):
            raise SnapError(errno.EINVAL, f"{op}: field {key!r} has the wrong type")
        if isinstance(v, str) and not _valid_string(v):
            raise SnapError(errno.EINVAL, f"{op}: field {key!r} is not a valid string")


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class ControlServer:
    """Serves control requests for ``engine`` on a Unix socket, one thread per client.

    A ``watch`` keeps its connection (and its thread and connection slot) for as long as it
    streams; at most MAX_WATCHERS do at once, so watchers leave MAX_CONNECTIONS -
    MAX_WATCHERS slots to ordinary requests whatever they do. The engine never waits for a
    watcher: events reach it through a bounded queue (events.EventBus)."""

    def __init__(self, engine: Any, path: str) -> None:
        self.engine = engine
        self.path = path
        self._sock: socket.socket | None = None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._watch_slots = threading.BoundedSemaphore(MAX_WATCHERS)  # a subset of _slots
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)  # before listen(): nobody can connect in between
            sock.listen(32)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()
        log.info("control socket %s ready", self.path)

    def stop(self) -> None:
        self._stopping = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping:
                    return
                continue
            if not self._slots.acquire(blocking=False):
                self._refuse(conn, SnapError(errno.EAGAIN, "too many control connections"))
                continue
            threading.Thread(target=self._serve, args=(conn,), name="control-client",
                             daemon=True).start()

    def _refuse(self, conn: socket.socket, e: SnapError) -> None:
        """Say why and hang up, without reading: the client reads the answer anyway."""
        try:
            conn.settimeout(1.0)
            conn.sendall(encode_error(e))
        except OSError:
            pass
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            uid = peer_uid(conn)
            if uid not in (0, os.getuid()):
                log.warning("control: refused a client with uid %d", uid)
                self._refuse(conn, SnapError(errno.EACCES, f"uid {uid} may not control "
                                             "snapengine (root or the daemon's user only)"))
                return
            while True:
                line = _read_request(conn, time.monotonic() + CONN_TIMEOUT)
                if line is None or not self._answer(conn, line):
                    return
        except SnapError as e:  # too long, or too slow
            try:
                conn.sendall(encode_error(e))
            except OSError:
                pass
        except OSError:
            pass  # the client went away
        finally:
            conn.close()
            self._slots.release()

    def _answer(self, conn: socket.socket, line: bytes) -> bool:
        """Answer one request line on ``conn``; False once the connection is done (a
        watch that streamed ends it)."""
        try:
            op, args = parse_request(line)
        except SnapError as e:
            conn.sendall(encode_error(e))
            return True
        if op == "watch":
            return self._watch(conn, args)
        conn.sendall(self._call(op, args))
        return True

    def _call(self, op: str, args: dict[str, Any]) -> bytes:
        """The reply to a checked request (any op but ``watch``); never raises."""
        try:
            method: Callable[..., Any] = getattr(self.engine, OPS[op][0])
            return _success(method(**args))
        except Exception as e:
            return _failure(e)

    def _watch(self, conn: socket.socket, args: dict[str, Any]) -> bool:
        """A watch: stream until it ends (False: hang up), or refuse it (True: the
        connection goes on, as after any error reply)."""
        if not self._watch_slots.acquire(blocking=False):
            conn.sendall(encode_error(SnapError(errno.EAGAIN, "too many watchers (at most "
                                                f"{MAX_WATCHERS} at once)")))
            return True
        try:
            try:
                w = self.engine.watch(**args)
            except Exception as e:
                conn.sendall(_failure(e))
                return True
            try:
                _stream(conn, w)
            finally:
                self.engine.events.unsubscribe(w)
            return False
        finally:
            self._watch_slots.release()


def _stream(conn: socket.socket, w: Any) -> None:
    """Send "watching", then each event of watcher ``w`` as it comes, then "end" (or
    ENOBUFS if it was dropped). A client that hangs up, or does not take an event within
    WATCH_SEND_TIMEOUT, ends it; nothing else waits for the send."""
    conn.settimeout(WATCH_SEND_TIMEOUT)
    try:
        conn.sendall(_success("watching"))
        while True:
            event = _next_event(conn, w)
            if w.dropped:  # it missed events: say so rather than go on with a gap
                conn.sendall(encode_error(SnapError(errno.ENOBUFS, DROPPED)))
                return
            if event is None:
                conn.sendall(_success("end"))
                return
            conn.sendall(json.dumps({"event": event}).encode() + b"\n")
    except socket.timeout:
        log.warning("control: a watcher did not read an event within %.0f s; watch ended",
                    WATCH_SEND_TIMEOUT)
    except OSError as e:
        log.debug("control: a watcher went away (%s)", e)


def _next_event(conn: socket.socket, w: Any) -> dict | None:
    """The next event of ``w`` (None: its end, or it was dropped), looking every
    WATCH_POLL seconds whether the client is still there (ConnectionAbortedError)."""
    while not w.dropped:
        try:
            return w.next(timeout=WATCH_POLL)
        except queue.Empty:
            if _peer_gone(conn):
                raise ConnectionAbortedError(errno.ECONNABORTED, "the client hung up")
    return None


def _peer_gone(conn: socket.socket) -> bool:
    """Has the client closed its socket (POLLHUP)? A half-close, shutdown(SHUT_WR) as
    ``socat`` does after the request, is not gone: it still reads. Whatever it sends
    meanwhile is read and ignored, so that closing never resets unread data."""
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    for _, flags in poller.poll(0):
        if flags & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return True
        try:
            conn.recv(MAX_REQUEST, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
    return False


def _success(result: Any) -> bytes:
    return json.dumps({"ok": True, "result": result}).encode() + b"\n"


def _failure(e: Exception) -> bytes:
    """The error reply for what an engine call raised: an OSError keeps its errno; anything
    else is a bug (logged), EIO."""
    if isinstance(e, OSError):
        return encode_error(e if isinstance(e, SnapError)
                            else SnapError(e.errno or errno.EIO, str(e)))
    log.error("control request failed", exc_info=e)
    return encode_error(SnapError(errno.EIO, f"internal error: {type(e).__name__}: {e}"))


def _read_request(conn: socket.socket, deadline: float) -> bytes | None:
    """One request line (None at end of stream), within ``deadline`` for the whole line."""
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SnapError(errno.ETIMEDOUT, f"request not complete within {CONN_TIMEOUT:.0f} s")
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(4096, socket.MSG_PEEK)
        except socket.timeout:
            raise SnapError(errno.ETIMEDOUT, f"request not complete within {CONN_TIMEOUT:.0f} s")
        if not chunk:  # end of stream: a last request may lack its newline
            return b"".join(chunks) or None
        newline = chunk.find(b"\n")
        chunk = conn.recv(newline + 1 if newline >= 0 else len(chunk))
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_REQUEST:
            raise SnapError(errno.EINVAL, f"request longer than {MAX_REQUEST} bytes")
        if newline >= 0:
            return b"".join(chunks)


def encode_error(e: SnapError) -> bytes:
    return json.dumps({"ok": False, "errno": e.errno, "message": e.detail}).encode() + b"\n"


def remove_stale_socket(path: str) -> None:
    """Remove a socket left by a killed daemon; refuse if a live one answers on it."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise SnapError(errno.EADDRINUSE, f"{path}: another daemon is already listening there")
