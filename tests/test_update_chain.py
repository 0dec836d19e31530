"""update-img with several COW files (INTERFACE.md §8): oldest first, an unbroken piece of
one chain ending just before the snapshot; the union of their changed blocks is copied
once. Every refusal exits EINVAL naming the file, image and stamp untouched."""

from __future__ import annotations

import errno
import os
import random
import shutil
from array import array
from types import SimpleNamespace

import nbd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapengine import changes, updateimg
from snapengine.changes import Scan
from snapengine.cowfile import FLAG_CLEAN, FLAG_FAILED, CowFile
from snapengine.errors import SnapError
from snapengine.stamp import SnapshotId, read_stamp, write_stamp
from tests.harness import (
    attached,
    daemon,
    digest,
    export_bytes,
    export_digest,
    frozen,
    mounted,
    require,
    run,
    sparse_file,
    update_img,
)

e2e = pytest.mark.e2e  # the tests through the daemon; the union and parse tests run in process

MiB = 1 << 20
SIZE = 16 * MiB
BLOCK = 4096


# -- union of change lists (in process) ---------------------------------------------------

def scan_of(blocks) -> Scan:
    """A Scan listing ``blocks``, merged into runs as changes.scan does."""
    extents = array("Q")
    for block in sorted(set(blocks)):
        if extents and extents[-2] + extents[-1] == block:
            extents[-1] += 1
        else:
            extents.extend((block, 1))
    return Scan(len(set(blocks)), 0, extents)


def blocks_of(extents: array) -> list[int]:
    return [b for block, count in changes.runs(extents) for b in range(block, block + count)]


@pytest.mark.parametrize("lists, merged", [
    ([], []),
    ([[]], []),
    ([[0, 1, 2]], [0, 3]),
    ([[0, 1], [1, 2]], [0, 3]),  # overlapping
    ([[0, 1], [2, 3]], [0, 4]),  # touching
    ([[0, 1, 2, 3, 4], [2]], [0, 5]),  # contained
    ([[5], [0], [9]], [0, 1, 5, 1, 9, 1]),  # disjoint, out of order between lists
    ([[0, 10], [10, 20], [20, 0]], [0, 1, 10, 1, 20, 1]),  # each block once
], ids=["none", "empty", "one", "overlap", "touch", "contained", "disjoint", "repeats"])
def test_union_merges_runs(lists, merged):
    assert changes.union(scan_of(b) for b in lists).tolist() == merged


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sets(st.integers(0, 300), max_size=80), max_size=5))
def test_union_is_the_set_union(lists):
    merged = changes.union(scan_of(b) for b in lists)
    expected = sorted(set().union(*lists))
    assert blocks_of(merged) == expected
    assert changes.nr_extent_blocks(merged) == len(expected)
    ends = [merged[i] + merged[i + 1] for i in range(0, len(merged), 2)]
    starts = merged[0::2]
    assert all(end < start for end, start in zip(ends, starts[1:]))  # maximal runs


def test_byte_extents_clip_the_last_block_to_the_origin():
    merged = changes.union([scan_of([0, 1]), scan_of([5, 6])])
    size = 6 * BLOCK + 100  # block 6 is partial
    assert list(changes.byte_extents(merged, size)) == [(0, 2 * BLOCK), (5 * BLOCK, BLOCK + 100)]


def fake(path: str, seq_id: int, uuid: bytes = b"\x01" * 16, size: int = SIZE):
    header = SimpleNamespace(uuid=uuid, seq_id=seq_id, origin_size=size)
    return changes.ChangeList(path, header, scan_of([]))


@pytest.mark.parametrize("second, words", [
    (fake("/b/second", 2, uuid=b"\x02" * 16), "another backup chain"),
    (fake("/b/second", 1), "given twice"),
    (fake("/b/second", 0), "oldest first"),
    (fake("/b/second", 3), "seq_id 2 is missing"),
    (fake("/b/second", 5), "seq_ids 2 to 4 are missing"),
    (fake("/b/second", 2, size=SIZE // 2), "sizes differ"),
], ids=["other-chain", "repeat", "order", "gap", "gaps", "size"])
def test_check_link_names_the_file_and_why(second, words):
    first = fake("/b/first", 1)
    with pytest.raises(SnapError) as e:
        updateimg.check_link(first, second, first)
    assert e.value.errno == errno.EINVAL
    assert "/b/second" in str(e.value) and words in str(e.value), str(e.value)


@pytest.mark.parametrize("argv, cows, image", [
    (["0", "c1", "img"], ["c1"], "img"),
    (["0", "c1", "c2", "c3", "img"], ["c1", "c2", "c3"], "img"),
    (["--full", "0", "img"], [], "img"),
    (["--stamp", "0", "img"], [], "img"),
], ids=["one", "three", "full", "stamp"])
def test_parse_takes_any_number_of_cow_files(argv, cows, image):
    args = updateimg.parse(argv)
    assert (args.cow_files, args.image) == (cows, image)


@pytest.mark.parametrize("argv", [["0", "img"], ["0"], ["--full", "0", "c1", "img"],
                                  ["--stamp", "0"]], ids=["no-cow", "none", "full", "stamp"])
def test_parse_refuses_wrong_counts(argv):
    with pytest.raises(SnapError) as e:
        updateimg.parse(argv)
    assert e.value.errno == errno.EINVAL and "wrong number of arguments" in str(e.value)


# -- a chain of four snapshots through the real daemon -------------------------------------

def write(h, *pieces: tuple[int, int]) -> None:
    for offset, length in pieces:
        h.pwrite(os.urandom(length), offset)
    h.flush()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Minor 0 on disk0: cow1, cow2, cow3 closed (seq 1 to 3), cow4 live (seq 4), with
    writes that overlap between the periods; image1 a full backup of snapshot 1. Minor 1
    on disk1: another chain, cowA and cowB closed (seq 1, 2)."""
    base = tmp_path_factory.mktemp("update-chain")
    disks = [sparse_file(str(base / f"disk{i}.img"), SIZE) for i in range(2)]
    with daemon(str(base / "run"), [(disks[0], "disk0"), (disks[1], "disk1")]) as d:
        h = nbd.NBD()
        h.connect_uri(d.uri("disk0"))
        write(h, (0, SIZE))
        d.elioctl("setup-snapshot", "disk0", base / "cow1", "0")
        assert update_img(d, "--full", "0", base / "image1").returncode == 0
        d.elioctl("transition-to-incremental", "0")
        write(h, (0, 2 * BLOCK), (2 * MiB, 64 * 1024), (SIZE - 2 * BLOCK, 2 * BLOCK))
        d.elioctl("transition-to-snapshot", base / "cow2", "0")
        d.elioctl("transition-to-incremental", "0")
        write(h, (BLOCK, BLOCK), (2 * MiB + 32 * 1024, MiB), (9 * MiB, BLOCK))
        d.elioctl("transition-to-snapshot", base / "cow3", "0")
        write(h, (5 * MiB, 16 * 1024), (2 * MiB, BLOCK))  # in snapshot mode
        d.elioctl("transition-to-incremental", "0")
        write(h, (0, 2 * BLOCK), (10 * MiB + 512, 3 * MiB))  # then change tracking only
        d.elioctl("transition-to-snapshot", base / "cow4", "0")
        h.shutdown()
        d.elioctl("setup-snapshot", "disk1", base / "cowA", "1")
        for cow in ("cowB", "cowC"):
            d.elioctl("transition-to-incremental", "1")
            d.elioctl("transition-to-snapshot", base / cow, "1")
        d.base = base
        d.uuid = d.info(0)["uuid"]
        yield d


@pytest.fixture
def image(chain, tmp_path):
    """A fresh copy of the full backup of snapshot 1, stamped as such."""
    path = tmp_path / "image"
    shutil.copy(chain.base / "image1", path)
    with open(path, "rb") as f:
        write_stamp(str(path), f.fileno(), read_stamp(str(chain.base / "image1")))
    return path


def listed(path) -> set[int]:
    with CowFile.open(str(path), writable=False) as cow:
        return set(changes.changed_blocks(cow))


@e2e
def test_the_full_backup_is_stamped_as_snapshot_1(chain, image):
    assert read_stamp(str(image)) == SnapshotId(chain.uuid, 1)
    assert chain.info(0)["seq_id"] == 4


@e2e
def test_three_cow_files_bring_snapshot_1_to_4(chain, image):
    cows = [chain.base / f"cow{i}" for i in (1, 2, 3)]
    union = set().union(*map(listed, cows))
    assert len(union) < sum(len(listed(c)) for c in cows)  # overlaps: copied once
    r = update_img(chain, "0", *cows, image)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"copying complete: {len(union)} blocks changed, 0 errors\n"
    assert r.stderr == ""
    assert digest(image) == export_digest(chain.uri("elastio-snap0"))
    assert read_stamp(str(image)) == SnapshotId(chain.uuid, 4)


@e2e
def test_the_same_catch_up_twice_is_refused(chain, image):
    """Re-running the catch-up on the updated image: its stamp says snapshot 4 now."""
    cows = [chain.base / f"cow{i}" for i in (1, 2, 3)]
    assert update_img(chain, "0", *cows, image).returncode == 0
    before = digest(image)
    r = update_img(chain, "0", *cows, image)
    assert r.returncode == errno.EINVAL and "holds snapshot 4" in r.stderr, r.stderr
    assert digest(image) == before


def copy_with_flags(src, dst, set_flags: int = 0, clear_flags: int = 0, **fields):
    shutil.copy(src, dst)
    with CowFile.open(str(dst)) as cow:
        cow.write_header(flags=(cow.header.flags | set_flags) & ~clear_flags, **fields)
    return dst


REFUSALS = {
    # case: (cow files, the file the message names, words in it)
    "gap": (["cow1", "cow3"], "cow3", "seq_id 2 is missing"),
    "wrong-order": (["cow2", "cow1", "cow3"], "cow1", "oldest first"),
    "repeat": (["cow1", "cow1", "cow2", "cow3"], "cow1", "given twice"),
    "other-chain": (["cow1", "cowB", "cow3"], "cowB", "another backup chain"),
    "other-chain-whole": (["cowA", "cowB"], "cowB", "another backup chain"),
    "dirty": (["cow1", "dirty", "cow3"], "dirty", "not closed cleanly"),
    "failed": (["cow1", "failed", "cow3"], "failed", "failed snapshot"),
    "not-the-last": (["cow1", "cow2"], "cow2", "seq_id 3"),
    "stamp-seq-id": (["cow1", "cow2", "cow3"], "image", "holds snapshot 2"),
}


@e2e
@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_file_and_leave_the_image_untouched(chain, image, tmp_path, case):
    names, culprit, words = REFUSALS[case]
    paths = {name: chain.base / name for name in names}
    if case == "dirty":
        paths["dirty"] = copy_with_flags(chain.base / "cow2", tmp_path / "dirty",
                                         clear_flags=FLAG_CLEAN)
    elif case == "failed":
        paths["failed"] = copy_with_flags(chain.base / "cow2", tmp_path / "failed",
                                          set_flags=FLAG_FAILED, error=-errno.ENOSPC)
    elif case == "stamp-seq-id":
        with open(image, "rb") as f:
            write_stamp(str(image), f.fileno(), SnapshotId(chain.uuid, 2))
    before, stamp = digest(image), read_stamp(str(image))
    r = update_img(chain, "0", *(paths[name] for name in names), image)
    assert r.returncode == errno.EINVAL, (r.stdout, r.stderr)
    assert r.stderr.startswith("update-img: ") and r.stderr.count("\n") == 1
    culprit_path = image if culprit == "image" else paths[culprit]
    assert str(culprit_path) in r.stderr and words in r.stderr, r.stderr
    assert r.stdout == ""
    assert digest(image) == before and read_stamp(str(image)) == stamp


@e2e
def test_an_unstamped_image_is_taken_with_a_warning(chain, tmp_path):
    image = tmp_path / "unstamped"
    shutil.copy(chain.base / "image1", image)  # no stamp: as nbdcopy leaves it
    cows = [chain.base / f"cow{i}" for i in (1, 2, 3)]
    r = update_img(chain, "0", *cows, image)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("\n") == 1 and "--stamp" in r.stderr
    assert image.read_bytes() == export_bytes(chain, "elastio-snap0")
    assert read_stamp(str(image)) == SnapshotId(chain.uuid, 4)


# -- a real ext4 -------------------------------------------------------------------------

def change_files(top: str, rng: random.Random, names: list[str]) -> None:
    os.makedirs(top, exist_ok=True)
    for name in names:
        with open(os.path.join(top, name), "wb") as f:
            f.write(rng.randbytes(rng.randrange(4096, 512 * 1024)))
    run(["sync"])


@e2e
def test_ext4_image_caught_up_across_two_snapshots(tmp_path):
    require("mkfs.ext4", "e2fsck", "fsfreeze")
    rng = random.Random(20261203)
    disk = sparse_file(str(tmp_path / "disk0.img"), SIZE)
    image = tmp_path / "image"
    with daemon(str(tmp_path / "run"), [(disk, "disk0")]) as d:
        with attached(d.uri("disk0"), str(tmp_path / "fuse")) as dev:
            run(["mkfs.ext4", "-q", "-F", dev])
            with mounted(dev, str(tmp_path / "fs")) as fs:
                change_files(os.path.join(fs, "data"), rng, ["a", "b", "c"])
                with frozen(fs):
                    d.elioctl("setup-snapshot", "disk0", tmp_path / "cow1", "0")
                assert update_img(d, "--full", "0", image).returncode == 0
                run(["e2fsck", "-fn", image])
                for seq_id, names in ((2, ["a", "d"]), (3, ["b", "e", "f"])):
                    d.elioctl("transition-to-incremental", "0")
                    change_files(os.path.join(fs, "data"), rng, names)
                    os.unlink(os.path.join(fs, "data", "c" if seq_id == 2 else "d"))
                    run(["sync"])
                    with frozen(fs):
                        d.elioctl("transition-to-snapshot", tmp_path / f"cow{seq_id}", "0")
                r = update_img(d, "0", tmp_path / "cow1", tmp_path / "cow2", image)
                assert r.returncode == 0, r.stderr
                assert r.stdout.startswith("copying complete: ")
                assert r.stdout.endswith(" blocks changed, 0 errors\n")
                run(["e2fsck", "-fn", image])
                assert digest(image) == export_digest(d.uri("elastio-snap0"))
                assert read_stamp(str(image)) == SnapshotId(d.info(0)["uuid"], 3)
