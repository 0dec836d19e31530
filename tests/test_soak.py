"""Under a minute of tests/soak.py in CI: a real daemon, writers on the origin, readers on
the snapshot checking every block against the frozen image, and a loop of transitions
(snapshot, incremental, snapshot with new COW files, destroy and setup), with the
changed-block list of each closed COW file checked against what was written
(``elioctl changed-blocks`` and ``update-img``). The long run is
``.venv/bin/python -m tests.soak --minutes N`` (``make soak``).

SNAPENGINE_SOAK_SECONDS sets the duration (default 50), SNAPENGINE_SOAK_SEED the seed.
"""

from __future__ import annotations

import os

import pytest

from tests.harness import require
from tests.soak import run_soak

pytestmark = pytest.mark.e2e

SECONDS = float(os.environ.get("SNAPENGINE_SOAK_SECONDS", "50"))
SEED = int(os.environ.get("SNAPENGINE_SOAK_SEED", "20240611"))
SETTLE = 10  # seconds beyond SECONDS: daemon start, final checks, shutdown


@pytest.mark.timeout(3 * (SECONDS + SETTLE))
def test_soak(tmp_path, request):
    require("nbdkit")
    lines: list[str] = []
    stats = run_soak(str(tmp_path), SECONDS, seed=SEED, log=lines.append)
    summary = f"soak ({SECONDS:.0f} s, seed {SEED}): {stats.summary()}"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line(summary)
    print(summary, *lines, sep="\n")
    assert not stats.failures, "\n".join(stats.failures[:5])
    # the run really went through the cycle, under load
    assert stats.setups >= 1 and stats.to_incremental >= 3 and stats.to_snapshot >= 3, summary
    assert stats.lists_checked == stats.to_snapshot == stats.update_imgs, summary
    assert stats.writes > 1000 and stats.blocks_verified > 10000, summary
