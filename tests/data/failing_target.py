"""An nbdkit Python plugin for tests: an in-memory disk whose writes at or past
``fail_from`` fail with EIO (tests/test_nbd_target.py: a target that fails half-way).

    nbdkit -U SOCK python failing_target.py size=BYTES fail_from=BYTES
"""

import errno

import nbdkit

API_VERSION = 2
params = {"size": 0, "fail_from": 0}
disk = bytearray()


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def config(key, value):
    params[key] = int(value)


def config_complete():
    disk.extend(bytes(params["size"]))


def open(readonly):
    return 1


def get_size(h):
    return params["size"]


def can_zero(h):
    return True


def pread(h, buf, offset, flags):
    buf[:] = disk[offset:offset + len(buf)]


def _check(offset, count):
    if offset + count > params["fail_from"]:
        nbdkit.set_error(errno.EIO)
        raise OSError(errno.EIO, "this target fails past fail_from")


def pwrite(h, buf, offset, flags):
    _check(offset, len(buf))
    disk[offset:offset + len(buf)] = buf


def zero(h, count, offset, flags):
    _check(offset, count)
    disk[offset:offset + count] = bytes(count)
