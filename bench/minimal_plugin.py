"""The smallest useful nbdkit Python plugin: a passthrough to one file.

    nbdkit -U SOCK python bench/minimal_plugin.py file=IMG

It is the benchmark's "minimal-python" peer: the floor of what any nbdkit Python
plugin costs per request (nbdkit's embedded interpreter, one callback, one system
call), with no tracking at all. Requests run in parallel (``os.preadv``/``os.pwrite``
release the GIL); reads go straight into nbdkit's buffer, without a copy.
"""

import os

import nbdkit  # provided by nbdkit's python plugin

API_VERSION = 2

_path = ""  # the file to serve, from file=PATH


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global _path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key!r} (only file=PATH)")
    _path = os.path.abspath(value)


def config_complete():
    if not _path:
        raise RuntimeError("file=PATH is required")


def open(readonly):
    return os.open(_path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)


def close(h):
    os.close(h)


def get_size(h):
    return os.fstat(h).st_size


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    if os.preadv(h, [buf], offset) != len(buf):
        raise OSError(5, f"short read at {offset}")


def pwrite(h, buf, offset, flags):
    if os.pwrite(h, buf, offset) != len(buf):
        raise OSError(5, f"short write at {offset}")


def flush(h, flags):
    os.fdatasync(h)
