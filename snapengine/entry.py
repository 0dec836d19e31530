"""The index entry: what its 16 bytes mean. The only module that interprets them.

cowfile.py lays an entry out (``ENTRY``: slot, checksum; the slot field's bits
``AHEAD``, ``MARK`` and ``SLOT_MASK``, re-exported here); this module says what an
entry means, checks it, builds it and changes it. Everyone else (index.py, the
trackers, recovery.py, changes.py) asks this module, and uses the constants only on
the two hot paths that inline a lookup (tracker's re-touch, snapread's 4 KiB read).

Design notes
------------
An entry has two facts, *saved* (its slot field names a data slot) and *changed*
(the block was written since the snapshot point):

    (slot, checksum)        saved  changed
    (0, 0)                  no     no       no entry; a hole in the index reads so
    (s, c)                  yes    yes      old content in slot s (1-based), c its checksum
    (s | AHEAD, c)          yes    no       saved ahead with its 64 KiB cluster; not changed
    (MARK, c)               no     yes      changed in incremental mode, c = mark checksum
    (ZERO, z)               yes    yes      version 2: old content all zeros, no data slot
    (ZERO_AHEAD, z)         yes    no       version 2: the same, not changed; z = zero checksum

"Changed" is what the change list and ``nr_changed_blocks`` count: an AHEAD entry is
saved but not changed. In an incremental file the data area is gone, yet its ``(s, c)``
entries still say "changed" and its AHEAD entries "not changed".

Validity (``classify``, used by every page load): an entry is ``(0, 0)`` or has a
non-zero slot and a non-zero checksum; a MARK carries the mark checksum of its block;
in a version 2 file, a ZERO or ZERO_AHEAD carries the zero checksum of its block; any
other slot has bit 63 clear and a slot number in 1..nr_slots. One flipped byte in
an entry breaks a rule, or is caught by the block checksum when the data is read.

Changing an entry (``mark_changed``, one implementation for both modes): a saved
entry loses AHEAD (ZERO_AHEAD becomes ZERO); a block with no entry gets ``(MARK, mark checksum)`` in
incremental mode, and is left alone in snapshot mode (its copy failed: it must not
pass for saved). A first touch in snapshot mode writes ``saved_entries`` instead, and
``zero_entries`` for blocks whose old content is all zeros (a hole of the origin).

Pages: an index page holds PAGE_BLOCKS entries; block b is entry ``b & PAGE_MASK`` of
page ``b >> PAGE_SHIFT``. A page's per-block facts are ints with bit i for its entry
i; ``window`` clips a block range to one page.
"""

from __future__ import annotations

import errno
from array import array
from itertools import chain, compress, repeat
from operator import and_, or_

from .cowfile import (
    AHEAD,
    MARK,
    PAGE_BLOCKS,
    SLOT_MASK,
    ZERO,
    ZERO_AHEAD,
    mark_checksum,
    mark_checksums,
    zero_checksums,
)
from .errors import SnapError

PAGE_SHIFT = PAGE_BLOCKS.bit_length() - 1  # block >> PAGE_SHIFT is its index page
assert 1 << PAGE_SHIFT == PAGE_BLOCKS
PAGE_MASK = PAGE_BLOCKS - 1  # block & PAGE_MASK is its entry in that page
ZERO_SLOT = 1 << 63  # data_slots' value for an entry saved as zeros (never a slot number)


# -- one entry ------------------------------------------------------------------------
def is_zero(slot: int) -> bool:
    """Saved as zeros: the old content was all zeros, no data slot (version 2)."""
    return slot == ZERO or slot == ZERO_AHEAD


def is_changed(slot: int) -> bool:
    """The block was written since the snapshot point (a MARK or ZERO, or saved
    without AHEAD)."""
    return slot == MARK or slot == ZERO or (slot != 0 and not slot & AHEAD)


def is_saved(slot: int) -> bool:
    """The old content is kept: the entry names a data slot or says "zeros" (changed or
    ahead)."""
    return slot != 0 and slot != MARK


def is_ahead(slot: int) -> bool:
    """Saved ahead with its cluster, not changed."""
    return slot == ZERO_AHEAD or (slot != MARK and slot != ZERO and bool(slot & AHEAD))


def slot_number(slot: int) -> int:
    """The data slot an entry names, 0 for none."""
    return 0 if slot >= ZERO_AHEAD else slot & SLOT_MASK


def no_entries(n: int) -> array:
    """``n`` entries ``(0, 0)``: slot, checksum interleaved, as on disk."""
    return array("Q", bytes(16 * n))


# -- entries of a page ----------------------------------------------------------------
def classify(entries: array, first: int, nr_slots: int, seed: int, path: str,
             zeros: bool = True) -> tuple[int, int]:
    """Check every entry (the validity rules above) of ``entries``, the first being
    block ``first``'s; return the (saved, changed) bits. EUCLEAN names a bad entry.
    ``zeros``: entries saved as zeros may occur (a version 2 file)."""
    slots, csums = entries[0::2], entries[1::2]
    used = list(compress(range(len(slots)), map(or_, slots, csums)))  # C-level scan
    marked = [i for i in used if slots[i] == MARK]
    marks = dict(zip(marked, mark_checksums([first + i for i in marked], seed)))
    zeroed = [i for i in used if is_zero(slots[i])] if zeros else []
    marks.update(zip(zeroed, zero_checksums([first + i for i in zeroed], seed)))
    saved = changed = 0
    for i in used:
        slot, csum = slots[i], csums[i]
        if slot == MARK:
            bad = csum != marks[i]
        elif zeros and is_zero(slot):
            bad = csum != marks[i]
            saved |= 1 << i
        else:
            bad = not csum or slot >> 63 or not 0 < slot & SLOT_MASK <= nr_slots
            saved |= 1 << i
        if bad:
            raise SnapError(errno.EUCLEAN, f"{path}: corrupt index entry for block "
                            f"{first + i} (slot {slot:#x}, checksum {csum:#x}; "
                            f"{nr_slots} slots in use)")
        if is_changed(slot):
            changed |= 1 << i
    return saved, changed


def state_bits(entries: array) -> tuple[int, int]:
    """The (saved, changed) bits of ``entries`` as they are, unchecked."""
    saved = changed = 0
    for i, slot in enumerate(entries[0::2]):
        if is_saved(slot):
            saved |= 1 << i
        if is_changed(slot):
            changed |= 1 << i
    return saved, changed


def changed_slot(slot: int) -> int:
    """The slot field of a saved entry once its block has changed: AHEAD dropped
    (ZERO_AHEAD becomes ZERO)."""
    return ZERO if slot == ZERO_AHEAD else slot & SLOT_MASK


def write_marks(targets: list[tuple[array, int]], seed: int) -> None:
    """Give each block of ``targets`` ((a page's entries, block), the block with no
    entry yet) a MARK, the checksums computed in one pass: the batched form of
    ``mark_changed``'s incremental case."""
    if not targets:
        return
    for (entries, block), csum in zip(targets, mark_checksums([b for _, b in targets], seed)):
        i = (block & PAGE_MASK) << 1
        entries[i] = MARK
        entries[i + 1] = csum


def mark_changed(entries: array, first: int, bits: int, saved: int, seed: int,
                 incremental: bool) -> int:
    """Make changed, in ``entries`` (the first being block ``first``'s), the blocks of
    ``bits``, none of them changed yet; ``saved``: the saved bits. Return the bits now
    changed: a saved entry loses AHEAD; a block with no entry gets a MARK in
    incremental mode, and stays unchanged in snapshot mode (its copy failed)."""
    if not bits & (bits - 1):  # at most one block: the usual 4 KiB write
        if bits & saved:
            j = 2 * bits.bit_length() - 2
            entries[j] = changed_slot(entries[j])
            return bits
        if not incremental or not bits:
            return 0
        i = bits.bit_length() - 1
        entries[2 * i], entries[2 * i + 1] = MARK, mark_checksum(first + i, seed)
        return bits
    ahead = bits & saved
    for start, length in bit_runs(ahead):
        for i in range(2 * start, 2 * (start + length), 2):
            entries[i] = changed_slot(entries[i])
    if not incremental:
        return ahead
    for start, length in bit_runs(bits & ~saved):
        lo, hi = 2 * start, 2 * (start + length)
        entries[lo:hi:2] = array("Q", [MARK]) * length
        entries[lo + 1:hi:2] = mark_checksums(range(first + start, first + start + length), seed)
    return bits


def saved_entries(slot: int, p: int, q: int, sums: array) -> tuple[array, int]:
    """Entries of ``len(sums)`` consecutive blocks just saved in slots ``slot``, ``slot``
    + 1, ... with checksums ``sums``: blocks p..q-1 (the write's) changed, the others
    AHEAD. Return them and the changed bits (bit 0: the first block)."""
    n = len(sums)
    entries = no_entries(n)
    entries[0::2] = array("Q", chain(range(AHEAD + slot, AHEAD + slot + p),
                                     range(slot + p, slot + q),
                                     range(AHEAD + slot + q, AHEAD + slot + n)))
    entries[1::2] = sums
    return entries, ((1 << (q - p)) - 1) << p


def zero_entries(block: int, n: int, p: int, q: int, seed: int) -> tuple[array, int]:
    """Entries of ``n`` consecutive blocks from ``block`` whose old content is all zeros
    (saved without data): blocks p..q-1 (the write's) ZERO, the others ZERO_AHEAD.
    Return them and the changed bits (bit 0: the first block)."""
    entries = no_entries(n)
    entries[0::2] = array("Q", chain(repeat(ZERO_AHEAD, p), repeat(ZERO, q - p),
                                     repeat(ZERO_AHEAD, n - q)))
    entries[1::2] = zero_checksums(range(block, block + n), seed)
    return entries, ((1 << (q - p)) - 1) << p


def data_slots(entries: array) -> array:
    """The slot numbers of a snapshot file's ``entries`` (no MARK there): 0 where none,
    ZERO_SLOT where the entry is saved as zeros."""
    raw = entries[0::2]
    slots = array("Q", map(and_, raw, repeat(SLOT_MASK)))
    if raw and max(raw) >= ZERO_AHEAD:
        for k, slot in enumerate(raw):
            if slot == ZERO or slot == ZERO_AHEAD:
                slots[k] = ZERO_SLOT
    return slots


def top_slot(entries: array) -> int:
    """The highest slot number that ``entries`` name, 0 if none."""
    return max((s & SLOT_MASK for s in entries[0::2] if s < ZERO_AHEAD), default=0)


# -- page arithmetic ------------------------------------------------------------------
def window(number: int, first: int, end: int) -> tuple[int, int, int]:
    """Blocks [first, end) in index page ``number``: (base, lo, hi), where base is the
    page's first block and entries lo..hi-1 of the page are the blocks in the range
    (none when lo >= hi)."""
    base = number << PAGE_SHIFT
    lo, hi = first - base, end - base  # clipped without max() and min(): half the cost
    return base, lo if lo > 0 else 0, hi if hi < PAGE_BLOCKS else PAGE_BLOCKS


def bit_runs(bits: int):
    """Yield (start, length) of each run of set bits, lowest first."""
    while bits:
        start = (bits & -bits).bit_length() - 1
        shifted = bits >> start
        length = (~shifted & (shifted + 1)).bit_length() - 1
        yield start, length
        bits &= ~(((1 << length) - 1) << start)


def span_bits(start: int, end: int) -> int:
    """Bits start..end-1 set."""
    return ((1 << (end - start)) - 1) << start
