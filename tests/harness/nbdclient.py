"""NBD clients through libnbd (``import nbd`` happens on first use, so that a machine
without python3-libnbd can still run the in-process tests)."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

READ_CHUNK = 4 << 20  # bytes per request when reading a whole export


def connect(uri: str):
    """A libnbd handle connected to ``uri``; the caller shuts it down."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def shutdown_quietly(h) -> None:
    """Shut ``h`` down if it is still connected; a dead server is not an error here."""
    import nbd
    if h is None:
        return
    try:
        h.shutdown()
    except nbd.Error:
        pass


@contextlib.contextmanager
def connected(uri: str) -> Iterator:
    h = connect(uri)
    try:
        yield h
    finally:
        h.shutdown()


def read_all(uri: str, chunk: int = READ_CHUNK) -> bytes:
    """The whole content of the export at ``uri``."""
    with connected(uri) as h:
        size = h.get_size()
        return b"".join(h.pread(min(chunk, size - o), o) for o in range(0, size, chunk))


def export_bytes(d, name: str) -> bytes:
    """The whole content of export ``name`` of daemon ``d``."""
    return read_all(d.uri(name))


def export_digest(uri: str) -> str:
    """sha256 of the export at ``uri``, read in chunks."""
    digest = hashlib.sha256()
    with connected(uri) as h:
        size = h.get_size()
        for offset in range(0, size, READ_CHUNK):
            digest.update(h.pread(min(READ_CHUNK, size - offset), offset))
    return digest.hexdigest()


def export_names(uri: str) -> list[tuple[str, str]]:
    """NBD_OPT_LIST in libnbd's option mode: (name, description) of every export."""
    import nbd
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    found: list[tuple[str, str]] = []
    try:
        h.opt_list(lambda name, description: found.append((name, description)) or 0)
    finally:
        h.opt_abort()
    return found


def retire_one(h) -> None:
    """Wait for one asynchronous command of ``h`` to complete; raise if it failed."""
    while (cookie := h.aio_peek_command_completed()) == 0:
        h.poll(-1)
    h.aio_command_completed(cookie)


WINDOW = 32  # asynchronous requests in flight in ``pipelined``


def pipelined(h, requests, window: int = WINDOW) -> None:
    """Send ``requests`` ((aio method of ``h``, *args) each), ``window`` in flight, wait
    for all of them and flush; raise on the first that failed."""
    pending = 0
    for method, *args in requests:
        if pending >= window:
            retire_one(h)
            pending -= 1
        method(*args)
        pending += 1
    for _ in range(pending):
        retire_one(h)
    h.flush()
