"""What ``fstrim`` costs during an active snapshot: time, COW bytes written, and whether
the snapshot survives (issue "fstrim must not fill the COW store").

Method, per run: a new sparse origin of --size-mib (2 GiB), served by a new daemon;
ext4 on it through nbdfuse + loop (mkfs with the inode tables and the journal written
at once, so that no ext4lazyinit runs during the measure); --files files of --file-mib
seeded random data, sync; freeze, ``setup-snapshot -f --cow-mb``, thaw; delete --delete
of the files, sync; then ``fstrim -v`` on the mount point, timed, and sync. Measured:
the growth of the COW file's allocated size (st_blocks * 512) across fstrim, its
allocated size at the end, the header's nr_slots * 4 KiB (read once the file system is
detached and the file is clean, with the tree's own cowfile module), and whether
``elioctl info`` shows an error (the snapshot failed). One markdown row per run on
stdout, progress on stderr.

--tree DIR runs the daemon, elioctl and the header reader from another checkout (a
``git worktree`` of an older commit, for "before" numbers): this venv's interpreter
with PYTHONPATH=DIR; the script checks that nbdkit really runs DIR/nbd_plugin.py.

    .venv/bin/python -m bench.fstrim [--tree DIR] [--dir DIR] [--size-mib N] [--cow-mb N]
                                     [--files N] [--file-mib N] [--delete N] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time

from bench import BLOCK, MiB
from tests.harness import (
    ROOT,
    Daemon,
    attached,
    daemon,
    frozen,
    mounted,
    run,
    sparse_file,
    wait_for,
    workdir,
)

MINOR = 0
ORIGIN_NAME = "disk"
SEED = 20261203
SECTOR = 512  # bytes: the unit of st_blocks
ACTIVE = 3  # info state of an active snapshot with a client attached
MKFS = ["mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-E", "lazy_itable_init=0,lazy_journal_init=0"]
TRIMMED = re.compile(r"\((\d+) bytes\) trimmed")
# run with the tree's directory first on sys.path: a COW file is read by the code that
# wrote it, whatever its format version
READ_SLOTS = ("import sys\nfrom snapengine.cowfile import CowFile\n"
              "with CowFile.open(sys.argv[1], writable=False) as c:\n"
              "    print(c.header.nr_slots)\n")

HEADER = ("| tree | run | fstrim s | trimmed MiB | COW growth MiB | COW allocated MiB "
          "| nr_slots × 4 KiB MiB | snapshot |\n|---|---:|---:|---:|---:|---:|---:|---|")


def tree_label(tree: str) -> str:
    """The tree's commit, with ``+dirty`` when it has uncommitted changes."""
    head = run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], check=False).stdout.strip()
    dirty = run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                check=False).stdout.strip()
    return (head or os.path.basename(tree)) + ("+dirty" if dirty else "")


def use_tree(tree: str) -> None:
    """Every process started from now on (daemon, elioctl) imports snapengine from ``tree``."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")]))


def check_plugin(d: Daemon, tree: str) -> None:
    """Fail unless the daemon's nbdkit runs ``tree``'s nbd_plugin.py."""
    with open(f"/proc/{d.pid}/cmdline", "rb") as f:
        args = f.read().decode().split("\0")
    plugin = next((a for a in args if a.endswith("nbd_plugin.py")), "?")
    if os.path.realpath(plugin) != os.path.realpath(os.path.join(tree, "nbd_plugin.py")):
        raise SystemExit(f"bench.fstrim: the daemon runs {plugin}, not {tree}'s plugin")
    print(f"daemon: nbdkit runs {plugin}", file=sys.stderr, flush=True)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * SECTOR


def header_slots(tree: str, cow: str) -> str:
    """nr_slots * 4 KiB in MiB, as the tree's cowfile reads it, or why it could not."""
    r = subprocess.run([sys.executable, "-c", READ_SLOTS, cow], cwd=tree, capture_output=True,
                       text=True)
    if r.returncode != 0:
        return "n/a (" + (r.stderr.strip().splitlines() or ["?"])[-1][:60] + ")"
    return f"{int(r.stdout) * BLOCK / MiB:.1f}"


def write_files(fs: str, rng: random.Random, files: int, file_bytes: int) -> list[str]:
    paths = [os.path.join(fs, f"f{i:03d}") for i in range(files)]
    for path in paths:
        with open(path, "wb") as f:
            f.write(rng.randbytes(file_bytes))
    run(["sync"])
    return paths


def fstrim(fs: str) -> tuple[float, str]:
    """``fstrim -v`` on ``fs``: seconds, and MiB trimmed as it reports them."""
    start = time.monotonic()
    out = run(["fstrim", "-v", fs]).stdout
    seconds = time.monotonic() - start
    m = TRIMMED.search(out)
    return seconds, f"{int(m.group(1)) / MiB:.1f}" if m else "?"


def one_run(a: argparse.Namespace, tree: str, work: str, number: int) -> str:
    """One fresh origin, daemon and snapshot; returns the table row."""
    origin = sparse_file(os.path.join(work, "origin.img"), a.size_mib * MiB)
    cow = os.path.join(work, "cow")
    rng = random.Random(SEED + number)
    with daemon(os.path.join(work, "run"), [(origin, ORIGIN_NAME)], verbose=False) as d:
        check_plugin(d, tree)
        with attached(d.uri(ORIGIN_NAME), os.path.join(work, "fuse")) as dev:
            run(MKFS + [dev])
            with mounted(dev, os.path.join(work, "fs")) as fs:
                paths = write_files(fs, rng, a.files, a.file_mib * MiB)
                with frozen(fs):
                    d.elioctl("setup-snapshot", "-f", str(a.cow_mb), ORIGIN_NAME, cow, MINOR)
                for path in rng.sample(paths, a.delete):
                    os.unlink(path)
                run(["sync"])
                before = allocated(cow)
                seconds, trimmed = fstrim(fs)
                run(["sync"])
                after = allocated(cow)
        wait_for(lambda: d.info(MINOR)["state"] != ACTIVE, what="the snapshot to go dormant")
        info = d.info(MINOR)
        slots = header_slots(tree, cow)
        d.elioctl("destroy", MINOR)
    survived = f"failed (error {info['error']})" if "error" in info else "ok"
    return (f"| {tree_label(tree)} | {number + 1} | {seconds:.2f} | {trimmed} "
            f"| {(after - before) / MiB:.1f} | {after / MiB:.1f} | {slots} | {survived} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", default=ROOT, help="checkout whose daemon is measured")
    p.add_argument("--dir", default="/var/tmp", help="where the origin and COW file go")
    p.add_argument("--size-mib", type=int, default=2048)
    p.add_argument("--cow-mb", type=int, default=64, help="setup-snapshot -f")
    p.add_argument("--files", type=int, default=50)
    p.add_argument("--file-mib", type=int, default=1)
    p.add_argument("--delete", type=int, default=10, help="files deleted after the snapshot")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    tree = os.path.abspath(a.tree)
    if os.path.realpath(tree) != os.path.realpath(ROOT):
        use_tree(tree)
    rows = []
    for number in range(a.repeat):
        with workdir(a.dir, "snapengine-fstrim-") as work:
            rows.append(one_run(a, tree, work, number))
        print(f"[{number + 1}/{a.repeat}] {rows[-1]}", file=sys.stderr, flush=True)
    print(f"fstrim during an active snapshot ({a.dir}, origin {a.size_mib} MiB, ext4, "
          f"{a.files} × {a.file_mib} MiB files, {a.delete} deleted after the snapshot, "
          f"-f {a.cow_mb})\n")
    print(HEADER)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
