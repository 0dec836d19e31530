"""Resuming a COW file: prove it right for this origin and mode, or say which check failed.

Used when the daemon restarts (registry) and when a reloaded minor's origin gets its
first client. A clean file must match its header exactly (every index entry valid,
their count equal to the header's). A file that was not closed cleanly is resumed only
if the process died under this same boot: entries are written through to the page
cache before each origin write (tracker.py), so the file holds every change that
reached the origin, and the counters are rebuilt from the index. After a reboot
(power cut, crash of the machine) unsynced writes may be lost: the minor fails.
"""

from __future__ import annotations

import errno
import logging

from .changes import count_changed, verify_index
from .cowfile import FLAG_FAILED, CowFile, boot_id
from .errors import SnapError
from .fileio import FileIO
from .units import BLOCK_SIZE

log = logging.getLogger(__name__)


def open_verified(path: str, origin_size: int, incremental: bool, opener=FileIO.open,
                  uuid: str | None = None, seq_id: int | None = None) -> CowFile:
    """Open ``path`` to resume tracking; raise SnapError naming the first failed check."""
    try:
        cow = CowFile.open(path, opener)
    except SnapError:
        raise
    except FileNotFoundError:
        raise SnapError(errno.ENOENT, f"COW file {path} is missing")
    except OSError as e:
        raise SnapError(e.errno or errno.EIO, f"cannot open COW file {path}: {e.strerror}")
    try:
        _check_identity(cow, origin_size, incremental, uuid, seq_id)
        h = cow.header
        if h.flags & FLAG_FAILED:
            raise SnapError(-h.error if h.error < 0 else errno.EIO,
                            f"{path}: the snapshot had already failed (error {h.error})")
        if h.clean:
            verify_index(cow)
        else:
            _recover(cow)
        return cow
    except BaseException:
        cow.close()
        raise


def _check_identity(cow: CowFile, origin_size: int, incremental: bool,
                    uuid: str | None, seq_id: int | None) -> None:
    h = cow.header
    if h.origin_size != origin_size:
        raise SnapError(errno.EINVAL, f"{cow.path} belongs to an origin of {h.origin_size} "
                        f"bytes; this origin has {origin_size}")
    if uuid is not None and h.uuid.hex() != uuid:
        raise SnapError(errno.EINVAL, f"{cow.path} has uuid {h.uuid.hex()}, expected {uuid}")
    if seq_id is not None and h.seq_id != seq_id:
        raise SnapError(errno.EINVAL, f"{cow.path} has seq_id {h.seq_id}, expected {seq_id}")
    if h.incremental != incremental:
        found, wanted = ("incremental", "snapshot") if h.incremental else ("snapshot", "incremental")
        raise SnapError(errno.EINVAL, f"{cow.path} is in {found} mode, not {wanted} mode")


def _recover(cow: CowFile) -> None:
    """Rebuild the counters of a file left dirty by a process that died under this boot."""
    h = cow.header
    if h.boot_id != boot_id():
        raise SnapError(errno.EUCLEAN, f"{cow.path} was not closed cleanly and the machine has "
                        "restarted since: writes that were not synced may be missing")
    if h.incremental:
        slots_on_disk = h.nr_slots  # fixed when the data was released
    else:
        slots_on_disk = max(0, (cow.io.size() - h.data_offset) // BLOCK_SIZE)
    count, top = count_changed(cow, slots_on_disk)
    cow.write_header(nr_changed_blocks=count, nr_slots=max(top, h.nr_slots))
    log.warning("%s: not closed cleanly (the daemon died); resumed from its index: %d "
                "changed blocks, %d saved", cow.path, count, top)
