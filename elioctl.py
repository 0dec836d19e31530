"""elioctl as a top-level script: ``python elioctl.py <sub-command> ...`` (see snapengine.cli)."""

import sys

from snapengine.cli import main

if __name__ == "__main__":
    sys.exit(main())
