"""Resuming a COW file: prove it right for this origin and mode, or say which check failed.

Used when the daemon restarts (registry) and when a reloaded minor's origin gets its
first client. A clean file must match its header exactly (every index entry valid,
the count of changed ones equal to the header's). A file that was not closed cleanly
is recovered (tracker.py and intents.py say why each step is safe): saved data and
entries are written through, so after the death of the process (same boot) the
snapshot is exact; change marks are made up from the write-intent record, a superset
of the truth. After a reboot (power cut) unsynced writes may be lost: a durable
snapshot keeps exactly what reached the disk, any other snapshot fails; change lists
are still a superset. A snapshot failed by an overflow whose change list was kept
(FLAG_KEPT) resumes as a change list: its index is treated as an incremental file's.
"""

from __future__ import annotations

import errno
import logging
from array import array

from .changes import index_pages, scan, verify_index
from .cowfile import FLAG_FAILED, INTENT_REGION, PAGE_BLOCKS, CowFile, block_checksums, boot_id
from .entry import is_saved, is_zero, mark_changed, no_entries, slot_number, span_bits, state_bits
from .errors import SnapError
from .fileio import FileIO
from .units import BLOCK_SIZE, nr_blocks

log = logging.getLogger(__name__)


def open_verified(path: str, origin_size: int, incremental: bool | None, opener=FileIO.open,
                  uuid: str | None = None, seq_id: int | None = None,
                  recover: bool = False) -> CowFile:
    """Open ``path`` to resume tracking; raise SnapError naming the first failed check.

    ``incremental`` is the mode the caller expects, or None to take the file's own (a
    restart: a transition interrupted before its header write did not happen).
    ``recover``: a file not closed cleanly may be recovered (a restart of the daemon
    that owned it); otherwise, as elastio-snap's reload, it is refused."""
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
        if h.flags & FLAG_FAILED and not h.kept:  # kept: the list resumes (tracker.py)
            raise SnapError(-h.error if h.error < 0 else errno.EIO,
                            f"{path}: the snapshot had already failed (error {h.error})")
        if h.clean:
            verify_index(cow)
        elif recover:
            _recover(cow)
        else:
            raise SnapError(errno.EUCLEAN, f"{path} was not closed cleanly; reload needs a "
                            "COW file closed by a clean shutdown")
        return cow
    except BaseException:
        cow.close()
        raise


def _check_identity(cow: CowFile, origin_size: int, incremental: bool | None,
                    uuid: str | None, seq_id: int | None) -> None:
    h = cow.header
    if h.origin_size != origin_size:
        raise SnapError(errno.EINVAL, f"{cow.path} belongs to an origin of {h.origin_size} "
                        f"bytes; this origin has {origin_size}")
    if uuid is not None and h.uuid.hex() != uuid:
        raise SnapError(errno.EINVAL, f"{cow.path} has uuid {h.uuid.hex()}, expected {uuid}")
    if seq_id is not None and h.seq_id != seq_id:
        raise SnapError(errno.EINVAL, f"{cow.path} has seq_id {h.seq_id}, expected {seq_id}")
    if incremental is not None and h.incremental != incremental:
        found, wanted = ("incremental", "snapshot") if h.incremental else \
            ("snapshot", "incremental")
        raise SnapError(errno.EINVAL, f"{cow.path} is in {found} mode, not {wanted} mode")


def _recover(cow: CowFile) -> None:
    """Resume a file left dirty by an unclean stop, or raise EUCLEAN.

    Saved data and its entries are written through (same boot: the page cache kept
    them all); change marks are not, but the write-intent bit of their region was made
    durable first: every block of a marked region is presumed changed, a superset.
    Another boot (power cut): a durable snapshot also drops the entries whose saved
    data did not reach the disk (their origin blocks were never overwritten); any other
    snapshot cannot be proven.
    """
    h = cow.header
    same_boot = h.boot_id == boot_id()
    if h.index_only:
        slots = h.nr_slots  # fixed when the data was released
    elif same_boot:
        slots = max(0, (cow.io.size() - h.data_offset) // BLOCK_SIZE)
    elif h.durable:
        slots = h.fallocate // BLOCK_SIZE
        dropped = drop_unsaved(cow, slots)
        log.warning("%s: power cut: %d saved blocks had not reached the disk; their origin "
                    "blocks were never overwritten", cow.path, dropped)
    else:
        raise SnapError(errno.EUCLEAN, f"{cow.path} was not closed cleanly and the machine has "
                        "restarted since: snapshot data that was not synced may be lost "
                        "(serve with --durable to keep snapshots across power cuts)")
    presumed = presume_changed(cow, cow.read_intents(), h.index_only)
    log.warning("%s: %d blocks of its write-intent regions presumed changed", cow.path, presumed)
    found = scan(cow, slots)
    cow.sync()
    cow.write_header(nr_changed_blocks=found.count, nr_slots=max(found.top_slot, h.nr_slots))
    log.warning("%s: not closed cleanly; resumed from its index: %d changed blocks, %d saved",
                cow.path, found.count, found.top_slot)


def presume_changed(cow: CowFile, regions: set[int], incremental: bool) -> int:
    """Mark changed every block of ``regions`` that could have been written: saved
    ones (AHEAD cleared) and, in an incremental file, all others (MARK); return how
    many were not marked before."""
    h = cow.header
    nr = nr_blocks(h.origin_size)
    marked = 0
    per_region = INTENT_REGION // BLOCK_SIZE // PAGE_BLOCKS  # index pages per region
    for region in sorted(regions):
        for page in range(region * per_region, (region + 1) * per_region):
            first = page * PAGE_BLOCKS
            if first >= nr:
                break
            count = min(PAGE_BLOCKS, nr - first)
            entries = array("Q", cow.read_page(page))[:2 * count]
            saved, changed = state_bits(entries)
            bits = mark_changed(entries, first, span_bits(0, count) & ~changed, saved, h.seed,
                                incremental)
            if bits:
                cow.write_entries(first, entries)
                marked += bits.bit_count()
    return marked


def drop_unsaved(cow: CowFile, slot_limit: int) -> int:
    """Clear the entries whose saved data did not reach the disk; return how many.

    Only slots allocated since the last clean point (above the header's ``nr_slots``)
    can be in that case; a bad checksum below is damage, and fails the file."""
    h = cow.header
    dropped = 0
    data = bytearray(BLOCK_SIZE)
    for page in index_pages(cow, slot_limit):
        first = page.number * PAGE_BLOCKS
        for i in range(PAGE_BLOCKS):
            slot, csum = page.entries[2 * i], page.entries[2 * i + 1]
            if not is_saved(slot) or is_zero(slot):  # saved as zeros: no data to lose
                continue
            data[:] = bytes(BLOCK_SIZE)
            slot = slot_number(slot)
            got = cow.io.pread_into(data, cow.slot_offset(slot))
            if got == BLOCK_SIZE and \
                    block_checksums(memoryview(data), first + i, h.seed)[0] == csum:
                continue
            if slot <= h.nr_slots:
                raise SnapError(errno.EUCLEAN, f"{cow.path}: saved data of block {first + i} "
                                f"(slot {slot}, synced before) fails its checksum")
            cow.write_entries(first + i, no_entries(1))
            dropped += 1
    return dropped
