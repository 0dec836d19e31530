"""One flipped byte in a closed COW file: the result is exactly right or a clear failure,
never wrong data.

A chain is built in process (engine.Engine): snapshot 1 into ``incr``, which becomes an
incremental file and is closed by snapshot 2 into ``snap``. Then one byte is flipped at
one position (every header field, the padding after the header, index entries of each
kind, the saved data, the write-intent area, unused areas) and:

(a) ``snap`` (a snapshot file) is resumed by a restart (the registry brings it back) or
    by reload-snapshot, and every block of the snapshot is read and compared with the
    image at its snapshot point; when it reads right, the origin is written some more
    and the snapshot read again;
(b) ``incr`` (an incremental file) is given to ``elioctl changed-blocks``, to
    ``update-img`` (a real daemon serving snapshot 2) and to reload-incremental
    followed by a transition-to-snapshot.

Allowed outcomes: ``intact`` (everything right), ``refused`` (resume or verification
fails, ``error`` set, EINVAL from changed-blocks/update-img), ``eio`` (the affected read
fails with EIO and the minor reports ``error``). ``WRONG`` fails the test. Each
position's outcome is printed in a table at the end of the module.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
from collections import defaultdict

import pytest

from snapengine import changes
from snapengine.cowfile import (
    AHEAD,
    ENTRY,
    HEADER,
    HEADER_AREA,
    INDEX_OFFSET,
    MARK,
    SLOT_MASK,
    CowFile,
    intent_offset_for,
)
from snapengine.engine import Engine
from tests.harness import BIN, Daemon, run

MiB = 1 << 20
BLOCK = 4096
ORIGIN_SIZE = 8 * MiB + 2 * BLOCK + 100  # 2051 blocks, the last one partial (100 bytes)
NR_BLOCKS = (ORIGIN_SIZE + BLOCK - 1) // BLOCK
LAST = NR_BLOCKS - 1

# (offset, length) of the changes, by phase; "zero" writes zeroes, "trim" whatever the
# origin then reads
PHASE_A = [("write", 10 * BLOCK, 4 * BLOCK), ("write", 300 * BLOCK + 17, 100),
           ("write", 5 * MiB + 100, 5000), ("write", ORIGIN_SIZE - 50, 50),
           ("trim", 6 * MiB, 2 * BLOCK), ("zero", 7 * MiB, BLOCK)]  # snapshot 1, saved
PHASE_B = [("write", 11 * BLOCK, BLOCK), ("write", 600 * BLOCK, 3 * BLOCK),
           ("write", (LAST - 1) * BLOCK, BLOCK), ("write", 0, 512)]  # incremental: marks
PHASE_C = [("write", 0, 4 * BLOCK), ("write", 700 * BLOCK, BLOCK),
           ("write", ORIGIN_SIZE - 100, 100), ("write", 3 * MiB, 64 * 1024),
           ("write", 6 * MiB, BLOCK), ("write", 255 * BLOCK, 2 * BLOCK),
           ("write", 11 * BLOCK, BLOCK)]  # snapshot 2, saved into ``snap``
PHASE_D = [("write", 1000 * BLOCK, BLOCK), ("write", 10 * BLOCK, BLOCK),
           ("write", (LAST - 1) * BLOCK, 2 * BLOCK - 4000)]  # after a resume

OUTCOMES: dict[str, dict[str, str]] = defaultdict(dict)  # position -> check -> outcome


def blocks_of(changes_list) -> set[int]:
    return {b for _, offset, length in changes_list
            for b in range(offset // BLOCK, (offset + length + BLOCK - 1) // BLOCK)}


class Chain:
    """The files of one built chain, and what they must say."""

    def __init__(self, top, seed: int = 5) -> None:
        self.top = top
        self.origin = str(top / "disk.img")
        self.run_dir = str(top / "run")
        self.incr = str(top / "incr")
        self.snap = str(top / "snap")
        rng = random.Random(seed)
        model = bytearray(rng.randbytes(ORIGIN_SIZE))
        with open(self.origin, "wb") as f:
            f.write(model)
        with Engine(self.run_dir, [(self.origin, "disk")]) as engine:
            h = engine.open_export("disk", False)
            engine.setup_snapshot("disk", self.incr, 0, fallocate_mb=8)
            self.image1 = bytes(model)
            apply(h, model, PHASE_A, rng)
            engine.transition_to_incremental(0)
            apply(h, model, PHASE_B, rng)
            self.image2 = bytes(model)
            engine.transition_to_snapshot(self.snap, 0)
            apply(h, model, PHASE_C, rng)
            self.final = bytes(model)
            h.close()
        # a trim during the snapshot (PHASE_A) is dropped: it changes nothing
        self.incr_blocks = blocks_of([op for op in PHASE_A if op[0] != "trim"] + PHASE_B)


def apply(h, model: bytearray, ops, rng: random.Random) -> None:
    for kind, offset, length in ops:
        if kind == "write":
            data = rng.randbytes(length)
            h.pwrite(data, offset, False)
        elif kind == "trim":  # what a trimmed range reads is unspecified (NBD): during
            h.trim(length, offset, False)  # a snapshot it keeps its content
            data = bytearray(length)
            h.pread(data, offset)
        else:
            data = bytes(length)
            h.zero(length, offset, False, False)
        model[offset:offset + length] = data


def flip(path: str, offset: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1) or b"\0"  # past the end: a hole, reads as zero
        f.seek(offset)
        f.write(bytes([old[0] ^ mask]))


def entry_offset(block: int, byte: int = 0) -> int:
    return INDEX_OFFSET + block * 16 + byte


class Layout:
    """Where things are in one closed COW file: its header and its index entries by kind
    ("mark", "changed": saved and changed, "ahead": saved ahead, not changed,
    "empty": (0, 0) in a page that has entries), found by reading the file."""

    def __init__(self, path: str) -> None:
        with CowFile.open(path, writable=False) as cow:
            self.h = cow.header
            raw = cow.io.pread(NR_BLOCKS * 16, INDEX_OFFSET).ljust(NR_BLOCKS * 16, b"\0")
        self.entries = [ENTRY.unpack_from(raw, 16 * b) for b in range(NR_BLOCKS)]
        used_pages = {b // 256 for b, (slot, csum) in enumerate(self.entries) if slot or csum}
        self.kinds: dict[str, list[int]] = defaultdict(list)
        for block, (slot, csum) in enumerate(self.entries):
            if slot == MARK:
                self.kinds["mark"].append(block)
            elif slot & AHEAD:
                self.kinds["ahead"].append(block)
            elif slot:
                self.kinds["changed"].append(block)
                if slot & SLOT_MASK == 1:
                    self.kinds["slot-1"].append(block)
                elif slot & SLOT_MASK ^ 1 <= self.h.nr_slots:
                    self.kinds["slot-flip-in-range"].append(block)
            elif block // 256 in used_pages:
                self.kinds["empty"].append(block)
        nr_pages = (NR_BLOCKS + 255) // 256
        self.hole_pages = [p for p in range(nr_pages) if p not in used_pages]

    def entry(self, kind: str, byte: int, n: int = 0) -> int:
        blocks = self.kinds[kind]
        assert blocks, f"no {kind} entry in this file: the scenario needs one"
        return entry_offset(blocks[min(n, len(blocks) - 1)], byte)


# -- positions ------------------------------------------------------------------------
# Each: id -> (offset, computed from the file's Layout; xor mask)

FIELDS = ["magic", "version", "flags", "block_size", "header_size", "origin_size", "uuid",
          "seq_id", "nr_changed_blocks", "fallocate", "index_offset", "data_offset",
          "nr_slots", "error", "reserved", "boot_id", "generation", "checksum"]
FIELD_OFFSETS = dict(zip(FIELDS, [0, 8, 12, 16, 20, 24, 32, 48, 56, 64, 72, 80, 88, 96, 100,
                                  104, 120, 128]))
assert HEADER.size == 136


def header_positions() -> dict:
    pos = {f"header-{name}": (lambda lay, o=o: o, 0x01) for name, o in FIELD_OFFSETS.items()}
    pos.update({
        "header-flags-failed-bit": (lambda lay: 12, 0x04),
        "header-uuid-last-byte": (lambda lay: 47, 0x80),
        "header-origin_size-high": (lambda lay: 27, 0x01),
        "header-nr_slots-high": (lambda lay: 89, 0x80),
        "header-checksum-last-byte": (lambda lay: 135, 0x80),
        "padding-first-byte": (lambda lay: HEADER.size, 0x01),
        "padding-middle": (lambda lay: 2000, 0x80),
        "padding-last-byte": (lambda lay: HEADER_AREA - 1, 0x01),
    })
    return pos


def saved_entry_positions(prefix: str) -> dict:
    """Entries with saved data: changed ones and AHEAD ones (in an incremental file,
    left from its snapshot phase: they still say changed / not changed)."""
    return {
        f"{prefix}changed-entry-slot-to-zero": (lambda lay: lay.entry("slot-1", 0), 0x01),
        f"{prefix}changed-entry-slot-in-range": (
            lambda lay: lay.entry("slot-flip-in-range", 0), 0x01),
        f"{prefix}changed-entry-slot-high-bit": (lambda lay: lay.entry("changed", 7, 1), 0x80),
        f"{prefix}changed-entry-to-ahead": (lambda lay: lay.entry("changed", 7, 2), AHEAD >> 56),
        f"{prefix}changed-entry-checksum-low": (lambda lay: lay.entry("changed", 8, 3), 0x01),
        f"{prefix}changed-entry-checksum-high": (lambda lay: lay.entry("changed", 15, 4), 0x80),
        f"{prefix}ahead-entry-to-changed": (lambda lay: lay.entry("ahead", 7, 0), AHEAD >> 56),
        f"{prefix}ahead-entry-slot": (lambda lay: lay.entry("ahead", 0, 1), 0x01),
        f"{prefix}ahead-entry-checksum": (lambda lay: lay.entry("ahead", 8, 2), 0x01),
        f"{prefix}last-block-entry-slot": (lambda lay: entry_offset(LAST, 0), 0x02),
        f"{prefix}last-block-entry-checksum": (lambda lay: entry_offset(LAST, 9), 0x01),
    }


def common_tail_positions() -> dict:
    return {
        "unused-entry-slot": (lambda lay: lay.entry("empty", 0), 0x01),
        "unused-entry-checksum": (lambda lay: lay.entry("empty", 8, 5), 0x80),
        "hole-index-page": (lambda lay: entry_offset(lay.hole_pages[0] * 256 + 7, 3), 0x01),
        "entry-past-last-block": (lambda lay: entry_offset(NR_BLOCKS + 3, 0), 0x01),
        "index-last-byte-of-last-page": (lambda lay: intent_offset_for(lay.h.origin_size) - 1,
                                         0x01),
        "intent-first-byte": (lambda lay: intent_offset_for(lay.h.origin_size), 0x01),
        "intent-last-byte": (lambda lay: intent_offset_for(lay.h.origin_size) + BLOCK - 1,
                             0x80),
        "gap-before-data": (lambda lay: lay.h.data_offset - 1, 0x01),
    }


SNAP_POSITIONS = {
    **header_positions(),
    **saved_entry_positions(""),
    **common_tail_positions(),
    "data-first-byte": (lambda lay: lay.h.data_offset, 0x01),
    "data-middle-of-a-slot": (lambda lay: lay.h.data_offset + 5 * BLOCK + 2048, 0x80),
    "data-last-byte": (lambda lay: lay.h.data_offset + lay.h.nr_slots * BLOCK - 1, 0x01),
    "data-past-last-slot": (lambda lay: lay.h.data_offset + lay.h.nr_slots * BLOCK + 10, 0x01),
}

INCR_POSITIONS = {
    **header_positions(),
    "mark-slot-low": (lambda lay: lay.entry("mark", 0, 0), 0x01),
    "mark-slot-high": (lambda lay: lay.entry("mark", 7, 1), 0x80),
    "mark-checksum-low": (lambda lay: lay.entry("mark", 8, 2), 0x01),
    "mark-checksum-high": (lambda lay: lay.entry("mark", 15, 3), 0x80),
    **saved_entry_positions("kept-"),
    **common_tail_positions(),
    "released-data-area": (lambda lay: lay.h.data_offset + 3 * BLOCK, 0x01),
}


# -- (a) snapshot files ------------------------------------------------------------------

def read_every_block(engine, image: bytes) -> tuple[str, list[int]]:
    """Read each block of elastio-snap0: 'intact', 'eio' (some reads EIO, the minor
    failed), 'refused' (no export: the minor failed); WRONG blocks are returned."""
    try:
        snap = engine.open_export("elastio-snap0", True)
    except OSError as e:
        assert e.errno == errno.ENOENT, e
        return "refused", []
    wrong, eio = [], []
    for block in range(NR_BLOCKS):
        length = min(BLOCK, ORIGIN_SIZE - block * BLOCK)
        buf = bytearray(length)
        try:
            snap.pread(buf, block * BLOCK)
        except OSError as e:
            assert e.errno == errno.EIO, f"block {block}: {e!r}"
            eio.append(block)
            continue
        if buf != image[block * BLOCK:block * BLOCK + length]:
            wrong.append(block)
    if wrong:
        return "WRONG", wrong
    if eio:
        info = engine.info(0)
        assert info.get("error", 0) < 0, f"reads failed with EIO but info has no error: {info}"
        return "eio", []
    return "intact", []


def snapshot_outcome(chain: Chain, how: str, tmp_path) -> tuple[str, list[int]]:
    """Resume ``chain.snap`` (restart: from the registry; reload: reload-snapshot in a
    new run directory), bring the origin online, read every block."""
    run_dir = chain.run_dir if how == "restart" else str(tmp_path / "run2")
    with Engine(run_dir, [(chain.origin, "disk")]) as engine:
        if how == "reload":
            engine.reload_snapshot("disk", chain.snap, 0)
        h = engine.open_export("disk", False)  # the device comes online: verified now
        if engine.info(0).get("error"):
            outcome, bad = read_every_block(engine, chain.image2)
            assert outcome in ("refused", "eio"), (outcome, bad)
            return "refused", []
        outcome, bad = read_every_block(engine, chain.image2)
        if outcome != "intact":
            return outcome, bad
        model = bytearray(chain.final)  # keep going: more first touches and re-touches
        apply(h, model, PHASE_D, random.Random(3))
        outcome, bad = read_every_block(engine, chain.image2)
        h.close()
        return ("intact" if outcome == "intact" else f"{outcome} (after more writes)"), bad


@pytest.mark.parametrize("how", ["restart", "reload"])
@pytest.mark.parametrize("position", list(SNAP_POSITIONS))
def test_flipped_byte_in_a_snapshot_file(tmp_path, position, how):
    chain = Chain(tmp_path)
    where, mask = SNAP_POSITIONS[position]
    offset = where(Layout(chain.snap))
    flip(chain.snap, offset, mask)
    outcome, bad = snapshot_outcome(chain, how, tmp_path)
    OUTCOMES[f"snap {position} @{offset} ^{mask:#04x}"][how] = outcome
    assert not outcome.startswith("WRONG"), f"snapshot read wrong data in blocks {bad[:20]}"


def test_unflipped_chain_reads_right(tmp_path):
    """The control: without a flip, both files give exactly the right answers."""
    chain = Chain(tmp_path)
    with CowFile.open(chain.incr, writable=False) as cow:
        assert set(changes.changed_blocks(cow)) == chain.incr_blocks
    for how in ("restart", "reload"):
        assert snapshot_outcome(chain, how, tmp_path / how) == ("intact", [])


# -- (b) incremental files ----------------------------------------------------------------

@pytest.fixture(scope="module")
def served_chain(tmp_path_factory):
    """A chain whose snapshot 2 is served by a real daemon (for update-img)."""
    top = tmp_path_factory.mktemp("integrity")
    chain = Chain(top)
    d = Daemon(chain.run_dir, [(chain.origin, "disk")])
    d.start()
    try:
        assert d.info(0)["seq_id"] == 2 and "error" not in d.info(0)
        yield chain, d
    finally:
        d.stop()


def sparse_copy(src: str, dst: str) -> None:
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)


def changed_blocks_outcome(cow: str, expected: set[int]) -> str:
    r = run([os.path.join(BIN, "elioctl"), "changed-blocks", "--json", cow], check=False)
    if r.returncode == errno.EINVAL:
        assert r.stderr.startswith("elioctl: changed-blocks: Invalid argument:"), r.stderr
        return "refused"
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    listed = {b for e in doc["extents"]
              for b in range(e["offset"] // BLOCK, (e["offset"] + e["length"] + BLOCK - 1) // BLOCK)}
    return "intact" if listed == expected and doc["nr_changed_blocks"] == len(expected) \
        else f"WRONG: {sorted(listed ^ expected)[:10]} differ"


def extents_of(change_list) -> list[tuple[int, int]]:
    ext = change_list.scan.extents
    return [(ext[i], ext[i + 1]) for i in range(0, len(ext), 2)]


def update_img_outcome(d: Daemon, cow: str, chain: Chain, image: str) -> str:
    with open(image, "wb") as f:
        f.write(chain.image1)
    r = run([os.path.join(BIN, "update-img"), "--run-dir", d.run_dir, "0", cow, image],
            check=False)
    with open(image, "rb") as f:
        result = f.read()
    if r.returncode == errno.EINVAL:
        assert result == chain.image1, "update-img refused the file but touched the image"
        return "refused"
    assert r.returncode == 0, r.stderr
    return "intact" if result == chain.image2 else "WRONG: the updated image is not snapshot 2"


def reload_incremental_outcome(cow: str, chain: Chain, tmp_path) -> str:
    """reload-incremental, more changes, transition-to-snapshot: the closed list must hold
    every change (a superset), or the file is refused or the minor fails."""
    origin = str(tmp_path / "origin-copy.img")
    with open(origin, "wb") as f:
        f.write(chain.final)
    with Engine(str(tmp_path / "run3"), [(origin, "disk")]) as engine:
        engine.reload_incremental("disk", cow, 0)
        h = engine.open_export("disk", False)
        if engine.info(0).get("error"):
            return "refused"
        apply(h, bytearray(chain.final), PHASE_D, random.Random(4))
        if engine.info(0).get("error"):
            try:
                changes.read_closed(cow)
            except OSError as e:
                assert e.errno == errno.EINVAL
                return "failed while tracking, list refused"
            return "WRONG: a failed list is still accepted"
        engine.transition_to_snapshot(str(tmp_path / "next"), 0)
        h.close()
    try:
        listed = {b for s, n in extents_of(changes.read_closed(cow)) for b in range(s, s + n)}
    except OSError as e:
        assert e.errno in (errno.EINVAL, errno.EUCLEAN), e
        return "refused when closed"
    missing = (chain.incr_blocks | blocks_of(PHASE_D)) - listed
    return "intact" if not missing else f"WRONG: changed blocks {sorted(missing)[:10]} lost"


@pytest.mark.e2e
@pytest.mark.parametrize("position", list(INCR_POSITIONS))
def test_flipped_byte_in_an_incremental_file(served_chain, tmp_path, position):
    chain, d = served_chain
    cow = str(tmp_path / "incr")
    sparse_copy(chain.incr, cow)
    where, mask = INCR_POSITIONS[position]
    offset = where(Layout(cow))
    flip(cow, offset, mask)
    row = OUTCOMES[f"incr {position} @{offset} ^{mask:#04x}"]
    row["changed-blocks"] = changed_blocks_outcome(cow, chain.incr_blocks)
    row["update-img"] = update_img_outcome(d, cow, chain, str(tmp_path / "image"))
    row["reload"] = reload_incremental_outcome(cow, chain, tmp_path)
    assert row["changed-blocks"] == row["update-img"], row  # one verdict for one file
    assert not any(v.startswith("WRONG") for v in row.values()), row


def test_unflipped_incremental_file_is_right(served_chain, tmp_path):
    chain, d = served_chain
    cow = str(tmp_path / "incr")
    sparse_copy(chain.incr, cow)
    assert changed_blocks_outcome(cow, chain.incr_blocks) == "intact"
    assert update_img_outcome(d, cow, chain, str(tmp_path / "image")) == "intact"
    assert reload_incremental_outcome(cow, chain, tmp_path) == "intact"


# -- the table -------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def outcome_table(request):
    yield
    if not OUTCOMES:
        return
    columns = ["restart", "reload", "changed-blocks", "update-img"]
    lines = [f"{'position':<58} " + " ".join(f"{c:<15}" for c in columns)]
    for position in sorted(OUTCOMES):
        row = OUTCOMES[position]
        cells = [row.get(c, "") for c in columns]  # reload: -snapshot or -incremental
        lines.append(f"{position:<58} " + " ".join(f"{c:<15}" for c in cells))
    counts = defaultdict(int)
    for row in OUTCOMES.values():
        for v in row.values():
            counts[v.split(" (")[0]] += 1
    lines.append("outcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_sep("-", "flipped-byte outcomes")
            reporter.write_line("\n".join(lines))
    OUTCOMES.clear()
