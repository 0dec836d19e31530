"""The index entry (snapengine/entry.py): encodings, predicates, checks, changes, windows."""

from __future__ import annotations

import errno
from array import array

import pytest

from snapengine import cowfile, entry
from snapengine.cowfile import PAGE_BLOCKS, mark_checksum
from snapengine.entry import AHEAD, MARK, SLOT_MASK
from snapengine.errors import SnapError

SEED = 0x1234_5678  # any uuid seed


def entries_of(*pairs) -> array:
    return array("Q", [x for pair in pairs for x in pair])


def test_encodings_are_the_layouts():
    """One home: entry re-exports cowfile's slot bits; the page shift matches the layout."""
    assert (AHEAD, MARK, SLOT_MASK) == (cowfile.AHEAD, cowfile.MARK, cowfile.SLOT_MASK)
    assert AHEAD == 1 << 62 and MARK == (1 << 64) - 1 and SLOT_MASK == AHEAD - 1
    assert 1 << entry.PAGE_SHIFT == PAGE_BLOCKS and entry.PAGE_MASK == PAGE_BLOCKS - 1


@pytest.mark.parametrize("slot, saved, changed, ahead, number", [
    pytest.param(0, False, False, False, 0, id="no-entry"),
    pytest.param(7, True, True, False, 7, id="saved-changed"),
    pytest.param(AHEAD | 7, True, False, True, 7, id="ahead-saved-not-changed"),
    pytest.param(MARK, False, True, False, 0, id="mark"),
])
def test_predicates(slot, saved, changed, ahead, number):
    assert entry.is_saved(slot) is saved
    assert entry.is_changed(slot) is changed
    assert entry.is_ahead(slot) is ahead
    assert entry.slot_number(slot) == number


def test_classify_valid_page():
    raw = entry.no_entries(PAGE_BLOCKS)
    first = 3 * PAGE_BLOCKS
    raw[0:2] = entries_of((1, 11))
    raw[2:4] = entries_of((AHEAD | 2, 12))
    raw[510:512] = entries_of((MARK, mark_checksum(first + 255, SEED)))
    saved, changed = entry.classify(raw, first, 2, SEED, "cow")
    assert saved == 0b11
    assert changed == 1 | 1 << 255


@pytest.mark.parametrize("slot, csum", [
    pytest.param(5, 0, id="slot-without-checksum"),
    pytest.param(0, 9, id="checksum-without-slot"),
    pytest.param(11, 9, id="slot-beyond-nr-slots"),
    pytest.param(AHEAD | 11, 9, id="ahead-slot-beyond-nr-slots"),
    pytest.param(AHEAD, 9, id="ahead-slot-zero"),
    pytest.param(1 << 63 | 3, 9, id="bit-63"),
    pytest.param(MARK, 9, id="mark-with-wrong-checksum"),
])
def test_classify_refuses_a_bad_entry(slot, csum):
    raw = entry.no_entries(4)
    raw[2:4] = entries_of((slot, csum))
    with pytest.raises(SnapError) as e:
        entry.classify(raw, 512, 10, SEED, "some.cow")
    assert e.value.errno == errno.EUCLEAN
    assert "some.cow" in str(e.value) and "block 513" in str(e.value)


def test_state_bits_match_classify():
    raw = entries_of((0, 0), (3, 1), (AHEAD | 4, 1), (MARK, mark_checksum(3, SEED)))
    assert entry.state_bits(raw) == entry.classify(raw, 0, 4, SEED, "cow") == (0b0110, 0b1010)


def page_with_ahead_and_nothing() -> tuple[array, int]:
    """Blocks 0-1: saved AHEAD, 2: saved and changed, 3-4: no entry, 5: AHEAD."""
    raw = entries_of((AHEAD | 1, 21), (AHEAD | 2, 22), (3, 23), (0, 0), (0, 0), (AHEAD | 4, 24))
    saved, _ = entry.state_bits(raw)
    return raw, saved


def test_mark_changed_snapshot_mode_clears_ahead_only_where_saved():
    raw, saved = page_with_ahead_and_nothing()
    bits = entry.mark_changed(raw, 256, 0b111011, saved, SEED, incremental=False)
    assert bits == 0b100011  # blocks 3 and 4 have no saved data: not marked
    assert raw.tolist() == [1, 21, 2, 22, 3, 23, 0, 0, 0, 0, 4, 24]
    assert entry.state_bits(raw) == (saved, 0b100111)


def test_mark_changed_incremental_mode_marks_or_clears_ahead():
    raw, saved = page_with_ahead_and_nothing()
    bits = entry.mark_changed(raw, 256, 0b111011, saved, SEED, incremental=True)
    assert bits == 0b111011
    assert raw.tolist() == [1, 21, 2, 22, 3, 23, MARK, mark_checksum(259, SEED),
                            MARK, mark_checksum(260, SEED), 4, 24]
    assert entry.classify(raw, 256, 4, SEED, "cow") == (saved, 0b111111)


@pytest.mark.parametrize("incremental", [False, True], ids=["snapshot", "incremental"])
@pytest.mark.parametrize("block", [0, 5], ids=["ahead", "ahead-last"])
def test_mark_changed_one_ahead_block(incremental, block):
    raw, saved = page_with_ahead_and_nothing()
    assert entry.mark_changed(raw, 0, 1 << block, saved, SEED, incremental) == 1 << block
    assert not entry.is_ahead(raw[2 * block]) and entry.is_changed(raw[2 * block])
    assert raw[2 * block + 1] == {0: 21, 5: 24}[block]  # the checksum is kept


def test_mark_changed_one_new_block():
    raw, saved = page_with_ahead_and_nothing()
    assert entry.mark_changed(raw, 0, 1 << 4, saved, SEED, incremental=False) == 0
    assert raw[8:10].tolist() == [0, 0]
    assert entry.mark_changed(raw, 0, 1 << 4, saved, SEED, incremental=True) == 1 << 4
    assert raw[8:10].tolist() == [MARK, mark_checksum(4, SEED)]


def test_saved_entries():
    sums = array("Q", [101, 102, 103, 104, 105])
    raw, changed = entry.saved_entries(40, 1, 3, sums)
    assert raw.tolist() == [AHEAD | 40, 101, 41, 102, 42, 103, AHEAD | 43, 104, AHEAD | 44, 105]
    assert changed == 0b00110
    saved, really = entry.classify(raw, 0, 44, SEED, "cow")
    assert (saved, really) == (0b11111, changed)


def test_saved_entries_all_changed_or_all_ahead():
    sums = array("Q", [1, 2])
    assert entry.saved_entries(1, 0, 2, sums) == (array("Q", [1, 1, 2, 2]), 0b11)
    assert entry.saved_entries(1, 2, 2, sums) == (array("Q", [AHEAD | 1, 1, AHEAD | 2, 2]), 0)


def test_data_and_top_slots():
    raw = entries_of((0, 0), (AHEAD | 9, 1), (4, 1))
    assert entry.data_slots(raw).tolist() == [0, 9, 4]
    assert entry.top_slot(raw) == 9
    assert entry.top_slot(entries_of((MARK, 5), (0, 0))) == 0


@pytest.mark.parametrize("number, first, end, expected", [
    pytest.param(0, 0, 256, (0, 0, 256), id="whole-page"),
    pytest.param(2, 512, 513, (512, 0, 1), id="first-block"),
    pytest.param(2, 767, 768, (512, 255, 256), id="last-block"),
    pytest.param(2, 700, 900, (512, 188, 256), id="runs-off-the-end"),
    pytest.param(3, 700, 900, (768, 0, 132), id="starts-before"),
    pytest.param(1, 0, 1000, (256, 0, 256), id="covers-the-page"),
    pytest.param(4, 700, 900, (1024, 0, -124), id="after-the-range"),
    pytest.param(1, 600, 700, (256, 344, 256), id="before-the-range"),
])
def test_window_at_page_edges(number, first, end, expected):
    base, lo, hi = entry.window(number, first, end)
    assert (base, lo, hi) == expected
    inside = [b for b in range(base, base + PAGE_BLOCKS) if first <= b < end]
    assert [base + i for i in range(lo, hi)] == inside


def test_bit_runs_and_span_bits():
    assert list(entry.bit_runs(0)) == []
    assert list(entry.bit_runs(0b1011100)) == [(2, 3), (6, 1)]
    assert list(entry.bit_runs(entry.span_bits(0, 256))) == [(0, 256)]
    assert entry.span_bits(3, 3) == 0 and entry.span_bits(1, 4) == 0b1110
