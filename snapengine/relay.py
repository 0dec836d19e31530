"""The optional TCP listener (--tcp): relays each TCP client to the NBD Unix socket.

It is unauthenticated, like any plain NBD server: whoever reaches the port can read
and write the origins. docs/security.md says so.
"""

from __future__ import annotations

import logging
import socket
import threading

log = logging.getLogger(__name__)

CHUNK = 256 * 1024  # bytes moved per recv


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdecimal() or not 0 < int(port) < 65536:
        raise ValueError(f"--tcp {value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class TcpRelay:
    def __init__(self, host: str, port: int, unix_path: str) -> None:
        self.unix_path = unix_path
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family)
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
            try:
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.connect(self.unix_path)
            except OSError as e:
                log.error("tcp relay: cannot reach %s: %s", self.unix_path, e)
                client.close()
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(src, dst), name="tcp-relay-pump",
                                 daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
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
