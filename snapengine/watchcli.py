"""elioctl watch: the daemon's events, one line each, as they happen.

The daemon sends events as flat JSON objects (events.py, INTERFACE.md §8). ``--json``
prints them as they are; otherwise ``format_event`` makes one readable line::

    2026-12-03T14:00:00.123+00:00 minor 4 failed (state 3): error -27, change list kept (tracking): COW file ...
    2026-12-03T14:00:01.002+00:00 minor 4 expanded (state 3): limit 64 MiB -> 128 MiB (auto-expand)
    2026-12-03T14:00:02.517+00:00 minor 4 destroy (gone)

Every line is flushed at once, so a pipe (``elioctl watch | logger``) sees it at once.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Iterable, TextIO

from .events import Event
from .units import MiB

COMMON = ("time", "minor", "event", "state")  # the fields every event has


def format_event(event: Event) -> str:
    """``<time> minor <N> <event> (state <S>)``, then ``: <details>`` for the kinds that
    carry more (failed, expanded, space-low, or one this elioctl does not know)."""
    state = event.get("state")
    head = (f"{event.get('time')} minor {event.get('minor')} {event.get('event')} "
            + ("(gone)" if state is None else f"(state {state})"))
    detail = DETAILS.get(event.get("event"), _other)(event)
    return f"{head}: {detail}" if detail else head


def _failed(event: Event) -> str:
    kept = ("change list kept (tracking)" if event.get("tracking")
            else "change list lost (the next backup must be full)")
    return f"error {event.get('error')}, {kept}: {event.get('reason')}"


def _expanded(event: Event) -> str:
    how = "auto-expand" if event.get("auto") else "expand-cow-file"
    return f"limit {size(event.get('old_limit'))} -> {size(event.get('new_limit'))} ({how})"


def _space_low(event: Event) -> str:
    return (f"{size(event.get('free'))} free on the COW file's file system, "
            f"{size(event.get('used'))} used of the {size(event.get('limit'))} limit")


def _other(event: Event) -> str:
    """No details for the plain kinds; ``key=value`` for fields of a kind added later."""
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in event.items() if k not in COMMON)


DETAILS: dict[str, Callable[[Event], str]] = {
    "failed": _failed,
    "expanded": _expanded,
    "space-low": _space_low,
}


def size(value: Any) -> str:
    """Bytes as MiB ("64 MiB", "1.5 MiB"); a negative or missing value is unknown."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return "unknown"
    if value % MiB == 0:
        return f"{value // MiB} MiB"
    return f"{value / MiB:.1f} MiB"


def follow(events: Iterable[Event], as_json: bool, out: TextIO = sys.stdout) -> None:
    """Print each event as it comes. A reader that goes away (``elioctl watch | head``)
    ends the watch quietly, like an interrupt."""
    try:
        for event in events:
            out.write((json.dumps(event) if as_json else format_event(event)) + "\n")
            out.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that does not fail
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
