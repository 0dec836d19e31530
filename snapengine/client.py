"""The control protocol's client: one request and its reply, or a watch's events.

The protocol is control.py's (docs/control-protocol.md); elioctl, update-img, the
supervisor and the tests talk to the daemon through ``request`` and ``watch``.
"""

from __future__ import annotations

import errno
import json
import socket
import time
from typing import Any, Iterator

from .control import CONN_TIMEOUT, MAX_REQUEST
from .errors import SnapError

MAX_REPLY = 16 * MAX_REQUEST  # bytes the client reads of one reply line


def _connect(path: str) -> socket.socket:
    """A connection to the daemon at ``path``. A full listen backlog (EAGAIN: a burst of
    clients) is a busy daemon, not a missing one: wait for room, up to CONN_TIMEOUT."""
    deadline = time.monotonic() + CONN_TIMEOUT
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONN_TIMEOUT * 4)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() >= deadline:
                raise SnapError(errno.EAGAIN, f"the daemon at {path} is too busy to accept "
                                "a connection; try again")
            time.sleep(0.01)
        except FileNotFoundError:
            sock.close()
            raise SnapError(errno.ENOENT, f"no daemon socket at {path}; start the daemon "
                            "with `snapengine serve` (or `make run`)")
        except PermissionError:
            sock.close()
            raise SnapError(errno.EACCES, f"no permission to use {path} (root or the daemon's "
                            "user only)")
        except OSError as e:
            sock.close()
            raise SnapError(e.errno or errno.ECONNREFUSED, f"cannot reach the daemon at {path} "
                            f"({e.strerror}); start it with `snapengine serve`")


def request(path: str, op: str, **args: Any) -> Any:
    """Send one request to the daemon at ``path``; return its result or raise SnapError."""
    sock = _connect(path)
    try:
        _send(sock, {"op": op, **args})
        line = _read_line(sock.makefile("rb"), path)
    finally:
        sock.close()
    return _result(path, line)


def watch(path: str, minor: Any = None) -> Iterator[dict]:
    """The daemon's events (of ``minor``, or of every minor) as they happen, until the
    daemon stops: its "end" line, or the connection closing. SnapError if the watch is
    refused, and ENOBUFS if the daemon dropped this watcher for falling behind."""
    sock = _connect(path)
    try:
        _send(sock, {"op": "watch"} if minor is None else {"op": "watch", "minor": minor})
        replies = sock.makefile("rb")
        if _result(path, _read_line(replies, path)) != "watching":
            raise SnapError(errno.EPROTO, f"the daemon at {path} did not start the watch")
        sock.settimeout(None)  # events may be hours apart
        while True:
            line = _read_line(replies, path, end_ok=True)
            if not line:
                return  # the daemon is gone
            reply = _parse(path, line)
            if "event" not in reply:
                _result(path, line)  # raises for an error line; "end" otherwise
                return
            yield reply["event"]
    finally:
        sock.close()


def _send(sock: socket.socket, req: dict[str, Any]) -> None:
    try:
        sock.sendall(json.dumps(req).encode() + b"\n")
    except OSError:
        pass  # a refusing daemon may hang up first: its answer is still there to read


def _read_line(replies: Any, path: str, end_ok: bool = False) -> bytes:
    """One reply line. The end of the stream, or a reset, is ECONNRESET; for a watch
    (``end_ok``: the daemon stopped, or died) it is b""."""
    try:
        line = replies.readline(MAX_REPLY)
    except ConnectionResetError:
        line = b""
    except OSError as e:
        raise SnapError(e.errno or errno.EIO, f"no answer from the daemon at {path}: {e}")
    if not line and not end_ok:
        raise SnapError(errno.ECONNRESET, f"the daemon at {path} closed the connection")
    return line


def _parse(path: str, line: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(line)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise SnapError(errno.EPROTO, f"the daemon at {path} answered garbage: {line[:80]!r}")
    return reply


def _result(path: str, line: bytes) -> Any:
    """The result of a reply line, or its error raised as SnapError."""
    reply = _parse(path, line)
    if reply.get("ok"):
        return reply.get("result")
    raise SnapError(int(reply.get("errno") or errno.EIO), str(reply.get("message")))
