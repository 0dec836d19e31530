"""update-img: not built yet (issue: incremental backups)."""

from __future__ import annotations

import errno
import sys


def main(argv: list[str] | None = None) -> int:
    print("update-img: not yet: it arrives with incremental backups", file=sys.stderr)
    return errno.ENOSYS


if __name__ == "__main__":
    sys.exit(main())
