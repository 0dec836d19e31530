"""elioctl status (INTERFACE.md §10): the info document as one readable line per minor.

The formatter is a pure function, tested on handcrafted device objects: every state,
failed minors (change list kept or lost), absent fields, wide and unprintable paths.
The last test runs the real daemon with five minors in five situations at once (active
snapshot, active incremental, overflowed, dormant, unverified), reached through NBD
clients alone (no loop device), and ``elioctl status`` as a process.
"""

from __future__ import annotations

import errno
import os

import pytest

from snapengine import cli
from snapengine.status import HEADER, NO_MINORS, STATE_NAMES, format_status, human_size
from tests import harness
from tests.harness import daemon, sparse_file

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
SIZE = 8 * MiB  # each origin of the end-to-end test
OVERFLOW = (
    "COW file /var/backup/b1 reached its limit of 1048576 bytes (-f; auto-expand is off); "
    "the snapshot can no longer be kept")


def device(minor: int = 4, state: int = 3, **fields) -> dict:
    """A device object of an open COW file, as Minor.info gives it; ``fields`` override
    (a value None removes the field)."""
    d = {"minor": minor, "cow_file": f"/var/backup/cow{minor}",
         "block_device": f"/srv/disk{minor}.img", "max_cache": 300 * MiB,
         "fallocate": GiB, "seq_id": 1, "uuid": "7a9ac09e945442b384479ff990fedc3b",
         "version": 1, "nr_changed_blocks": 3072, "cow_size_current": 12 * MiB,
         "auto_expand": {"step_size_mib": 0, "reserved_space_mib": 0}, "state": state}
    d.update(fields)
    return {k: v for k, v in d.items() if v is not None}


def unverified(minor: int = 5, state: int = 5) -> dict:
    """A reloaded minor before its check: no open COW file, so no sizes, no counts."""
    return {"minor": minor, "cow_file": f"/var/backup/cow{minor}",
            "block_device": f"/srv/disk{minor}.img", "max_cache": 300 * MiB, "state": state}


def lines_of(devices: list[dict]) -> list[str]:
    """The minor lines of the table (the header checked and dropped)."""
    header, *lines = format_status(devices).split("\n")
    assert header.split("  ")[0] == "MINOR" and header.endswith("ERROR")
    return lines


def columns(line: str, header: str) -> list[str]:
    """``line`` cut at the offsets where the header's columns start."""
    starts = [header.index(name) for name in HEADER]
    ends = starts[1:] + [len(line)]
    return [line[a:b].strip() for a, b in zip(starts, ends)]


# ---- the formatter ----------------------------------------------------------------------

@pytest.mark.parametrize("state, name", [
    (0, "dormant incremental"), (1, "dormant snapshot"), (2, "active incremental"),
    (3, "active snapshot"), (4, "unverified incremental"), (5, "unverified snapshot"),
], ids=lambda v: str(v).replace(" ", "-"))
def test_every_state_by_name(state, name):
    assert STATE_NAMES[state] == name
    [line] = lines_of([device(minor=7, state=state)])
    assert line.startswith("7 ") and f"  {name}  " in line


def test_a_healthy_snapshot_line():
    header, line = format_status([device()]).split("\n")
    assert columns(line, header) == [
        "4", "active snapshot", "/srv/disk4.img", "/var/backup/cow4",
        "12.0 MiB / 1.0 GiB", "3072", "-"]


@pytest.mark.parametrize("tracking, kept", [(True, "change list kept"),
                                            (False, "change list lost")],
                         ids=["kept", "lost"])
def test_a_failed_minor_shows_the_errno_name_the_reason_and_the_list(tracking, kept):
    failed = device(error=-errno.EFBIG, error_text=f"File too large: {OVERFLOW}",
                    tracking=tracking, cow_size_current=MiB, fallocate=MiB)
    header, line = format_status([failed]).split("\n")
    cells = columns(line, header)
    assert cells[1] == "active snapshot"  # failure is not a state
    assert cells[4] == "1.0 MiB / 1.0 MiB"
    assert cells[-1] == f"EFBIG: {OVERFLOW}; {kept}"  # the strerror gives way to the name


def test_a_failed_unverified_minor_and_an_unknown_errno():
    bad = unverified() | {"error": -errno.EINVAL, "error_text": "uuid of another chain"}
    odd = device(minor=6, error=-4000, error_text="")
    one, other = lines_of([bad, odd])
    assert one.endswith("EINVAL: uuid of another chain")  # no tracking field: not said
    assert other.endswith("errno 4000: no reason given")


def test_absent_fields_are_a_dash():
    header, line = format_status([unverified()]).split("\n")
    assert columns(line, header) == [
        "5", "unverified snapshot", "/srv/disk5.img", "/var/backup/cow5", "-", "-", "-"]
    half = device(cow_size_current=None)  # one size without the other
    assert "- / 1.0 GiB" in lines_of([half])[0]


def test_an_unknown_state_is_shown_by_number():
    assert "  state 9  " in lines_of([device(state=9)])[0]


def test_columns_are_as_wide_as_their_content():
    wide = "/var/backup/" + "very-long-directory-name/" * 4 + "cow1"
    devices = [device(minor=0), device(minor=12, cow_file=wide, state=2), unverified(minor=3)]
    header, *lines = format_status(devices).split("\n")
    assert [line.split()[0] for line in lines] == ["0", "12", "3"]  # the document's order
    for line in lines:  # every column starts where its header does
        assert columns(line, header)[3] in (wide, "/var/backup/cow0", "/var/backup/cow3")
        assert columns(line, header)[5] in ("3072", "-")
    assert header.index("USED / LIMIT") == header.index("COW FILE") + len(wide) + 2
    assert all(line == line.rstrip() for line in lines)
    narrow = format_status([device()]).split("\n")[0]  # no room kept for a wide path
    cow_width = len("/var/backup/cow4")
    assert narrow.index("USED / LIMIT") == narrow.index("COW FILE") + cow_width + 2


def test_unprintable_characters_do_not_break_the_line():
    path = "/var/backup/a\nb\udcff\tc"  # a newline, a byte that is not UTF-8, a tab
    text = format_status([device(cow_file=path)])
    assert text.count("\n") == 1
    assert "/var/backup/a\\nb\\xff\\tc" in text
    text.encode("utf-8")  # printable on any UTF-8 terminal: no lone surrogate left


def test_no_minors():
    assert format_status([]) == NO_MINORS


@pytest.mark.parametrize("value, text", [
    (None, "-"), (0, "0 B"), (1023, "1023 B"), (KiB, "1.0 KiB"), (1536, "1.5 KiB"),
    (12 * MiB, "12.0 MiB"), (GiB, "1.0 GiB"), (5 * GiB // 2, "2.5 GiB"),
    (1 << 70, "1024.0 EiB"),
], ids=str)
def test_human_size(value, text):
    assert human_size(value) == text


def test_no_daemon_fails_as_info_does(tmp_path, capsys):
    """No socket: ENOENT from the same request, on one line naming the sub-command."""
    assert cli.main(["--run-dir", str(tmp_path), "status"]) == errno.ENOENT
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("elioctl: status: No such file or directory: ")


# ---- the real daemon --------------------------------------------------------------------

def overflow(d, cow: str) -> None:
    """Minor 2 on disk2 (full of data): a 1 MiB limit, then 2 MiB of writes past it."""
    d.elioctl("setup-snapshot", "-f", "1", "disk2", cow, "2")
    h = harness.connect(d.uri("disk2"))
    h.pwrite(os.urandom(2 * MiB), 0)  # the write succeeds; the snapshot fails
    h.flush()
    h.shutdown()


def dormant(d, cow: str) -> None:
    """Minor 3 on disk3: a snapshot whose origin's only client has gone."""
    d.elioctl("setup-snapshot", "disk3", cow, "3")
    h = harness.connect(d.uri("disk3"))
    h.pwrite(os.urandom(64 * KiB), 0)
    h.shutdown()


def set_up_five_minors(d, tmp_path) -> dict[int, tuple[str, str]]:
    """{minor: (origin path, COW path)} for minors 0..4 in five situations."""
    cows = {n: str(tmp_path / f"cow{n}") for n in range(5)}
    d.elioctl("setup-snapshot", "disk0", cows[0], "0")
    d.elioctl("setup-snapshot", "disk1", cows[1], "1")
    d.elioctl("transition-to-incremental", "1")
    overflow(d, cows[2])
    dormant(d, cows[3])
    d.elioctl("reload-snapshot", "disk4", cows[4], "4")  # no such file: checked later
    return {n: (str(tmp_path / f"disk{n}.img"), cows[n]) for n in range(5)}


@pytest.mark.e2e
def test_status_of_a_daemon_with_minors_in_several_states(tmp_path):
    origins = [(sparse_file(str(tmp_path / f"disk{n}.img"), SIZE), f"disk{n}")
               for n in range(5)]
    with open(origins[2][0], "r+b") as f:  # data to overwrite: holes cost no COW space
        f.write(os.urandom(SIZE))
    with daemon(str(tmp_path / "run"), origins) as d:
        assert d.elioctl("status").stdout == NO_MINORS + "\n"
        minors = set_up_five_minors(d, tmp_path)
        devices = d.info()["devices"]
        assert [dev["state"] for dev in devices] == [3, 2, 1, 1, 5], devices
        header, *lines = d.elioctl("status").stdout.splitlines()
        assert header.startswith("MINOR") and len(lines) == 5
        for n, (line, dev) in enumerate(zip(lines, devices)):
            assert line.startswith(f"{n} "), line
            assert columns(line, header)[1:6] == [
                STATE_NAMES[dev["state"]], *minors[n], usage(dev),
                str(dev.get("nr_changed_blocks", "-"))], line
        assert columns(lines[2], header)[-1].startswith(f"EFBIG: COW file {minors[2][1]} "
                                                        "reached its limit of 1048576 bytes")
        assert lines[2].endswith("; change list kept")
        assert [columns(line, header)[-1] for line in lines[:2] + lines[3:]] == ["-"] * 4
        assert columns(lines[4], header)[4:] == ["-", "-", "-"]  # unverified: no COW file
        check_one_minor(d, lines[4])


def usage(dev: dict) -> str:
    """The used / limit cell ``dev`` must give, as info's numbers say."""
    if "fallocate" not in dev:
        return "-"
    return f"{human_size(dev['cow_size_current'])} / {human_size(dev['fallocate'])}"


def check_one_minor(d, line_of_4: str) -> None:
    """``status 4`` is that line alone; a minor out of range, or not set up, fails as
    ``info`` does."""
    one = d.elioctl("status", "4").stdout.splitlines()
    assert len(one) == 2 and one[0].startswith("MINOR")
    assert one[1].split() == line_of_4.split()  # the same cells, narrower columns
    for minor, code in (("99", errno.EINVAL), ("7", errno.ENOENT)):
        info = d.elioctl("info", minor, check=False)
        status = d.elioctl("status", minor, check=False)
        assert info.returncode == status.returncode == code, status.stderr
        assert status.stderr == info.stderr.replace("elioctl: info:", "elioctl: status:")
        assert status.stdout == ""
