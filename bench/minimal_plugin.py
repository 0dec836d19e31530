"""The smallest useful nbdkit Python plugin: a passthrough to one file.

    nbdkit -U SOCK python bench/minimal_plugin.py file=IMG

    nbdkit -U SOCK python bench/minimal_plugin.py file=IMG keep=1

It is the benchmark's "minimal-python" peer: the floor of what any nbdkit Python
plugin costs per request (nbdkit's embedded interpreter, one callback, one system
call), with no tracking at all. Requests run in parallel (``os.preadv``/``os.pwrite``
release the GIL); reads go straight into nbdkit's buffer, without a copy.

``keep=1`` is the "minimal-python-kept" peer: the same plugin keeping each worker
thread's Python thread state for the life of its connection, as snapengine does
(snapengine/threadstate.py); without it nbdkit builds and destroys one per request.
"""

import os
import sys
from threading import get_ident

import nbdkit  # provided by nbdkit's python plugin

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from snapengine import threadstate  # noqa: E402

API_VERSION = 2

_path = ""  # the file to serve, from file=PATH
_kept = None  # keep=1: threadstate.threads (the threads whose state is kept)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global _path, _kept
    if key == "file":
        _path = os.path.abspath(value)
    elif key == "keep":
        _kept = threadstate.threads if value == "1" else None
    else:
        raise RuntimeError(f"unknown parameter {key!r} (file=PATH, keep=0|1)")


def config_complete():
    if not _path:
        raise RuntimeError("file=PATH is required")


def open(readonly):
    return os.open(_path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)


def close(h):
    os.close(h)
    if _kept is not None:
        threadstate.release(h)


def get_size(h):
    return os.fstat(h).st_size


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    if _kept is not None and get_ident() not in _kept:
        threadstate.keep(h)
    if os.preadv(h, [buf], offset) != len(buf):
        raise OSError(5, f"short read at {offset}")


def pwrite(h, buf, offset, flags):
    if _kept is not None and get_ident() not in _kept:
        threadstate.keep(h)
    if os.pwrite(h, buf, offset) != len(buf):
        raise OSError(5, f"short write at {offset}")


def flush(h, flags):
    os.fdatasync(h)
