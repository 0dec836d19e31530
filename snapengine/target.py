"""Where update-img writes: a local image (a file or a block device) or an NBD target.

Both take the same requests from the copier's threads: ``write(data, offset, done)``
and ``zero(offset, length, done)``, where ``done(error)`` is called once the request has
completed (``error`` None, or what went wrong), and ``finish()``, which returns once
every request has completed and the target is durable (fsync; FLUSH for NBD).

``NbdTarget`` (an ``nbd://``, ``nbds://``, ``nbd+unix://`` ... URI) writes through one
libnbd connection, up to ``WINDOW`` requests in flight: one connection, because
qemu-nbd serves one client at a time unless told otherwise. Its own thread drives the
connection (libnbd's aio calls with completion callbacks, select on the socket and on a
wake-up pipe), so the copier's threads only queue requests. Data that is all zeros, in
runs of GRAIN bytes, is sent as write-zeroes, which a qcow2 overlay stores as zero
clusters, not as data. The caller checks the size and the read-only flag before it
writes anything.
"""

from __future__ import annotations

import errno
import os
import queue
import select
import threading
from typing import Callable, Iterator

from .errors import SnapError
from .fileio import FileIO
from .source import NBD_SCHEMES

Done = Callable[[str | None], None]  # called once a request has completed: its error
WINDOW = 16  # requests in flight to an NBD target
GRAIN = 64 * 1024  # all-zero data is looked for in pieces of this size (qcow2's clusters;
#   --full leaves such pieces of a new sparse file unwritten: copier.py)
NBD_MAX_REQUEST = 32 << 20  # a request's largest length when the server gives no maximum


def is_nbd(image: str) -> bool:
    return image.startswith(NBD_SCHEMES)


class FileTarget:
    """A local image through its descriptor: each request done when it returns."""

    def __init__(self, path: str, fd: int) -> None:
        self.name = path
        self.fd = fd
        self.io = FileIO(fd, path)  # zeroes ranges (the caller closes the fd)

    def write(self, data, offset: int, done: Done) -> None:
        os.pwrite(self.fd, data, offset)
        done(None)

    def zero(self, offset: int, length: int, done: Done) -> None:
        self.io.zero(offset, length, may_trim=True)  # punch, or write zeros
        done(None)

    def finish(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise SnapError(e.errno or errno.EIO, f"fsync of {self.name}: {e.strerror}")


def all_zeros(data: bytes, start: int, end: int) -> bool:
    """``data[start:end]`` is all zero bytes (counted in place, no copy)."""
    return data.count(0, start, end) == end - start


class _Joined:
    """One ``done`` for several requests: called once all have completed, with the first
    error any of them had."""

    def __init__(self, count: int, done: Done) -> None:
        self._left = count
        self._error: str | None = None
        self._done = done
        self._lock = threading.Lock()
        if count == 0:
            done(None)

    def __call__(self, error: str | None) -> None:
        with self._lock:
            self._left -= 1
            self._error = self._error or error
            last = self._left == 0
        if last:
            self._done(self._error)


class NbdTarget:
    """An image served by an NBD server (qemu-nbd, nbdkit ...), opened for writing."""

    def __init__(self, uri: str) -> None:
        import nbd
        self.name = uri
        self._nbd = nbd
        self.h = nbd.NBD()
        try:
            self.h.connect_uri(uri)
            self.size = self.h.get_size()
            self.read_only = self.h.is_read_only()
            self.can_zero = self.h.can_zero()
            self.can_flush = self.h.can_flush()
            maximum = self.h.get_block_size(nbd.SIZE_MAXIMUM)
        except nbd.Error as e:
            raise SnapError(e.errnum or errno.EIO, f"cannot open target {uri}: {e.string}")
        self.max_request = min(maximum or NBD_MAX_REQUEST, NBD_MAX_REQUEST)
        self._queue: queue.Queue = queue.Queue(maxsize=WINDOW)
        self._wake_r, self._wake_w = os.pipe()
        self._in_flight = 0  # touched by the target's thread only
        self._closing = False
        self._broken: str | None = None  # the connection failed: every request fails so
        self._thread: threading.Thread | None = None

    def check_writable(self) -> None:
        if self.read_only:
            raise SnapError(errno.EROFS, f"target {self.name} is read-only (its server "
                            "serves it read-only)")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="nbd-target", daemon=True)
        self._thread.start()

    def write(self, data: bytes, offset: int, done: Done) -> None:
        """``data`` as runs of GRAIN-sized pieces: all-zero runs as write-zeroes, the
        rest as writes of at most ``max_request`` bytes; ``done`` once all completed."""
        parts = list(self._parts(data, offset))
        joined = _Joined(len(parts), done)
        for kind, what, at in parts:
            self._submit((kind, what, at, joined))

    def _parts(self, data: bytes, offset: int) -> Iterator[tuple[str, object, int]]:
        i, end = 0, len(data)
        while i < end:
            zero = self.can_zero and all_zeros(data, i, min(i + GRAIN, end))
            limit = end if zero else min(end, i + self.max_request)
            j = min(i + GRAIN, limit)
            while j < limit and (self.can_zero and all_zeros(data, j, min(j + GRAIN, end))) == zero:
                j = min(j + GRAIN, limit)
            yield ("zero", j - i, offset + i) if zero else ("write", data[i:j], offset + i)
            i = j

    def zero(self, offset: int, length: int, done: Done) -> None:
        if not self.can_zero:  # a server without write-zeroes: write the zeros
            self.write(bytes(length), offset, done)
            return
        self._submit(("zero", length, offset, done))

    def _submit(self, request) -> None:
        if self._broken:
            request[3](self._broken)
            return
        self._queue.put(request)  # waits while WINDOW requests are queued
        os.write(self._wake_w, b"x")

    def _issue(self, request) -> None:
        kind, what, offset, done = request

        def completed(err) -> int:
            self._in_flight -= 1
            done(None if err.value == 0 else f"{os.strerror(err.value)} from {self.name}")
            return 1  # retire the command

        try:
            if kind == "write":
                buf = self._nbd.Buffer.from_bytearray(bytearray(what))
                self.h.aio_pwrite(buf, offset, completion=completed)
            else:
                self.h.aio_zero(what, offset, completion=completed)
            self._in_flight += 1
        except self._nbd.Error as e:  # refused before it was sent (out of range, say)
            done(f"{e.string} ({self.name})")

    def _loop(self) -> None:
        try:
            self._drive()
        except self._nbd.Error as e:  # the connection is gone: fail what is left
            self._broken = f"{e.string} ({self.name})"
            while True:
                try:
                    self._queue.get_nowait()[3](self._broken)
                except queue.Empty:
                    return

    def _drive(self) -> None:
        """Issue what is queued while fewer than WINDOW are in flight; let libnbd write
        requests and read replies as the socket allows."""
        fd = self.h.aio_get_fd()
        while True:
            while self._in_flight < WINDOW:
                try:
                    request = self._queue.get_nowait()
                except queue.Empty:
                    break
                self._issue(request)
            if self._closing and self._in_flight == 0 and self._queue.empty():
                return
            direction = self.h.aio_get_direction()
            readable = [self._wake_r] + ([fd] if direction & self._nbd.AIO_DIRECTION_READ else [])
            writable = [fd] if direction & self._nbd.AIO_DIRECTION_WRITE else []
            r, w, _ = select.select(readable, writable, [])
            if self._wake_r in r:
                os.read(self._wake_r, 4096)
            if fd in r:
                self.h.aio_notify_read()
            elif fd in w:
                self.h.aio_notify_write()

    def finish(self) -> None:
        """Every request completed, then FLUSH (where the server has it)."""
        self._closing = True
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join()
        if self._broken:
            raise SnapError(errno.EIO, self._broken)
        if self.can_flush:
            try:
                self.h.flush()
            except self._nbd.Error as e:
                raise SnapError(e.errnum or errno.EIO, f"flush of {self.name}: {e.string}")

    def close(self) -> None:
        """Disconnect (after ``finish``, or on a failure before it: queued requests are
        then dropped)."""
        if self._thread is not None and self._thread.is_alive():
            self._closing = True
            while not self._queue.empty():
                self._queue.get_nowait()
            os.write(self._wake_w, b"x")
            self._thread.join(10)
        try:
            self.h.shutdown()
        except self._nbd.Error:
            pass  # the server is gone: nothing to tell it
        os.close(self._wake_r)
        os.close(self._wake_w)
