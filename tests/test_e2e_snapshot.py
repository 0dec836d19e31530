"""End to end: ext4 on the origin through the real daemon, nbdfuse and a loop device."""

from __future__ import annotations

import hashlib
import os

import nbd
import pytest

from tests.harness import attached, daemon, mounted, run, sparse_file


pytestmark = pytest.mark.e2e

MiB = 1 << 20


def test_snapshot_of_a_live_ext4(tmp_path):
    origin = sparse_file(str(tmp_path / "disk.img"), 256 * MiB)
    old = os.urandom(3 * MiB + 123)
    new = os.urandom(2 * MiB + 7)
    with daemon(str(tmp_path / "run"), [(origin, "disk0")]) as d:
        with attached(d.uri("disk0"), str(tmp_path / "fuse")) as dev:
            run(["mkfs.ext4", "-q", "-F", dev])
            with mounted(dev, str(tmp_path / "fs")) as fs:
                with open(os.path.join(fs, "data"), "wb") as f:
                    f.write(old)
                run(["sync"])
                d.elioctl("setup-snapshot", "disk0", str(tmp_path / "cow"), "4")
                before = d.info(4)["nr_changed_blocks"]
                with open(os.path.join(fs, "data"), "r+b") as f:  # overwrite in place
                    f.write(new)
                for i in range(20):
                    with open(os.path.join(fs, f"new{i}"), "wb") as f:
                        f.write(os.urandom(64 * 1024))
                run(["sync"])
                after = d.info(4)
                assert after["state"] == 3 and "error" not in after
                assert after["nr_changed_blocks"] > before

                with attached(d.uri("elastio-snap4"), str(tmp_path / "sfuse"),
                              readonly=True) as sdev:
                    with mounted(sdev, str(tmp_path / "sfs"), "ro,noload") as sfs:
                        with open(os.path.join(sfs, "data"), "rb") as f:
                            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(old).digest()
                        assert sorted(os.listdir(sfs)) == ["data", "lost+found"]
                with open(os.path.join(fs, "data"), "rb") as f:
                    assert f.read(len(new)) == new

        h = nbd.NBD()
        h.connect_uri(d.uri("elastio-snap4"))
        try:
            assert h.is_read_only()
            with pytest.raises(nbd.Error) as e:
                h.pwrite(b"x" * 512, 0)
            assert e.value.errnum == 1  # EPERM
        finally:
            h.shutdown()
        d.elioctl("destroy", "4")
        assert not os.path.exists(tmp_path / "cow")
