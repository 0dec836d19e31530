"""SIGTERM and restart with a snapshot active, then with incremental active, on a live ext4:
same info, same snapshot, and the backup chain still gives a byte-identical image."""

from __future__ import annotations

import os
import random

import nbd
import pytest

from snapengine.cowfile import CowFile
from tests.harness import (
    BIN,
    Daemon,
    attached,
    churn,
    digest,
    export_digest,
    frozen,
    mounted,
    require,
    run,
    sparse_file,
)

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def restart(d: Daemon, minor: int) -> dict:
    """SIGTERM with a client still connected (the minor active); start again; connect
    again; return the minor's info as it was before the stop."""
    client = nbd.NBD()
    client.connect_uri(d.uri("disk0"))
    before = d.info(minor)
    assert before["state"] in (2, 3)
    assert d.stop() == 0  # clean, though a client is attached
    with CowFile.open(before["cow_file"], writable=False) as cow:
        assert cow.header.clean
    d.start()
    assert d.info(minor)["state"] == before["state"] - 2  # dormant: no client yet
    client = nbd.NBD()
    client.connect_uri(d.uri("disk0"))
    after = d.info(minor)
    for info in (before, after):  # disk space: the clean stop wrote the cached index pages
        info.pop("cow_size_current")
    assert after == before
    client.shutdown()
    return before


def test_sigterm_restart_keeps_snapshot_and_chain(tmp_path):
    require("nbdcopy", "e2fsck", "fsfreeze")
    origin = sparse_file(str(tmp_path / "disk.img"), 128 * MiB)
    image = str(tmp_path / "backup.img")
    rng = random.Random(7)
    d = Daemon(str(tmp_path / "run"), [(origin, "disk0")])
    try:
        d.start()
        snap = d.uri("elastio-snap5")
        with attached(d.uri("disk0"), str(tmp_path / "fuse")) as dev:
            run(["mkfs.ext4", "-q", "-F", dev])
            with mounted(dev, str(tmp_path / "fs")) as fs:
                churn(os.path.join(fs, "data"), rng, 150)
                with frozen(fs):
                    d.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow1"), "5")
                run(["nbdcopy", snap, image])
                churn(os.path.join(fs, "data"), rng, 150)  # fills the COW file
                run(["sync"])
        snapshot_digest = export_digest(snap)
        assert digest(image) == snapshot_digest

        restart(d, 5)  # snapshot mode
        assert export_digest(snap) == snapshot_digest

        with attached(d.uri("disk0"), str(tmp_path / "fuse")) as dev:
            with mounted(dev, str(tmp_path / "fs")) as fs:
                d.elioctl("transition-to-incremental", "5")
                churn(os.path.join(fs, "data"), rng, 150)
                run(["sync"])
        restart(d, 5)  # incremental mode

        with attached(d.uri("disk0"), str(tmp_path / "fuse")) as dev:
            with mounted(dev, str(tmp_path / "fs")) as fs:
                churn(os.path.join(fs, "data"), rng, 100)
                with frozen(fs):
                    d.elioctl("transition-to-snapshot", str(tmp_path / "cow2"), "5")
        r = run([os.path.join(BIN, "update-img"), "--run-dir", d.run_dir, "5",
                 str(tmp_path / "cow1"), image])
        assert r.stdout.rstrip().endswith(", 0 errors")
        assert digest(image) == export_digest(snap)
        run(["e2fsck", "-fn", image])
        d.elioctl("destroy", "5")
    finally:
        d.stop()
