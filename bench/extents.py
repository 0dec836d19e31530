"""A full backup of a thin disk with nbdcopy: snapengine's snapshot export beside qemu
image fleecing's (issue 14, "full backups at the speed of the data").

What it measures: the wall time of ``nbdcopy <snapshot export> <file>``, whose copy
skips what the export's block status (base:allocation) reports as holes, for

* a 4 GiB sparse origin holding 64 MiB of data (64 runs of 1 MiB, spread evenly);
* a 1 TiB sparse origin holding 4 MiB (4 runs of 1 MiB: at the start, a third, two
  thirds, and the end); its copy must take seconds, not minutes.

Systems, on the same image file, all up at once (each copy reads one of them):

* ``snapengine``: the daemon serves the image, minor 0 is set up on it and stays active
  (an origin connection open, no writes), nbdcopy reads ``elastio-snap0``;
* ``snapengine --no-extents`` (4 GiB row only): the same export with ``nbdcopy
  --no-extents``, so every byte is read through the plugin: the cost before block status;
* ``qemu-fleecing``: qemu-storage-daemon with the image under a copy-before-write node
  (a sparse fleecing target) and a snapshot-access node exported over NBD (as
  bench/run.py starts it), nbdcopy reads that export; if qemu-storage-daemon is missing
  or fails to start, its rows say why and the target compares with nbdkit-file;
* ``nbdkit-file``: ``nbdkit -r file`` of the image (C, no snapshot: the ceiling).

Each copy goes to a new file in --dir, is checked (its size; every byte it holds data
for equals the origin; every run of the origin's data is there) and removed. Copies are
repeated --repeat times, interleaved (the order of the systems flips every other
repeat); the table gives the median and every run, the data the export's map reports
(``nbdinfo --map``), and the copy's allocated size.

Targets (issue 14): 4 GiB row, snapengine within 2 × qemu-fleecing's median; 1 TiB row,
snapengine under 10 s. Exit 0 if both are met, 1 if not. Everything created (servers,
files) is removed at the end.

    .venv/bin/python -m bench.extents [--dir DIR] [--repeat N] [--skip-tib]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator

from bench import GiB, MiB, TiB
from bench.servers import nbdkit_cmd, qemu_fleecing_cmd, server
from tests.harness import (
    CommandFailed,
    ServerStartError,
    connected,
    daemon,
    run,
    sparse_file,
    workdir,
)

SEED = 14
MINOR = "0"
ORIGIN_NAME = "disk"
RUN_BYTES = MiB  # one run of data
COPY_TIMEOUT = 1800.0  # seconds for one nbdcopy (a 1 TiB copy that reads every byte)
RATIO_TARGET = 2.0  # 4 GiB row: snapengine / qemu-fleecing at most this
TIB_TARGET_S = 10.0  # 1 TiB row: snapengine's median under this

SNAPENGINE = "snapengine"
NO_EXTENTS = "snapengine --no-extents"
QEMU = "qemu-fleecing"
NBDKIT_FILE = "nbdkit-file"


@dataclass(frozen=True)
class Origin:
    label: str
    size: int
    runs: int  # runs of RUN_BYTES of data, spread evenly

    def data(self) -> list[int]:
        """The offsets of the runs of data (MiB-aligned, the last one ending at the end)."""
        if self.runs == 1:
            return [0]
        step = (self.size - RUN_BYTES) // (self.runs - 1) // MiB * MiB
        return [min(i * step, self.size - RUN_BYTES) for i in range(self.runs)]


ORIGINS = (Origin("4 GiB, 64 MiB of data", 4 * GiB, 64),
           Origin("1 TiB, 4 MiB of data", TiB, 4))


@dataclass
class Row:
    origin: Origin
    system: str
    seconds: list[float] = field(default_factory=list)
    reported_data: int = -1  # bytes the export's map says are data
    allocated: int = -1  # bytes of the last copy on disk
    note: str = ""  # why the row has no figures


class BenchError(Exception):
    """A copy was wrong or a step failed: the message says which."""


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the origin and the copies ---------------------------------------------------------

def make_origin(path: str, origin: Origin) -> dict[int, bytes]:
    """The sparse image with its runs of seeded random data; returns them by offset."""
    rng = random.Random(SEED)
    runs = {offset: rng.randbytes(RUN_BYTES) for offset in origin.data()}
    sparse_file(path, origin.size)
    with open(path, "r+b") as f:
        for offset, data in runs.items():
            f.seek(offset)
            f.write(data)
    return runs


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the file's data, by SEEK_DATA / SEEK_HOLE."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        pos = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, pos - start


def check_copy(path: str, origin: Origin, runs: dict[int, bytes]) -> int:
    """The copy equals the origin: its size, every byte it has data for, every run of
    data. Returns its allocated bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if st.st_size != origin.size:
            raise BenchError(f"{path}: {st.st_size} bytes, the origin has {origin.size}")
        for start, length in data_extents(fd, origin.size):
            for offset in range(start, start + length, 16 * MiB):
                n = min(16 * MiB, start + length - offset)
                if os.pread(fd, n, offset) != expected(runs, offset, n):
                    raise BenchError(f"{path}: [{offset}, +{n}) differs from the origin")
        for offset, data in runs.items():
            if os.pread(fd, len(data), offset) != data:
                raise BenchError(f"{path}: the data at {offset} is missing")
        return st.st_blocks * 512
    finally:
        os.close(fd)


def expected(runs: dict[int, bytes], offset: int, length: int) -> bytes:
    """The origin's bytes over [offset, offset + length)."""
    out = bytearray(length)
    for start, data in runs.items():
        lo, hi = max(start, offset), min(start + len(data), offset + length)
        if lo < hi:
            out[lo - offset:hi - offset] = data[lo - start:hi - start]
    return bytes(out)


def reported_data(uri: str) -> int:
    """Bytes that the export's map (nbdinfo --map) reports as data."""
    extents = json.loads(run(["nbdinfo", "--map", "--json", uri], timeout=600).stdout)
    return sum(e["length"] for e in extents if not e["type"] & 2)


def copy(uri: str, dest: str, no_extents: bool) -> float:
    """One timed nbdcopy of ``uri`` into the new file ``dest``."""
    cmd = ["nbdcopy"] + (["--no-extents"] if no_extents else []) + [uri, dest]
    start = time.perf_counter()
    run(cmd, timeout=COPY_TIMEOUT)
    return time.perf_counter() - start


# -- the servers ------------------------------------------------------------------------

@contextlib.contextmanager
def snapengine(work: str, image: str) -> Iterator[str]:
    """The daemon on ``image``, minor 0 set up and active: the snapshot export's URI."""
    with daemon(os.path.join(work, "run"), [(image, ORIGIN_NAME)], verbose=False) as d:
        d.elioctl("setup-snapshot", ORIGIN_NAME, os.path.join(work, "cow"), MINOR)
        try:
            with connected(d.uri(ORIGIN_NAME)):  # a client: the snapshot stays active
                yield d.uri(f"elastio-snap{MINOR}")
                info = d.info(int(MINOR))
                if info.get("state") != 3 or "error" in info:
                    raise BenchError(f"the snapshot did not stay active and whole: {info}")
        finally:
            d.elioctl("destroy", MINOR)


@contextlib.contextmanager
def qemu(work: str, sockets: str, image: str, size: int) -> Iterator[str]:
    fleece = sparse_file(os.path.join(work, "fleece"), size)
    sock = os.path.join(sockets, "qemu.sock")
    try:
        with server(QEMU, qemu_fleecing_cmd(image, fleece, sock), [sock],
                    os.path.join(sockets, "qemu.log")):
            yield f"nbd+unix:///snap?socket={sock}"
    finally:
        os.unlink(fleece)


@contextlib.contextmanager
def nbdkit_file(sockets: str, image: str) -> Iterator[str]:
    sock = os.path.join(sockets, "nbdkit-file.sock")
    with server(NBDKIT_FILE, nbdkit_cmd(sock, ["-r", "file", image]), [sock],
                os.path.join(sockets, "nbdkit-file.log")):
        yield f"nbd+unix:///?socket={sock}"


def start_qemu(stack: contextlib.ExitStack, work: str, sockets: str, image: str,
               size: int) -> tuple[str | None, str]:
    """(URI, "") of qemu's snapshot export, or (None, why there is none)."""
    if shutil.which("qemu-storage-daemon") is None:
        return None, "qemu-storage-daemon is not installed (apt-get install qemu-system-common)"
    try:
        return stack.enter_context(qemu(work, sockets, image, size)), ""
    except ServerStartError as e:
        return None, f"qemu-storage-daemon failed to start: {e}"


# -- one origin -------------------------------------------------------------------------

def measure(origin: Origin, base: str, repeat: int) -> list[Row]:
    """Every system's copies of one origin, interleaved."""
    image = os.path.join(base, "image.raw")
    progress(f"{origin.label}: creating {image}")
    runs = make_origin(image, origin)
    sockets = tempfile.mkdtemp(prefix="sebx-")  # short paths for the sockets
    try:
        with contextlib.ExitStack() as stack:
            uris = {SNAPENGINE: stack.enter_context(snapengine(base, image))}
            if origin.size <= 4 * GiB:
                uris[NO_EXTENTS] = uris[SNAPENGINE]
            uris[QEMU], why = start_qemu(stack, base, sockets, image, origin.size)
            uris[NBDKIT_FILE] = stack.enter_context(nbdkit_file(sockets, image))
            rows = {s: Row(origin, s, note=why if uris[s] is None else "") for s in uris}
            for s, uri in uris.items():
                if uri is not None and s != NO_EXTENTS:
                    rows[s].reported_data = reported_data(uri)
            for r in range(repeat):
                order = list(uris) if r % 2 == 0 else list(reversed(uris))
                for s in order:
                    if uris[s] is not None:
                        one_copy(rows[s], uris[s], base, runs, r, repeat)
        return list(rows.values())
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
        os.unlink(image)


def one_copy(row: Row, uri: str, base: str, runs: dict[int, bytes], r: int,
             repeat: int) -> None:
    dest = os.path.join(base, "copy.raw")
    try:
        seconds = copy(uri, dest, row.system == NO_EXTENTS)
        row.allocated = check_copy(dest, row.origin, runs)
    finally:
        if os.path.exists(dest):
            os.unlink(dest)
    row.seconds.append(seconds)
    progress(f"[{r + 1}/{repeat}] {row.origin.label}, {row.system}: {seconds:.2f} s")


# -- the report -------------------------------------------------------------------------

def median(row: Row | None) -> float | None:
    return statistics.median(row.seconds) if row is not None and row.seconds else None


def find(rows: list[Row], origin: Origin, system: str) -> Row | None:
    return next((r for r in rows if r.origin == origin and r.system == system), None)


def print_table(rows: list[Row]) -> None:
    print("| origin | system | nbdcopy median (s) | runs (s) | × qemu-fleecing "
          "| × nbdkit-file | map: data (MiB) | copy allocated (MiB) |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for row in rows:
        m = median(row)
        if m is None:
            print(f"| {row.origin.label} | {row.system} | n/a | {row.note} | | | | |")
            continue
        ratios = []
        for peer in (QEMU, NBDKIT_FILE):
            p = median(find(rows, row.origin, peer))
            ratios.append("—" if p is None or peer == row.system else f"{m / p:.2f}")
        data = "—" if row.reported_data < 0 else f"{row.reported_data / MiB:,.0f}"
        print(f"| {row.origin.label} | {row.system} | {m:.2f} | "
              f"{' / '.join(f'{s:.2f}' for s in row.seconds)} | {' | '.join(ratios)} | "
              f"{data} | {row.allocated / MiB:,.1f} |")


def targets(rows: list[Row]) -> list[tuple[str, bool]]:
    """(what, met) of the issue's two targets that this run measured."""
    out = []
    small, tib = ORIGINS
    own = median(find(rows, small, SNAPENGINE))
    peer_name = QEMU if median(find(rows, small, QEMU)) is not None else NBDKIT_FILE
    peer = median(find(rows, small, peer_name))
    if own is not None and peer is not None:
        out.append((f"{small.label}: snapengine ≤ {RATIO_TARGET} × {peer_name} "
                    f"({own:.2f} s vs {peer:.2f} s: {own / peer:.2f} ×)",
                    own <= RATIO_TARGET * peer))
    big = median(find(rows, tib, SNAPENGINE))
    if big is not None:
        out.append((f"{tib.label}: snapengine < {TIB_TARGET_S:.0f} s ({big:.2f} s)",
                    big < TIB_TARGET_S))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", help="where the images, COW files and copies go (default: a "
                   "new directory under /var/tmp)")
    p.add_argument("--repeat", type=int, default=3, help="copies per system and origin "
                   "(default %(default)s)")
    p.add_argument("--skip-tib", action="store_true", help="only the 4 GiB origin")
    a = p.parse_args(argv)
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    for tool in ("nbdcopy", "nbdinfo", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"bench.extents: {tool} is missing (make setup)", file=sys.stderr)
            return 1
    started = time.monotonic()
    rows: list[Row] = []
    try:
        with workdir(a.dir, "snapengine-extents-") as base:
            for origin in ORIGINS[:1] if a.skip_tib else ORIGINS:
                rows += measure(origin, base, a.repeat)
    except (BenchError, CommandFailed, ServerStartError, OSError) as e:
        print(f"bench.extents: {e}", file=sys.stderr)
        return 1
    print(f"nbdcopy of a snapshot export to a file ({a.repeat} copies each, medians; run "
          f"took {time.monotonic() - started:.0f} s)\n")
    print_table(rows)
    results = targets(rows)
    print()
    for what, met in results:
        print(f"target: {what} -> {'MET' if met else 'NOT MET'}")
    return 0 if all(met for _, met in results) else 1


if __name__ == "__main__":
    sys.exit(main())
