"""nbdkit entry point of snapengine: adapts nbdkit's callbacks to the engine.

    nbdkit -U RUN/nbd.sock python nbd_plugin.py run_dir=RUN origins='[["/srv/disk0.img", "disk0"]]'

Normally started by ``snapengine serve``. Parameters: run_dir (required), origins (JSON
list of [path, export name]), max_minors, cache_default (MB), fallocate_percent, tcp
(HOST:PORT), metrics (HOST:PORT), log (file), verbose (1), durable (1), supervisor (a
pid: exit when it is gone).

Every callback goes through ``_failed`` on an exception: an OSError becomes its errno
for the client (``nbdkit.set_error``), anything else is logged with its traceback and
becomes EIO. Most are wrapped by the ``_callback`` decorator; the four data callbacks
call it from an inline ``except`` instead, which costs nothing until something fails
(a decorator's extra call is measurable on every 4 KiB request). Each data callback
first keeps its worker thread's Python thread state for the life of the connection
(snapengine/threadstate.py: nbdkit would build and destroy one per request);
``close`` releases them.
"""

import errno
import functools
import logging
import os
import site
from threading import get_ident

for _dir in os.environ.get("SNAPENGINE_SITE", "").split(os.pathsep):
    if _dir:
        site.addsitedir(_dir)

import nbdkit  # noqa: E402  (provided by nbdkit's python plugin)

from snapengine import threadstate  # noqa: E402
from snapengine.daemon import Daemon  # noqa: E402
from snapengine.errors import SnapError  # noqa: E402

API_VERSION = 2
log = logging.getLogger("snapengine.plugin")

daemon = Daemon()  # the only module global: configured, started and stopped by nbdkit


def _failed(name: str, e: BaseException) -> None:
    """Tell nbdkit which errno the client gets for ``e``; log it if it is a bug."""
    if isinstance(e, OSError):
        nbdkit.set_error(e.errno or errno.EIO)
    else:
        log.error("%s failed", name, exc_info=e)
        nbdkit.set_error(errno.EIO)


def _callback(func):
    @functools.wraps(func)
    def wrapper(*args):
        try:
            return func(*args)
        except Exception as e:
            _failed(func.__name__, e)
            raise
    return wrapper


FUA = nbdkit.FLAG_FUA
MAY_TRIM = nbdkit.FLAG_MAY_TRIM
FAST_ZERO = nbdkit.FLAG_FAST_ZERO
REQ_ONE = nbdkit.FLAG_REQ_ONE


def thread_model():
    # Requests run in parallel (I/O releases the GIL). The engine locks what it shares:
    # a write gate per origin, a short per-minor lock never held across I/O.
    return nbdkit.THREAD_MODEL_PARALLEL


@_callback
def config(key, value):
    daemon.configure(key, value)


@_callback
def config_complete():
    daemon.check()


@_callback
def get_ready():
    try:
        daemon.start()  # origins opened, minors resumed: before any client is accepted
    except OSError as e:  # a busy origin, say: the reason, as one line in the log
        log.error("cannot start: %s", e)
        raise


@_callback
def after_fork():
    daemon.start_threads()  # threads do not survive nbdkit's fork


def cleanup():
    daemon.stop()


@_callback
def list_exports(readonly, is_tls):
    return daemon.engine.export_list()


@_callback
def open(readonly):
    try:
        name = nbdkit.export_name()
    except UnicodeDecodeError:  # a client's bad name, not our failure
        raise SnapError(errno.ENOENT, "export names are UTF-8")
    return daemon.engine.open_export(name, readonly)


@_callback
def close(h):
    try:
        h.close()
    finally:  # every worker thread of this connection has exited
        log.debug("connection closed: %d thread states released", threadstate.release(h))


def get_size(h):
    return h.size


def export_description(h):
    return h.description


def can_write(h):
    return h.writable


def can_trim(h):
    return h.writable


def can_zero(h):
    return h.writable


def can_fast_zero(h):
    # Must be advertised: nbdkit 1.32 does not reject an unadvertised FAST_ZERO, its
    # backend_zero asserts can_fast_zero == 1 and aborts the server. A zero here may copy
    # to the COW file first, never guaranteed fast, so every fast zero fails fast with
    # ENOTSUP (see ``zero``) and the client falls back to a normal zero.
    return h.writable


def can_fua(h):
    return nbdkit.FUA_NATIVE if h.writable else nbdkit.FUA_NONE


def can_flush(h):
    return True


def can_extents(h):
    return True


def can_multi_conn(h):
    return True


def is_rotational(h):
    return False


# First in each data callback: keep this worker thread's Python thread state
# (snapengine/threadstate.py); inline, so that a thread kept already pays two C calls.
kept, keep = threadstate.threads, threadstate.keep


def pread(h, buf, offset, flags):
    if get_ident() not in kept:
        keep(h)
    try:
        h.pread(buf, offset)
    except Exception as e:
        _failed("pread", e)
        raise


def pwrite(h, buf, offset, flags):
    if get_ident() not in kept:
        keep(h)
    try:
        h.pwrite(buf, offset, flags & FUA)
    except Exception as e:
        _failed("pwrite", e)
        raise


def zero(h, count, offset, flags):
    if get_ident() not in kept:
        keep(h)
    if flags & FAST_ZERO:
        nbdkit.set_error(errno.ENOTSUP)  # the client falls back to a normal zero
        raise OSError(errno.ENOTSUP, "fast zero is not supported")
    try:
        h.zero(count, offset, flags & MAY_TRIM, flags & FUA)
    except Exception as e:
        _failed("zero", e)
        raise


def trim(h, count, offset, flags):
    if get_ident() not in kept:
        keep(h)
    try:
        h.trim(count, offset, flags & FUA)
    except Exception as e:
        _failed("trim", e)
        raise


@_callback
def flush(h, flags):
    h.flush()


@_callback
def extents(h, count, offset, flags):
    if get_ident() not in kept:
        keep(h)
    return h.extents(count, offset, flags & REQ_ONE)
