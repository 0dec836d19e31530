"""Positional file I/O: the one seam between the engine and the kernel.

Every byte the engine reads or writes, on an origin or a COW file, goes through a
``FileIO``. Tests replace it (``FaultyIO``, the power-cut recorder) to inject errors,
short writes and crashes at exact points, without monkey-patching the engine.

Thread-safety: methods are positional (pread/pwrite) and keep no file offset, so one
``FileIO`` may be used from many threads at once.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import threading

# fallocate(2) modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01  # do not change the file size
FALLOC_FL_PUNCH_HOLE = 0x02  # deallocate; reads return zeroes
FALLOC_FL_ZERO_RANGE = 0x10  # zero, keep the space allocated

# block device ioctls (linux/fs.h)
BLKGETSIZE64 = 0x80081272  # u64 size in bytes
BLKDISCARD = 0x1277  # {start, length} u64 pair
BLKZEROOUT = 0x127F  # {start, length} u64 pair

UNKNOWN_END = 1 << 63  # data_at: the end of data where the filesystem cannot say

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileIO:
    """An open file or block device, with the few operations the engine needs."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        st = os.fstat(fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        self._can_punch = True  # cleared once the filesystem says EOPNOTSUPP

    @classmethod
    def open(cls, path: str, flags: int, mode: int = 0o600) -> "FileIO":
        fd = os.open(path, flags | os.O_CLOEXEC, mode)
        try:
            return cls(fd, path)
        except BaseException:
            os.close(fd)
            raise

    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino): the file itself, whatever path names it."""
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    def allocated(self) -> int:
        """Bytes of disk space the file holds now (st_blocks x 512)."""
        return os.fstat(self.fd).st_blocks * 512

    def size(self) -> int:
        if self.is_block:
            buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
            return struct.unpack("<Q", buf)[0]
        return os.fstat(self.fd).st_size

    def pread_into(self, buf, offset: int) -> int:
        """Fill ``buf`` from ``offset``; return the bytes read (short only at EOF)."""
        done = os.preadv(self.fd, [buf], offset)
        if done == len(buf) or done == 0:
            return done
        view = memoryview(buf).cast("B")
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        n = self.pread_into(buf, offset)
        return bytes(buf[:n])

    def pwrite(self, buf, offset: int) -> None:
        """Write all of ``buf`` at ``offset`` or raise."""
        done = os.pwrite(self.fd, buf, offset)
        if done == len(buf):
            return
        view = memoryview(buf).cast("B")
        while done < len(view):
            n = os.pwrite(self.fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"short write to {self.path} at offset {offset + done}")
            done += n

    def pwrite_dsync(self, buf, offset: int) -> None:
        """Write and make durable before returning (NBD FUA)."""
        view = memoryview(buf).cast("B")
        n = os.pwritev(self.fd, [view], offset, os.RWF_DSYNC)
        if n < len(view):
            self.pwrite(view[n:], offset + n)
            self.fdatasync()

    def fsync(self) -> None:
        os.fsync(self.fd)

    def fdatasync(self) -> None:
        os.fdatasync(self.fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def punch(self, offset: int, length: int) -> None:
        """Deallocate a range; it reads back as zeroes afterwards."""
        if length <= 0:
            return
        if self.is_block:
            fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("<QQ", offset, length))
            return
        self._fallocate_or_write_zeroes(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def zero(self, offset: int, length: int, may_trim: bool) -> None:
        """Make a range read back as zeroes, deallocating it if ``may_trim``."""
        if length <= 0:
            return
        if self.is_block:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("<QQ", offset, length))
            return
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if may_trim else FALLOC_FL_ZERO_RANGE
        self._fallocate_or_write_zeroes(mode, offset, length)

    def _fallocate_or_write_zeroes(self, mode: int, offset: int, length: int) -> None:
        if self._can_punch:
            try:
                fallocate(self.fd, mode, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                self._can_punch = False  # remember: this filesystem cannot
        zeroes = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(zeroes), end - offset)
            self.pwrite(memoryview(zeroes)[:n], offset)
            offset += n

    def data_extents(self, start: int, end: int):
        """Yield (offset, length) of the ranges in [start, end) that may hold data.

        Uses SEEK_DATA/SEEK_HOLE, so holes of a sparse file cost nothing; where the
        filesystem cannot tell, the whole range is one extent.
        """
        offset = start
        while offset < end:
            found = self.data_at(offset)
            if found is None or found[0] >= end:
                return
            data, hole = found[0], min(found[1], end)
            yield data, hole - data
            offset = hole

    def data_at(self, offset: int) -> tuple[int, int] | None:
        """(data, hole): the first byte at or after ``offset`` that may hold data, and
        the hole that ends its run (which may lie past the end of a range asked about);
        None if nothing after ``offset`` holds data. Where the filesystem cannot tell,
        everything from ``offset`` on may hold data."""
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after offset
                return None
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return offset, UNKNOWN_END
            raise
        return data, os.lseek(self.fd, data, os.SEEK_HOLE)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def fsync_dir(path: str) -> None:
    """fsync the directory holding ``path`` so a create, rename or unlink is durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)) or "/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, opener=None, durable: bool = True) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the directory
    (``durable``; without it, a view that may be lost at a power cut: no syncs). The
    temp file is opened through ``opener`` (``FileIO.open`` by default): the engine's
    seam, where tests inject faults."""
    tmp = f"{path}.tmp.{os.getpid()}"
    io = (opener or FileIO.open)(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            io.pwrite(data, 0)
            if durable:
                io.fsync()
        finally:
            io.close()
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(path)


class GroupSync:
    """fdatasync shared by concurrent callers (group commit).

    ``sync()`` returns once an fdatasync that started after the call has completed, so
    everything the caller wrote before calling is durable. Callers arriving while one
    runs share the next one: N concurrent writers cost about two syncs, not N.
    A failed fdatasync may have dropped dirty pages, so its error sticks: every later
    ``sync()`` raises it too.
    """

    def __init__(self, io: FileIO) -> None:
        self.io = io
        self._cond = threading.Condition(threading.Lock())
        self._started = 0  # syncs started so far
        self._done = 0  # the newest sync completed (by start number)
        self._running = False
        self._error: OSError | None = None

    def sync(self) -> None:
        with self._cond:
            target = self._started + 1  # the next sync to start covers our writes
            while self._done < target and self._error is None:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._started += 1
                number = self._started
                self._cond.release()
                try:
                    self.io.fdatasync()
                except OSError as e:
                    self._error = e
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._done = number
                    self._cond.notify_all()
            if self._error is not None:
                raise self._error
