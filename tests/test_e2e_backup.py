"""The nightly backup cycle on a live ext4, through the real daemon, nbdfuse and loop:
full copy of the first snapshot, then three rounds of activity, transition and update-img."""

from __future__ import annotations

import os
import random

import pytest

from tests.harness import (
    BIN,
    attached,
    churn,
    daemon,
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


def test_three_rounds_of_incremental_backup(tmp_path):
    require("nbdcopy", "e2fsck", "fsfreeze", "mkfs.ext4")
    origin = sparse_file(str(tmp_path / "disk.img"), 256 * MiB)
    image = str(tmp_path / "backup.img")
    rng = random.Random(20261126)
    with daemon(str(tmp_path / "run"), [(origin, "disk0")]) as d:
        snap_uri = d.uri("elastio-snap2")
        with attached(d.uri("disk0"), str(tmp_path / "fuse")) as dev:
            run(["mkfs.ext4", "-q", "-F", dev])
            with mounted(dev, str(tmp_path / "fs")) as fs:
                churn(os.path.join(fs, "data"), rng, 200)
                with frozen(fs):
                    d.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow1"), "2")
                run(["nbdcopy", snap_uri, image])  # the full backup
                assert digest(image) == export_digest(snap_uri)
                run(["e2fsck", "-fn", image])
                d.elioctl("transition-to-incremental", "2")

                for round_ in range(1, 4):
                    churn(os.path.join(fs, "data"), rng, 300)
                    run(["sync"])
                    assert d.info(2)["state"] == 2
                    old_cow = str(tmp_path / f"cow{round_}")
                    new_cow = str(tmp_path / f"cow{round_ + 1}")
                    with frozen(fs):
                        d.elioctl("transition-to-snapshot", new_cow, "2")
                    info = d.info(2)
                    assert info["seq_id"] == round_ + 1 and info["state"] == 3

                    listed = d.elioctl("changed-blocks", old_cow).stdout.split("\n")
                    assert len([line for line in listed if line]) > 0
                    r = run([os.path.join(BIN, "update-img"), "--run-dir", d.run_dir, "2",
                             old_cow, image])
                    assert r.stdout.startswith("copying complete: ")
                    assert r.stdout.rstrip().endswith(", 0 errors")
                    assert digest(image) == export_digest(snap_uri), f"round {round_}"
                    run(["e2fsck", "-fn", image])
                    d.elioctl("transition-to-incremental", "2")
        d.elioctl("destroy", "2")
