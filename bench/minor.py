"""A snapengine minor for one scenario: set up on an origin, destroyed after."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from bench import MiB
from tests.harness import Daemon

ORIGIN_NAME = "disk"  # the export name of the benchmarks' image
MINOR = "0"
SNAPSHOT_EXPORT = f"elastio-snap{MINOR}"
STATES = {0: "dormant incremental", 1: "dormant snapshot", 2: "active incremental",
          3: "active snapshot", 4: "unverified incremental", 5: "unverified snapshot"}


@contextlib.contextmanager
def snapshot_minor(d: Daemon, cow: str, size: int, incremental: bool = False,
                   origin: str = ORIGIN_NAME) -> Iterator[None]:
    """Minor MINOR on ``origin`` (``size`` bytes): a fresh snapshot with room to copy
    every block, turned incremental if asked; destroyed (COW file unlinked) after."""
    limit_mb = str(-(-size // MiB))
    d.elioctl("setup-snapshot", "-f", limit_mb, origin, cow, MINOR)
    try:
        if incremental:
            d.elioctl("transition-to-incremental", MINOR)
        yield
    finally:
        d.elioctl("destroy", MINOR)


def state_text(info: dict[str, Any]) -> str:
    """``elioctl info MINOR``'s state, named, and its error if it failed."""
    state = f"{info.get('state')} ({STATES.get(info.get('state', -1), '?')})"
    if "error" in info:
        state += f" error {info['error']}"
    return state
