"""Prometheus metrics: ``snapengine serve --metrics HOST:PORT`` serves them at /metrics.

docs/metrics.md lists every metric. Design notes:

* **Off, nothing is paid**: no recorder exists, origin exports bind the origin's own
  methods (exports.py), no thread runs, nothing listens.
* **Per minor**, everything is read at scrape time from the engine (``Engine.sample``,
  under the lock ``info()`` takes): the data path pays nothing for it.
* **Per origin and operation** (read, write, trim, zero), a ``Recorder`` of plain ints:
  the latency histogram's bucket counts, the bytes, the nanoseconds, the failures. The
  origin export's four data callbacks are wrapped once per origin (``OriginRecorders``):
  per request two ``perf_counter_ns`` calls, one ``bisect`` on fixed bounds and three
  integer adds, no lock. prometheus_client's ``Counter.inc``/``Histogram.observe`` take a
  lock each: 16 nbdkit threads would convoy behind it, as they did behind the per-minor
  lock (docs/performance.md). The collector turns the ints into metric families when
  Prometheus scrapes. Measured: about 1.8 us of CPU per request, 4 to 5 % of 4 KiB IOPS
  on the 2-core test machine; cheaper variants were not measurably cheaper
  (docs/performance.md, "The cost of --metrics").
* **Why the adds need no lock.** nbdkit embeds CPython 3.11: a thread runs bytecode only
  while it holds the GIL, and hands the GIL over only at the eval breaker (function
  entry, backward jumps, after a call). ``buckets[i] += 1`` and ``rec.nbytes += size``
  compile to a load, an int add and a store with no call in between (every call the
  recording makes, ``len``, ``bisect``, the clock, is done into a local first), and
  adding or freeing an int runs no Python code. So no other thread runs between the
  load and the store, and no increment is lost, however the 16 threads interleave.
  The scrape copies a bucket list in one C call; it can see a request's bucket before
  its bytes (a request recording at that instant), never a torn or falling value.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from time import perf_counter_ns
from typing import Callable, Iterator, Protocol, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.utils import floatToGoString

from .errors import SnapError
from .minor import STATES, Minor
from .origin import Origin
from .relay import parse_hostport
from .units import BLOCK_SIZE

T = TypeVar("T")


class Engine(Protocol):
    """What the metrics need of the engine (engine.py, which imports this module's
    recorders: a protocol here keeps the import one way)."""

    origins: dict[str, Origin]
    recorders: dict[str, "OriginRecorders"]

    def sample(self, read: Callable[[Minor], T]) -> list[T]: ...


log = logging.getLogger(__name__)

# Upper bounds (ns) of the latency buckets: a 4 KiB request on the page cache takes
# 10-50 us in the plugin, a 1 MiB one 0.3-2 ms, a first touch with --durable waits for
# an fdatasync (ms), a disk that stalls for seconds.
BOUNDS_NS = (10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
             5_000_000, 10_000_000, 25_000_000, 50_000_000, 100_000_000, 250_000_000,
             500_000_000, 1_000_000_000, 2_500_000_000, 10_000_000_000)
LE = tuple(floatToGoString(b / 1e9) for b in BOUNDS_NS) + ("+Inf",)  # the "le" labels
OPS = {"read": "read", "write": "written", "trim": "trimmed", "zero": "zeroed"}  # op label
#   -> the word in the name of its bytes counter (snapengine_origin_written_bytes_total)
STATE_NAMES = {n: f"{phase} {mode}" for (phase, mode), n in STATES.items()}  # state label
PREFIX = "snapengine_"


class Recorder:
    """What the data path records for one (origin, op): only ever added to."""

    __slots__ = ("buckets", "nbytes", "ns", "errors")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BOUNDS_NS) + 1)  # requests done, by latency; the last: +Inf
        self.nbytes = 0  # bytes of the requests done
        self.ns = 0  # their total latency
        self.errors = 0  # requests that failed (not in the buckets)


class OriginRecorders:
    """The recorders of one origin and its data callbacks wrapped to feed them, bound
    once; ``OriginExport`` takes ``callbacks`` instead of the origin's methods."""

    def __init__(self, origin: Origin) -> None:
        self.name = origin.name
        self.ops = {op: Recorder() for op in OPS}
        self.callbacks = (_timed_read(origin.pread, self.ops["read"]),
                          _timed_write(origin.pwrite, self.ops["write"]),
                          _timed_zero(origin.zero, self.ops["zero"]),
                          _timed_trim(origin.trim, self.ops["trim"]))


# The four wrappers differ only in their signature (a *args one costs ~0.4 us more per
# request). No try/finally: a request that raises is counted as an error, nothing else.

def _timed_read(call: Callable, rec: Recorder) -> Callable:
    buckets = rec.buckets

    def pread(buf: bytearray, offset: int) -> None:
        start = perf_counter_ns()
        try:
            call(buf, offset)
        except BaseException:
            rec.errors += 1
            raise
        ns = perf_counter_ns() - start
        size = len(buf)
        i = bisect_right(BOUNDS_NS, ns)
        buckets[i] += 1
        rec.nbytes += size
        rec.ns += ns
    return pread


def _timed_write(call: Callable, rec: Recorder) -> Callable:
    buckets = rec.buckets

    def pwrite(buf: bytes, offset: int, fua: bool) -> None:
        start = perf_counter_ns()
        try:
            call(buf, offset, fua)
        except BaseException:
            rec.errors += 1
            raise
        ns = perf_counter_ns() - start
        size = len(buf)
        i = bisect_right(BOUNDS_NS, ns)
        buckets[i] += 1
        rec.nbytes += size
        rec.ns += ns
    return pwrite


def _timed_zero(call: Callable, rec: Recorder) -> Callable:
    buckets = rec.buckets

    def zero(length: int, offset: int, may_trim: bool, fua: bool) -> None:
        start = perf_counter_ns()
        try:
            call(length, offset, may_trim, fua)
        except BaseException:
            rec.errors += 1
            raise
        ns = perf_counter_ns() - start
        i = bisect_right(BOUNDS_NS, ns)
        buckets[i] += 1
        rec.nbytes += length
        rec.ns += ns
    return zero


def _timed_trim(call: Callable, rec: Recorder) -> Callable:
    buckets = rec.buckets

    def trim(length: int, offset: int, fua: bool) -> None:
        start = perf_counter_ns()
        try:
            call(length, offset, fua)
        except BaseException:
            rec.errors += 1
            raise
        ns = perf_counter_ns() - start
        i = bisect_right(BOUNDS_NS, ns)
        buckets[i] += 1
        rec.nbytes += length
        rec.ns += ns
    return trim


@dataclass(frozen=True)
class MinorSample:
    """One minor as a scrape reports it; None: not known now (no COW file open)."""

    minor: str
    origin: str
    cow_file: str
    state: int
    error: int
    limit_bytes: int | None  # None until the COW file has been checked (unverified)
    changed_blocks: int | None
    allocated_bytes: int | None
    saved_blocks: int | None  # only while a snapshot is served

    @classmethod
    def of(cls, m: Minor) -> "MinorSample":
        """Read ``m``; call under the engine's lock (``Engine.sample``)."""
        t, snap = m.tracker, m.snapshot
        return cls(minor=str(m.number), origin=m.origin.name, cow_file=m.cow_path,
                   state=m.state, error=m.error, limit_bytes=m.limit or None,
                   changed_blocks=None if t is None else t.nr_changed,
                   allocated_bytes=None if t is None else t.cow.io.allocated(),
                   saved_blocks=None if snap is None else snap.nr_slots)


MINOR_GAUGES = (  # (name, help, the MinorSample field, its factor)
    ("minor_state_number", "elastio-snap's state number, as in elioctl info (0-5)",
     "state", 1),
    ("minor_error", "elioctl info's error: a negative errno once the snapshot or list has "
     "failed, else 0", "error", 1),
    ("minor_cow_used_bytes", "COW data counted against the limit: saved blocks x 4096",
     "saved_blocks", BLOCK_SIZE),
    ("minor_cow_limit_bytes", "the COW data limit (-f, raised by expand-cow-file and "
     "auto-expand)", "limit_bytes", 1),
    ("minor_cow_allocated_bytes", "disk space the COW file holds (data, index, header)",
     "allocated_bytes", 1),
    ("minor_saved_blocks", "4 KiB blocks whose old data the snapshot saved",
     "saved_blocks", 1),
    ("minor_changed_blocks", "blocks changed since the snapshot point (nr_changed_blocks)",
     "changed_blocks", 1),
)


def minor_families(samples: list[MinorSample]) -> Iterator[Metric]:
    info = GaugeMetricFamily(PREFIX + "minor_info", "a minor's origin and COW file (always 1)",
                             labels=["minor", "origin", "cow_file"])
    state = GaugeMetricFamily(PREFIX + "minor_state", "1 for the minor's state, 0 for the "
                              "others", labels=["minor", "state"])
    for s in samples:
        info.add_metric([s.minor, s.origin, s.cow_file], 1)
        for number, name in STATE_NAMES.items():
            state.add_metric([s.minor, name], int(number == s.state))
    yield info
    yield state
    for name, text, field, factor in MINOR_GAUGES:
        gauge = GaugeMetricFamily(PREFIX + name, text, labels=["minor"])
        for s in samples:
            value = getattr(s, field)
            if value is not None:
                gauge.add_metric([s.minor], value * factor)
        yield gauge


def origin_families(origins: list[OriginRecorders]) -> Iterator[Metric]:
    label = ["origin", "op"]
    requests = CounterMetricFamily(PREFIX + "origin_requests", "NBD requests done", labels=label)
    errors = CounterMetricFamily(PREFIX + "origin_request_errors", "NBD requests that failed",
                                 labels=label)
    seconds = HistogramMetricFamily(PREFIX + "origin_request_duration_seconds", "time in the "
                                    "plugin per request done", labels=label)
    nbytes = {op: CounterMetricFamily(f"{PREFIX}origin_{word}_bytes", f"bytes {word} by "
                                      "requests done", labels=["origin"])
              for op, word in OPS.items()}
    for o in origins:
        for op, rec in o.ops.items():
            counts = list(accumulate(rec.buckets[:]))  # one copy: a consistent histogram
            requests.add_metric([o.name, op], counts[-1])
            errors.add_metric([o.name, op], rec.errors)
            seconds.add_metric([o.name, op], list(zip(LE, counts)), rec.ns / 1e9)
            nbytes[op].add_metric([o.name], rec.nbytes)
    yield from (requests, errors, seconds, *nbytes.values())


class EngineCollector:
    """Builds every snapengine family when Prometheus scrapes (registry.collect)."""

    def __init__(self, engine: Engine, origins: list[OriginRecorders]) -> None:
        self.engine = engine
        self.origins = origins

    def collect(self) -> Iterator[Metric]:
        yield from minor_families(self.engine.sample(MinorSample.of))
        yield from origin_families(self.origins)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:
        """No line per scrape."""


class _Server(ThreadingWSGIServer):
    """One thread per scrape (daemon threads: the stop does not wait for a client)."""


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """The /metrics listener on HOST:PORT and the recorders it reports. ``__init__``
    binds (SnapError naming HOST:PORT if it cannot) and installs nothing; ``start``
    installs the recorders in the engine (every origin connection opened from then on
    is counted) and serves; ``stop`` closes the listener."""

    def __init__(self, engine: Engine, hostport: str) -> None:
        try:
            host, port = parse_hostport(hostport)
        except ValueError:
            raise SnapError(errno.EINVAL, f"--metrics {hostport!r} is not HOST:PORT")
        self.engine = engine
        self.origins = [OriginRecorders(o) for o in engine.origins.values()]
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, self.origins))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU...
        server_class = _Server6 if ":" in host else _Server
        try:
            self._httpd = make_server(host, port, make_wsgi_app(self.registry), server_class,
                                      handler_class=_QuietHandler)
        except OSError as e:  # a gaierror's errno is an EAI_ code: its text says more
            err = e.errno if e.errno and e.errno > 0 else errno.EADDRNOTAVAIL
            why = "" if err == e.errno else f" ({e.strerror})"
            raise SnapError(err, f"metrics: cannot listen on {hostport}{why}") from e
        self.address = hostport
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics",
                                        daemon=True)

    def start(self) -> None:
        self.engine.recorders = {o.name: o for o in self.origins}
        self._thread.start()
        log.info("metrics on http://%s/metrics", self.address)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()  # waits for serve_forever's loop (0.5 s at most)
        self._httpd.server_close()
