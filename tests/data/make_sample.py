"""How tests/data/v1-incremental.cow was made (run once, with format version 1).

Not run by the tests: the committed file is the point. Re-running it after a change of
layout makes a different file, and test_cowfile's sample test says so. Run from the
repository root: python -m tests.data.make_sample OUT
"""

import os
import sys
import tempfile

from snapengine.cowfile import CowFile, Header
from snapengine.fileio import FileIO
from snapengine.snapshot import SnapshotTracker
from snapengine.tracker import IncrementalTracker

UUID = bytes.fromhex("00112233445566778899aabbccddeeff")
SIZE = (8 << 20) + 1000


def main(out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        origin_path = os.path.join(tmp, "origin")
        with open(origin_path, "wb") as f:
            f.write(bytes(range(256)) * (SIZE // 256) + bytes(SIZE % 256))
        origin = FileIO.open(origin_path, os.O_RDWR)
        cow = CowFile.create(out, Header(SIZE, UUID, 1, 1 << 20, version=1))
        snap = SnapshotTracker(cow, origin, 1 << 20)
        snap.before_write(0, 4)
        snap.mark_incremental(clean=False)
        cow.release_data()
        incr = IncrementalTracker(cow, origin, 1 << 20)
        incr.before_write(256, 259)
        incr.before_write(2048, 2049)
        incr.checkpoint(clean=True)
        cow.close()
        origin.close()


if __name__ == "__main__":
    main(sys.argv[1])
