"""elioctl status: the info document (docs/control-protocol.md) as a table for people.

One line per minor, in the order of the info document, each starting with the minor
number; a header names the columns, and every column is as wide as its widest cell::

    MINOR  STATE                ORIGIN   COW FILE   USED / LIMIT        CHANGED  ERROR
    0      active snapshot      /srv/d0  /bk/cow2   12.0 MiB / 1.0 GiB  3072     -
    1      active incremental   /srv/d1  /bk/incr1  8.0 KiB / 64.0 MiB  17       -
    4      dormant snapshot     /srv/d2  /bk/b1     1.0 MiB / 1.0 MiB   256      EFBIG: COW file /bk/b1 reached ...; change list kept
    5      unverified snapshot  /srv/d3  /bk/c1     -                   -        -

"-" is a value the document does not have: a minor without an open COW file
(unverified) has no sizes and no changed blocks. ``format_status`` is a pure function
of the devices, so it is tested without a daemon; ``info`` stays the JSON.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Iterable

from .minor import STATES

STATE_NAMES: dict[int, str] = {  # elastio-snap's state number -> "phase mode"
    number: f"{phase} {mode}" for (phase, mode), number in STATES.items()}
HEADER = ("MINOR", "STATE", "ORIGIN", "COW FILE", "USED / LIMIT", "CHANGED", "ERROR")
ABSENT = "-"  # a field the device object does not have
GAP = "  "  # between two columns
NO_MINORS = "no minors are set up"
UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")  # 1024 times the one before


def format_status(devices: Iterable[dict[str, Any]]) -> str:
    """The table of ``devices`` (the info document's "devices", or the one device of
    ``info <minor>``), without a final newline; ``NO_MINORS`` when there is none."""
    rows = [_row(device) for device in devices]
    if not rows:
        return NO_MINORS
    table = [HEADER, *rows]
    widths = [max(len(row[k]) for row in table) for k in range(len(HEADER) - 1)]
    return "\n".join(GAP.join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]])
                     .rstrip() for row in table)


def _row(device: dict[str, Any]) -> tuple[str, ...]:
    state = device.get("state")
    return (str(device.get("minor", ABSENT)), STATE_NAMES.get(state, f"state {state}"),
            _text(device.get("block_device", ABSENT)), _text(device.get("cow_file", ABSENT)),
            _usage(device.get("cow_size_current"), device.get("fallocate")),
            str(device.get("nr_changed_blocks", ABSENT)), _error(device))


def _usage(used: int | None, limit: int | None) -> str:
    """``used / limit``; just "-" when the minor has neither (no open COW file)."""
    if used is None and limit is None:
        return ABSENT
    return f"{human_size(used)} / {human_size(limit)}"


def _error(device: dict[str, Any]) -> str:
    """``ENAME: why; change list kept`` (or lost) for a failed minor, else "-". The
    daemon's reason starts with the errno's strerror (``str(SnapError)``): dropped."""
    error = device.get("error")
    if not error:
        return ABSENT
    name = errno.errorcode.get(abs(error), f"errno {abs(error)}")
    why = device.get("error_text") or "no reason given"
    why = why.removeprefix(f"{os.strerror(abs(error))}: ")  # the name says it already
    text = f"{name}: {_text(why)}"
    if "tracking" in device:
        text += "; change list kept" if device["tracking"] else "; change list lost"
    return text


def human_size(value: int | None) -> str:
    """Bytes for people: "512 B", "12.0 MiB", "1.0 GiB"; "-" when unknown."""
    if value is None:
        return ABSENT
    if value < 1024:
        return f"{value} B"
    size, unit = value / 1024, 0
    while size >= 1024 and unit < len(UNITS) - 1:
        size, unit = size / 1024, unit + 1
    return f"{size:.1f} {UNITS[unit]}"


def _text(value: str) -> str:
    """``value`` on one line: control characters escaped (a newline in a path must not
    start a line), and a byte that is not UTF-8 (elioctl's lone surrogate) as ``\\xNN``."""
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in value)


def _escape(ch: str) -> str:
    if "\udc80" <= ch <= "\udcff":  # os.fsdecode's escape of the byte ord(ch) - 0xdc00
        return f"\\x{ord(ch) - 0xdc00:02x}"
    return ch.encode("unicode_escape").decode("ascii")
