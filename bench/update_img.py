#!/usr/bin/env python3
"""update-img's cost follows the number of changed blocks, not the origin size.

What it measures: the wall time of ``update-img 0 <old cow> <image>`` and of
``elioctl changed-blocks <old cow>`` (which reads the same changed-block list), for a
1 TiB sparse origin with 10, 1 000 and 10 000 changed 4 KiB blocks, and for a 16 GiB
sparse origin with 1 000 (same work on an origin 64 times smaller).

How: one daemon (``snapengine serve``) serves both sparse origins. For each row:
setup-snapshot (minor 0) into COW file 1, transition-to-incremental, N distinct random
4 KiB blocks written through NBD (libnbd, pipelined), transition-to-snapshot into COW
file 2. COW file 1 then lists exactly the N blocks. update-img copies them from the new
snapshot (export elastio-snap0) into a sparse image of the origin's size (content
irrelevant). The origin's NBD connection stays open, so the minor stays active, as on
a live system. Each command runs 3 times on the same COW file; the table gives the
median and every run. update-img must report exactly N blocks copied, 0 errors.

Target: 1 TiB origin, 1 000 changed blocks: update-img median < 2 s.
Exit 0 if met, 1 if not. Everything created (daemon, files) is removed at the end.

    .venv/bin/python bench/update_img.py [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import nbd

BIN = os.path.dirname(sys.executable)  # the venv's bin: snapengine, elioctl, update-img
BLOCK = 4096
GiB = 1 << 30
TiB = 1 << 40
REPEATS = 3
TARGET_S = 2.0
TARGET_ROW = (TiB, 1000)
ROWS = [(TiB, 10), (TiB, 1000), (TiB, 10_000), (16 * GiB, 1000)]
WINDOW = 32  # NBD requests in flight
COPIED_RE = re.compile(r"copying complete: (\d+) blocks changed, (\d+) errors")


@dataclass
class Daemon:
    run_dir: str
    proc: subprocess.Popen

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.run_dir}/nbd.sock"

    def command(self, tool: str, *args: str) -> list[str]:
        return [os.path.join(BIN, tool), "--run-dir", self.run_dir, *args]

    def elioctl(self, *args: str) -> str:
        return run(self.command("elioctl", *args))


@dataclass
class Row:
    origin_size: int
    changed: int
    update_s: list[float]
    list_s: list[float]
    copied: int


def run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = run(cmd)
    return time.perf_counter() - start, out


def sparse_file(path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@contextmanager
def workdir(parent: str | None) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="snapengine-bench-", dir=parent or "/var/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def control_socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


@contextmanager
def serving(run_dir: str, origins: list[tuple[str, str]]) -> Iterator[Daemon]:
    """``snapengine serve`` in the foreground; SIGTERM (clean shutdown) at the end."""
    os.makedirs(run_dir)
    cmd = [os.path.join(BIN, "snapengine"), "serve", "--run-dir", run_dir]
    cmd += [f"--origin={path}={name}" for path, name in origins]
    with open(os.path.join(run_dir, "serve.out"), "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not control_socket_answers(os.path.join(run_dir, "ctl.sock")):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start (see {run_dir}/serve.out)")
            time.sleep(0.05)
        yield Daemon(run_dir, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def connected(uri: str) -> Iterator[nbd.NBD]:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        yield h
    finally:
        h.shutdown()


def retire_one(h: nbd.NBD) -> None:
    """Wait for one command to complete; raise if it failed."""
    while (cookie := h.aio_peek_command_completed()) == 0:
        h.poll(-1)
    h.aio_command_completed(cookie)


def write_blocks(h: nbd.NBD, blocks: list[int]) -> None:
    """One 4 KiB write per block, WINDOW in flight."""
    buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(BLOCK)))
    pending = 0
    for block in blocks:
        if pending >= WINDOW:
            retire_one(h)
            pending -= 1
        h.aio_pwrite(buf, block * BLOCK)
        pending += 1
    for _ in range(pending):
        retire_one(h)
    h.flush()


def copied_blocks(output: str) -> int:
    found = COPIED_RE.search(output)
    if found is None or found.group(2) != "0":
        raise RuntimeError(f"update-img did not copy cleanly: {output.strip()!r}")
    return int(found.group(1))


def measure(d: Daemon, base: str, origin: tuple[str, int], n: int, rng: random.Random) -> Row:
    """One row: make COW file 1 list n changed blocks, then time the two readers of it."""
    name, size = origin
    cow1, cow2 = os.path.join(base, "cow1"), os.path.join(base, "cow2")
    image = sparse_file(os.path.join(base, "image"), size)
    d.elioctl("setup-snapshot", name, cow1, "0")
    try:
        with connected(d.uri(name)) as h:
            d.elioctl("transition-to-incremental", "0")
            write_blocks(h, rng.sample(range(size // BLOCK), n))
            d.elioctl("transition-to-snapshot", cow2, "0")
            update = [timed(d.command("update-img", "0", cow1, image)) for _ in range(REPEATS)]
            listing = [timed(d.command("elioctl", "changed-blocks", cow1))[0]
                       for _ in range(REPEATS)]
        copied = {copied_blocks(out) for _, out in update}
        if copied != {n}:
            raise RuntimeError(f"update-img copied {copied} blocks, expected {n}")
        return Row(size, n, [t for t, _ in update], listing, n)
    finally:
        d.elioctl("destroy", "0")  # removes cow2
        for path in (cow1, image):
            if os.path.exists(path):
                os.unlink(path)


def size_label(size: int) -> str:
    return f"{size // TiB} TiB" if size >= TiB else f"{size // GiB} GiB"


def secs(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def print_table(rows: list[Row]) -> None:
    print("| origin | changed blocks | update-img median (s) | update-img runs (s) "
          "| changed-blocks median (s) | changed-blocks runs (s) | blocks copied |")
    print("|---|---:|---:|---|---:|---|---:|")
    for r in rows:
        print(f"| {size_label(r.origin_size)} | {r.changed:,} | "
              f"{statistics.median(r.update_s):.3f} | {secs(r.update_s)} | "
              f"{statistics.median(r.list_s):.3f} | {secs(r.list_s)} | {r.copied:,} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="where to put the temporary files (default: a new "
                   "directory under /var/tmp)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the block choice")
    args = p.parse_args()
    rng = random.Random(args.seed)
    started = time.monotonic()
    with workdir(args.dir) as base:
        sizes = sorted({size for size, _ in ROWS})
        names = {size: f"origin-{size // GiB}G" for size in sizes}
        served = [(sparse_file(os.path.join(base, f"{names[size]}.img"), size), names[size])
                  for size in sizes]
        with serving(os.path.join(base, "run"), served) as d:
            rows = [measure(d, base, (names[size], size), n, rng) for size, n in ROWS]
    print_table(rows)
    target = next(r for r in rows if (r.origin_size, r.changed) == TARGET_ROW)
    got = statistics.median(target.update_s)
    met = got < TARGET_S
    print(f"\ntarget: update-img on {size_label(TARGET_ROW[0])} with {TARGET_ROW[1]:,} "
          f"changed blocks < {TARGET_S} s: {got:.3f} s -> {'MET' if met else 'NOT MET'} "
          f"(bench run time {time.monotonic() - started:.0f} s)")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
