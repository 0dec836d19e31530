"""The optional TCP listener (--tcp): relays each TCP client to the NBD Unix socket.

It is unauthenticated, like any plain NBD server: whoever reaches the port can read
and write the origins. docs/security.md says so.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading

from .errors import SnapError

log = logging.getLogger(__name__)

CHUNK = 256 * 1024  # bytes moved per recv
DEFAULT_MAX_CONNECTIONS = 64  # --max-connections: TCP clients relayed at once


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdecimal() or not 0 < int(port) < 65536:
        raise ValueError(f"--tcp {value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class TcpRelay:
    """Each accepted client is relayed by two threads; past ``max_connections`` clients at
    once, a new one is closed at once (and logged) instead."""

    def __init__(self, host: str, port: int, unix_path: str,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.unix_path = unix_path
        self._slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._sock = socket.create_server((host, port), family=family)
        except OSError as e:
            raise SnapError(e.errno if e.errno and e.errno > 0 else errno.EADDRNOTAVAIL,
                            f"tcp: cannot listen on {host}:{port} ({e.strerror})") from e
        self._stopping = False

    def start(self) -> None:
        threading.Thread(target=self._accept_loop, name="tcp-relay", daemon=True).start()

    def stop(self) -> None:
        self._stopping = True
        self._sock.close()

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                client, addr = self._sock.accept()
            except OSError:
                continue
            if not self._slots.acquire(blocking=False):
                log.warning("tcp relay: refused %s: %d connections already", addr[0],
                            self.max_connections)
                client.close()
                continue
            try:
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.connect(self.unix_path)
            except OSError as e:
                log.error("tcp relay: cannot reach %s: %s", self.unix_path, e)
                client.close()
                self._slots.release()
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            done = _Countdown(2, self._slots.release)  # both directions ended: a free slot
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst, done), name="tcp-relay-pump",
                                 daemon=True).start()


class _Countdown:
    """Calls ``then`` once ``count()`` has been called ``n`` times."""

    def __init__(self, n: int, then) -> None:
        self._left = n
        self._then = then
        self._lock = threading.Lock()

    def count(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._then()


def _pump(src: socket.socket, dst: socket.socket, done: _Countdown) -> None:
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        src.close()
        done.count()
