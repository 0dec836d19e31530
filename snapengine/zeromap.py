"""Where a snapshot reads as zeros, from NBD block status (``base:allocation``):
update-img writes zeros there (or punches) instead of reading (extents.py answers).

One more connection to the snapshot is opened for block status only, and used only if
its export describes the same snapshot; without it everything is read.
"""

from __future__ import annotations

import errno
from bisect import bisect_right
from contextlib import contextmanager
from typing import Iterator

from . import source
from .errors import SnapError
from .source import NBD_SCHEMES, Snapshot
from .units import BLOCK_SIZE

BASE_ALLOCATION = "base:allocation"  # the NBD meta context of block status
STATE_ZERO = 2  # NBD_STATE_ZERO: the extent reads as zeros
STATUS_SPAN = 1 << 30  # bytes of one block status request (NBD counts are 32-bit)

Piece = tuple[int, int, bool]  # (offset, length, reads as zeros): one item of work


class BlockStatus:
    """One more connection to the snapshot, for block status only (base:allocation,
    negotiated in its handshake); the readers' connections are source.py's."""

    def __init__(self, h) -> None:
        self.h = h

    def zeros(self, length: int, offset: int) -> list[tuple[int, int, bool]]:
        """(offset, length, reads as zeros) from ``offset``, as far as the server said."""
        import nbd
        got: list[tuple[int, int, bool]] = []

        def extent(metacontext: str, start: int, entries, err) -> int:
            if metacontext == BASE_ALLOCATION:
                for n, flags in zip(entries[0::2], entries[1::2]):
                    got.append((start, n, bool(flags & STATE_ZERO)))
                    start += n
            return 0
        try:
            self.h.block_status(length, offset, extent)
        except nbd.Error as e:
            raise SnapError(e.errnum or errno.EIO, f"block status at {offset} (+{length} "
                            f"bytes): {e.string}")
        return got

    def close(self) -> None:
        import nbd
        try:
            self.h.shutdown()
        except nbd.Error:
            pass  # not connected, or the server is gone: nothing to tell it


def open_status(snap: Snapshot) -> BlockStatus | None:
    """Block status of ``snap``: a connection to its URI that negotiated base:allocation
    and whose export's description names ``snap``'s snapshot (the identity never comes
    back once changed, so an equal one is the same snapshot). None where there is no
    such connection (a local file, a server without block status or without our
    description, a snapshot changed or failed since): then every block is read."""
    if not snap.name.startswith(NBD_SCHEMES):
        return None
    import nbd
    h = nbd.NBD()
    h.set_full_info(True)  # the description says which snapshot it serves
    h.add_meta_context(BASE_ALLOCATION)
    status = BlockStatus(h)
    try:
        h.connect_uri(snap.name)
        same = (h.can_meta_context(BASE_ALLOCATION) and h.get_size() == snap.size
                and source.described_identity(source.export_description(h), snap.name)
                == snap.identity)
    except (nbd.Error, SnapError):
        same = False
    if not same:
        status.close()
        return None
    return status


@contextmanager
def zero_map(snap: Snapshot) -> Iterator["ZeroMap"]:
    """The ZeroMap of ``snap``, its block status connection closed at the end."""
    status = open_status(snap)
    try:
        yield ZeroMap(status, snap.size)
    finally:
        if status is not None:
            status.close()


class ZeroMap:
    """Where the snapshot reads as zeros: asked in spans of STATUS_SPAN, each answer kept
    until a range past it is asked (ranges come in ascending order). Sound because a
    snapshot does not change: an extent it reported as zeros stays zeros (extents.py).
    Without block status, or once it failed, everything is data: the reads then say
    what is wrong."""

    def __init__(self, status: BlockStatus | None, size: int) -> None:
        self.ask = status.zeros if status is not None else None
        self.size = size
        self._starts: list[int] = []  # the known extents, ascending, without gaps
        self._known: list[tuple[int, int, bool]] = []  # (start, end, zero)

    def split(self, offset: int, length: int) -> Iterator[Piece]:
        """[offset, offset + length) (block-aligned, or ending at the snapshot's end) in
        pieces that read as zeros or not, cut at block boundaries only: a block partly
        in an extent of zeros is data."""
        end = offset + length
        pos = offset
        for start, stop, zero in self._extents(offset, end):
            if zero:
                start = -(-start // BLOCK_SIZE) * BLOCK_SIZE
                stop = stop if stop == end else stop // BLOCK_SIZE * BLOCK_SIZE
                if start < stop:
                    if start > pos:
                        yield pos, start - pos, False
                    yield start, stop - start, True
                    pos = stop
        if pos < end:
            yield pos, end - pos, False

    def _extents(self, offset: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """(start, end, zero) covering [offset, end), clipped to it."""
        pos = offset
        while pos < end:
            i = bisect_right(self._starts, pos) - 1
            if i < 0 or self._known[i][1] <= pos:
                self._learn(pos)
                i = 0
            start, stop, zero = self._known[i]
            stop = min(stop, end)
            yield pos, stop, zero
            pos = stop

    def _learn(self, pos: int) -> None:
        """Ask block status from ``pos``; where it fails or makes no sense: data."""
        span = min(STATUS_SPAN, self.size - pos)
        known: list[tuple[int, int, bool]] = []
        if self.ask is not None:
            try:
                at = pos
                for start, length, zero in self.ask(span, pos):
                    if start != at or length <= 0 or at >= self.size:
                        break
                    known.append((at, min(at + length, self.size), zero))
                    at += length
            except SnapError:  # the server failed it (EIO of a failed snapshot)
                self.ask = None
                known = []
        self._known = known or [(pos, pos + span, False)]
        self._starts = [k[0] for k in self._known]
