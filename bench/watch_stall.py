"""A watcher that stops reading does not slow the origin (events.py, INTERFACE.md §8).

Method: one daemon (``snapengine serve``, not --verbose) serving two origins in --dir:
``disk0`` (--size-mib, 512 MiB, filled once with random data and fsynced, so that every
first touch saves real data) and ``disk1`` (16 MiB, sparse, for the churn). Each phase
sets up a fresh snapshot of disk0 with ``-f 1`` and ``reconfigure-auto-expand 1 0``, so
that every MiB of saved data raises the limit and emits an "expanded" event on the data
path; one libnbd connection then writes for --seconds (7): --bs-kib (4 KiB) writes in
a random order, --depth (8) in flight, each to a block not yet written since the
snapshot (a first touch: the old data is read and saved); then ``info 0`` (no error,
nr_changed_blocks = the blocks written) and ``destroy 0``. Control requests go through
snapengine.client.request. Phases, interleaved --repeat (2) times, the order reversed
every other repeat:

* (a) ``alone``: nothing else;
* (b) ``stalled watcher``: a raw Unix socket to RUN/ctl.sock (SO_RCVBUF 4 KiB) sends
  {"op": "watch"} (every minor), reads the "watching" line, byte by byte, and nothing
  after it, while a child process churns control events at --churn-hz (80) cycles a
  second: setup-snapshot / destroy of minor 1 on disk1, 2 events a cycle. The daemon's
  stream thread blocks once the socket is full (about 70 events: on a Unix socket the
  sender's buffer is what counts), events.QUEUE_LIMIT (1024) more fill the watcher's
  queue, and the next emit drops it: the daemon's log must say "was dropped" (a thread
  looks every 50 ms, and notes when). After the writes the socket is read to its end:
  the events that were in the socket, then the ENOBUFS line;
* (c) ``churn, no watcher``: the same churn with nobody watching.

The run dir (socket, registry, log) and the churn's COW files are in --churn-dir,
tmpfs by default: a setup/destroy cycle there takes about 3 ms, against about 20 ms of
fsyncs on this VM's disk, where the churn (about 100 events a second) never fills the
queue within control.WATCH_SEND_TIMEOUT (10 s): the blocked send times out first and
ends the watch ("did not read an event within 10 s"), which protects the origin as
well; the script prints which log line it found.

Every phase is also split at the moment phase b's watcher was dropped in the same
repeat (writes/s until then, and after), so the stalled period is compared with the
same stretch of the other phases. Then, in this process, the cost of one
``EventBus.emit`` of an "expanded" event (timeit): with no watcher, with one watcher
whose queue has room, the one call that finds a watcher's queue full (it drops the
watcher and logs a WARNING, here to /dev/null with the daemon's format), and the calls
after that.

Prints the table (phase, writes/s, MiB/s, × alone: the median over the repeats of the
per-repeat ratios) and the emit costs; progress goes to stderr. The default run takes
about 50 s on the 2-core VM.

    .venv/bin/python -m bench.watch_stall [--dir DIR] [--churn-dir DIR] [--seconds S]
                                          [--churn-hz N] [--repeat N] [--size-mib N]
                                          [--bs-kib 4|64] [--depth N]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import random
import socket
import statistics
import sys
import threading
import time
import timeit
from dataclasses import dataclass

from bench import BLOCK, MiB
from snapengine import events
from snapengine.client import request
from snapengine.daemon import LOG_FORMAT
from tests.harness import connected, daemon, retire_one, sparse_file, workdir

SEED = 20261203
FILL_CHUNK = 4 * MiB  # bytes of random data written at a time
CHURN_SIZE = 16 * MiB  # disk1
DRAIN_QUIET = 2.0  # seconds of silence after which the stalled watcher stops reading
WATCHER_RCVBUF = 4096  # bytes: SO_RCVBUF of the stalled watcher
CHURN_MINOR = 1
SNAP_MINOR = 0
LIMIT_MB = 1  # setup-snapshot -f: the first MiB of saved data is already at the limit
STEP_MB = 1  # reconfigure-auto-expand: one "expanded" event per MiB saved
DROPPED_LINE = "was dropped"  # the daemon's log line (events.EventBus._drop)
TIMED_OUT_LINE = "did not read an event within"  # control._stream's send timeout
LOG_LOOK_EVERY = 0.05  # seconds between two looks at the daemon's log
MARK_EVERY = 256  # writes between two progress marks (phase b is split at the drop)
EMIT_NUMBER = 200_000  # emits per timeit measure
DROP_SAMPLES = 2_000  # emits that each meet a full queue
PHASES = ("alone", "stalled watcher", "churn, no watcher")


@dataclass
class Sample:
    writes: int
    seconds: float
    marks: list[tuple[float, int]]  # (seconds from the start, writes done) now and then
    churn_cycles: int = 0
    drop_after: float | None = None  # seconds from the start to "was dropped" in the log
    watcher: str = ""  # how the stalled watcher ended, and what it read

    @property
    def rate(self) -> float:
        return self.writes / self.seconds

    def split(self, at: float) -> tuple[float, float]:
        """Writes/s before and after ``at`` seconds (the nearest mark)."""
        t, n = min(self.marks, key=lambda m: abs(m[0] - at))
        return n / t, (self.writes - n) / (self.seconds - t)


def fill_random(path: str, size: int, rng: random.Random) -> str:
    with open(path, "wb") as f:
        for _ in range(0, size, FILL_CHUNK):
            f.write(rng.randbytes(FILL_CHUNK))
        os.fsync(f.fileno())  # its writeback does not fall into the first phase
    return path


class LogTail:
    """The daemon's log from a point on; ``look`` reads what was added since."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = os.path.getsize(path)
        self.text = ""

    def look(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            new = f.read()
        self.offset += len(new)
        self.text += new.decode(errors="replace")
        return self.text


def churn_cycles(ctl: str, cow_dir: str, hz: float, stopping, cycles) -> None:
    """In a child process (so that it takes no GIL from the writer): setup-snapshot /
    destroy of minor 1 on disk1, ``hz`` cycles a second or as fast as it can."""
    start = time.monotonic()
    while not stopping.is_set():
        cow = os.path.join(cow_dir, f"churn{cycles.value}")
        request(ctl, "setup-snapshot", block_device="disk1", cow_file=cow,
                minor=str(CHURN_MINOR), fallocate_mb=str(LIMIT_MB))
        request(ctl, "destroy", minor=str(CHURN_MINOR))
        cycles.value += 1
        late = start + cycles.value / hz - time.monotonic()
        if late > 0:
            stopping.wait(late)


class Churn:
    """The churn process, and a thread that notes when the daemon's log first says the
    watcher was dropped (seconds after ``start``)."""

    def __init__(self, ctl: str, cow_dir: str, hz: float, log: LogTail, start: float) -> None:
        mp = multiprocessing.get_context("fork")
        self.stopping = mp.Event()
        self._cycles = mp.Value("q", 0)
        self.process = mp.Process(target=churn_cycles, name="churn", daemon=True,
                                  args=(ctl, cow_dir, hz, self.stopping, self._cycles))
        self.looker = threading.Thread(target=self._look, name="log", daemon=True)
        self.log, self.start_time = log, start
        self.drop_after: float | None = None

    def start(self) -> None:
        self.process.start()
        self.looker.start()

    def _look(self) -> None:
        while not self.stopping.wait(LOG_LOOK_EVERY):
            if DROPPED_LINE in self.log.look():
                self.drop_after = time.monotonic() - self.start_time
                return

    def stop(self) -> None:
        self.stopping.set()
        self.process.join()
        self.looker.join()
        if self.process.exitcode != 0:
            raise SystemExit(f"bench.watch_stall: the churn failed ({self.process.exitcode})")

    @property
    def cycles(self) -> int:
        return self._cycles.value


def stalled_watcher(ctl: str) -> socket.socket:
    """A watch of every minor that reads its "watching" line (so it is subscribed),
    byte by byte so that no event is read, and nothing after it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, WATCHER_RCVBUF)
    s.settimeout(10)
    s.connect(ctl)
    s.sendall(b'{"op": "watch"}\n')
    line = b""
    while not line.endswith(b"\n"):
        byte = s.recv(1)
        if not byte:
            raise SystemExit("bench.watch_stall: the daemon hung up the watch")
        line += byte
    if json.loads(line) != {"ok": True, "result": "watching"}:
        raise SystemExit(f"bench.watch_stall: watch refused: {line!r}")
    return s


def drain(s: socket.socket) -> tuple[int, str]:
    """Read the stalled watcher to its end: (events received, how it ended). A watch
    that goes on (it was not dropped) is closed after DRAIN_QUIET s of silence."""
    s.settimeout(DRAIN_QUIET)
    received, last = 0, "a hang-up without an end line"
    with s, s.makefile("rb") as replies:
        try:
            for line in replies:
                reply = json.loads(line)
                if "event" in reply:
                    received += 1
                else:
                    last = json.dumps(reply)
        except socket.timeout:
            last = f"nothing for {DRAIN_QUIET:g} s (the watch went on)"
    return received, last


def write_for(uri: str, seconds: float, blocks: list[int], bs: int, depth: int) -> Sample:
    """First-touch writes at ``blocks`` (in order) for ``seconds``, ``depth`` in flight."""
    data = random.Random(SEED).randbytes(bs)
    marks = []
    with connected(uri) as h:
        pending = written = 0
        start = time.monotonic()
        for block in blocks:
            if pending >= depth:
                retire_one(h)
                pending -= 1
                written += 1
                if written % MARK_EVERY == 0:
                    marks.append((time.monotonic() - start, written))
                    if marks[-1][0] >= seconds:
                        break
            h.aio_pwrite(data, block * bs)
            pending += 1
        else:
            print(f"bench.watch_stall: every block was written within {seconds:g} s: "
                  "a shorter phase (raise --size-mib)", file=sys.stderr)
        for _ in range(pending):
            retire_one(h)
        h.flush()
        return Sample(written + pending, time.monotonic() - start, marks)


def check_snapshot(d, writes: int, bs: int) -> None:
    """Minor 0 did not fail and counted exactly the blocks written."""
    info = d.request("info", minor=str(SNAP_MINOR))
    if "error" in info or info["nr_changed_blocks"] != writes * (bs // BLOCK):
        raise SystemExit(f"bench.watch_stall: unexpected state of minor 0: {info}")


def one_phase(d, a: argparse.Namespace, work: str, churn_work: str, phase: str,
              number: int) -> Sample:
    """A fresh snapshot of disk0 (-f 1, auto-expand 1), the writes, a check, destroy."""
    bs = a.bs_kib * 1024
    blocks = list(range(a.size_mib * MiB // bs))
    random.Random(SEED + number).shuffle(blocks)
    os.sync()  # the last phase's writeback does not fall into this one
    d.request("setup-snapshot", block_device="disk0", minor=str(SNAP_MINOR),
              cow_file=os.path.join(work, f"cow{number}"), fallocate_mb=str(LIMIT_MB))
    d.request("reconfigure-auto-expand", minor=str(SNAP_MINOR), step_mb=str(STEP_MB))
    log = LogTail(d.log_path)
    watcher = stalled_watcher(d.ctl) if phase == PHASES[1] else None
    start = time.monotonic()
    churn = Churn(d.ctl, churn_work, a.churn_hz, log, start) if phase != PHASES[0] else None
    if churn:
        churn.start()
    try:
        sample = write_for(d.uri("disk0"), a.seconds, blocks, bs, a.depth)
    finally:
        if churn:
            churn.stop()
    if churn:
        sample.churn_cycles, sample.drop_after = churn.cycles, churn.drop_after
    if watcher is not None:
        received, last = drain(watcher)
        lines = log.look().splitlines()
        ended = next((x for x in lines if DROPPED_LINE in x), None) or \
            next((x for x in lines if TIMED_OUT_LINE in x), "neither dropped nor timed out")
        sample.watcher = f"{ended!r}; read afterwards: {received} events, then {last}"
    check_snapshot(d, sample.writes, bs)
    d.request("destroy", minor=str(SNAP_MINOR))
    return sample


def emit_costs() -> dict[str, float]:
    """Seconds per EventBus.emit of an "expanded" event, in this process."""
    handler = logging.FileHandler(os.devnull)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger(events.__name__)
    logger.addHandler(handler)
    logger.propagate = False
    fields = {"old_limit": 64 * MiB, "new_limit": 65 * MiB, "auto": True}
    bus = events.EventBus()

    def emit() -> None:
        bus.emit(SNAP_MINOR, "expanded", 3, **fields)
    costs = {"no watcher": min(timeit.repeat(emit, number=EMIT_NUMBER, repeat=3)) / EMIT_NUMBER}
    roomy = bus.subscribe(limit=0)  # unbounded: never full
    costs["one watcher, queue has room"] = min(
        timeit.repeat(emit, number=EMIT_NUMBER // 4, repeat=3)) / (EMIT_NUMBER // 4)
    bus.unsubscribe(roomy)
    drops = []
    for _ in range(DROP_SAMPLES):
        full = bus.subscribe(limit=1)
        full.offer({})
        t0 = time.perf_counter()
        emit()
        drops.append(time.perf_counter() - t0)
        assert full.dropped
    costs["the call that meets a full queue (drop + log)"] = statistics.median(drops)
    costs["after the drop"] = min(timeit.repeat(emit, number=EMIT_NUMBER, repeat=3)) / EMIT_NUMBER
    logger.removeHandler(handler)
    handler.close()
    return costs


def median_ratio(values: list[float], base: list[float]) -> str:
    return f"{statistics.median(v / b for v, b in zip(values, base)):.2f}"


def report(a: argparse.Namespace, samples: dict[str, list[Sample]]) -> None:
    bs = a.bs_kib * 1024
    print(f"Origin writes with a stalled watcher ({a.bs_kib} KiB random first touch, "
          f"depth {a.depth}, {a.seconds:g} s per phase, {a.repeat} repeat(s), -f {LIMIT_MB} "
          f"with auto-expand {STEP_MB} MiB, origin {a.size_mib} MiB in {a.dir}, churn "
          f"{a.churn_hz:g} cycles/s in {a.churn_dir})\n")
    drops = [s.drop_after for s in samples[PHASES[1]]]
    split = None not in drops  # the watcher was dropped in every repeat
    print("| phase | writes/s | MiB/s | × alone | until the drop: writes/s | × alone "
          "| after the drop: writes/s | × alone | churn cycles/s |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = samples[PHASES[0]]
    for phase in PHASES:
        mine = samples[phase]
        rates = [s.rate for s in mine]
        row = [phase, f"{statistics.median(rates):,.0f}",
               f"{statistics.median(rates) * bs / MiB:.1f}",
               median_ratio(rates, [s.rate for s in base])]
        for part in (0, 1):
            if split:
                parts = [s.split(t)[part] for s, t in zip(mine, drops)]
                row += [f"{statistics.median(parts):,.0f}",
                        median_ratio(parts, [s.split(t)[part] for s, t in zip(base, drops)])]
            else:
                row += ["n/a", "n/a"]
        row.append("—" if phase == PHASES[0] else
                   f"{statistics.median(s.churn_cycles / s.seconds for s in mine):.0f}")
        print("| " + " | ".join(row) + " |")
    b, c = samples[PHASES[1]], samples[PHASES[2]]
    versus = [f"whole phase {median_ratio([s.rate for s in b], [s.rate for s in c])}"]
    for i, part in enumerate(("until the drop", "after the drop") if split else ()):
        parts = [[s.split(t)[i] for s, t in zip(mine, drops)] for mine in (b, c)]
        versus.append(f"{part} {median_ratio(*parts)}")
    print(f"\n{PHASES[1]} / {PHASES[2]}: " + ", ".join(versus))
    print("Each phase is split where the watcher of phase b was dropped, in the same "
          "repeat: " + ", ".join("n/a" if t is None else f"{t:.2f} s" for t in drops))
    for i, s in enumerate(samples[PHASES[1]]):
        print(f"repeat {i + 1}: the daemon's log: {s.watcher}")
    print("\n| EventBus.emit | µs per call |\n|---|---:|")
    for what, seconds in emit_costs().items():
        print(f"| {what} | {seconds * 1e6:.2f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dir", default="/var/tmp", help="where the origins and disk0's COW "
                   "files go (needs about 2 × --size-mib free)")
    p.add_argument("--churn-dir", default="/dev/shm", help="where the run dir and the "
                   "churn's COW files go")
    p.add_argument("--seconds", type=float, default=7.0, help="writes per phase")
    p.add_argument("--churn-hz", type=float, default=80.0, help="setup/destroy cycles "
                   "a second in phases b and c (2 events each)")
    p.add_argument("--repeat", type=int, default=2, help="interleaved repeats")
    p.add_argument("--size-mib", type=int, default=512, help="disk0's size")
    p.add_argument("--bs-kib", type=int, default=4, choices=(4, 64), help="write size")
    p.add_argument("--depth", type=int, default=8, help="writes in flight")
    a = p.parse_args(argv)
    if a.seconds >= 9:
        print("bench.watch_stall: with --seconds of 9 or more the stuck send may time "
              "out before the watcher is read", file=sys.stderr)
    samples: dict[str, list[Sample]] = {phase: [] for phase in PHASES}
    with workdir(a.dir, "snapengine-watch-") as work, \
            workdir(a.churn_dir, "seb-watch-") as churn_work:
        disk0 = fill_random(os.path.join(work, "disk0.img"), a.size_mib * MiB,
                            random.Random(SEED))
        disk1 = sparse_file(os.path.join(work, "disk1.img"), CHURN_SIZE)
        with daemon(os.path.join(churn_work, "run"), [(disk0, "disk0"), (disk1, "disk1")],
                    verbose=False) as d:
            for number in range(a.repeat):
                order = PHASES if number % 2 == 0 else PHASES[::-1]
                for i, phase in enumerate(order):
                    s = one_phase(d, a, work, churn_work, phase, number * len(PHASES) + i)
                    samples[phase].append(s)
                    print(f"[{number + 1}/{a.repeat}] {phase}: {s.rate:,.0f} writes/s"
                          + (f", {s.churn_cycles} churn cycles" if s.churn_cycles else ""),
                          file=sys.stderr, flush=True)
    report(a, samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
