"""update-img's copy: pieces of the snapshot read by several threads and written to a
target (target.py), a file or an NBD server, with blocks counted as they complete."""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator

from .source import Reader
from .target import GRAIN, Done, all_zeros
from .units import BLOCK_SIZE, MiB
from .zeromap import Piece, ZeroMap

CHUNK = 4 * MiB  # largest single read: extents are coalesced up to this, and split at it
PROGRESS_EVERY = 0.2  # seconds between progress updates on a terminal
ZERO_PIECE = 1 << 30  # largest piece of zeros zeroed (and counted) at once


def chunks(extents: Iterator[tuple[int, int]], size: int = CHUNK) -> Iterator[tuple[int, int]]:
    """Changed byte extents, coalesced when adjacent and split at ``size``."""
    for offset, length in extents:
        while length:
            n = min(length, size)
            yield offset, n
            offset += n
            length -= n


def pieces(extents: Iterator[tuple[int, int]], zeros: ZeroMap) -> Iterator[Piece]:
    """Changed byte extents as work: data in chunks of CHUNK, zeros of ZERO_PIECE."""
    for offset, length in extents:
        for start, n, zero in zeros.split(offset, length):
            for o, m in chunks(iter([(start, n)]), ZERO_PIECE if zero else CHUNK):
                yield o, m, zero


class Copier:
    """Copies pieces with one thread per reader (one connection each, already checked to
    be the snapshot's): a piece of data is read and written, a piece of zeros is zeroed
    in the target, not read. Blocks are counted done or failed when the target says the
    request completed (at once for a file, later for an NBD target); the first failure
    is kept, naming its extent. ``keep_holes``: the target reads as zeros already (a new
    sparse file), so zeros are not written at all."""

    def __init__(self, readers: list[Reader], target, total: int,
                 keep_holes: bool = False) -> None:
        self.readers = readers
        self.target = target
        self.total = total
        self.keep_holes = keep_holes
        self.done = 0
        self.failed = 0
        self.first_error = ""
        self._lock = threading.Lock()
        self._queue: queue.Queue[Piece | None] = queue.Queue(maxsize=len(readers) * 4)

    def run(self, work: Iterator[Piece], progress: Callable[[int, int], None]) -> None:
        threads = [threading.Thread(target=self._worker, args=(read,), daemon=True)
                   for read in self.readers]
        for t in threads:
            t.start()
        for item in work:
            self._queue.put(item)
            progress(self.done, self.total)
        for _ in threads:
            self._queue.put(None)
        for t in threads:
            while t.is_alive():
                t.join(PROGRESS_EVERY)
                progress(self.done, self.total)

    def _worker(self, read: Reader) -> None:
        while (item := self._queue.get()) is not None:
            offset, length, zero = item
            done = self._counter(offset, length)
            try:
                if zero:
                    self._zero(offset, length, done)
                else:
                    self._write(read(length, offset), offset, done)
            except Exception as e:
                done(str(e))

    def _counter(self, offset: int, length: int) -> Done:
        """What counts the piece [offset, +length) once its request completes."""
        blocks = (length + BLOCK_SIZE - 1) // BLOCK_SIZE

        def done(error: str | None) -> None:
            with self._lock:
                if error is None:
                    self.done += blocks
                    return
                self.failed += blocks
                if not self.first_error:
                    self.first_error = f"blocks at {offset} (+{length} bytes): {error}"
        return done

    def _zero(self, offset: int, length: int, done: Done) -> None:
        """The snapshot reads as zeros here: so must the target. A new sparse file does."""
        if self.keep_holes:
            done(None)
        else:
            self.target.zero(offset, length, done)

    def _write(self, data: bytes, offset: int, done: Done) -> None:
        if not self.keep_holes:
            self.target.write(data, offset, done)
            return
        for i in range(0, len(data), GRAIN):  # a file: each write done or raising
            end = min(i + GRAIN, len(data))
            if not all_zeros(data, i, end):
                self.target.write(data[i:end], offset + i, _ignore)
        done(None)


def _ignore(error: str | None) -> None:
    """``done`` of the writes of one piece into a file: the piece's own counts it."""


def progress_printer(stream) -> Callable[[int, int], None]:
    if not stream.isatty():
        return lambda done, total: None
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY or done == total:
            last[0] = now
            pct = 100.0 * done / total if total else 100.0
            stream.write(f"\rcopying: {done}/{total} blocks ({pct:5.1f}%)")
            stream.flush()
    return show
