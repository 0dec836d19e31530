"""What the arguments of the control operations mean, and their checks.

Each check raises SnapError with the errno of INTERFACE.md's table and a message naming
the bad value; none of them changes anything.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Iterable, Mapping

from .errors import SnapError
from .origin import Origin
from .stacking import carrying_origin
from .units import MB, MiB

MAX_MINORS_LIMIT = 255  # --max-minors N gives minors 0..N-1
EXPORT_PREFIX = "elastio-snap"  # snapshot export of minor N: "elastio-snapN"; no origin name
MAX_MB = 1 << 40  # largest -c or -f: a byte count that fits every header field
DEFAULT_MAX_MINORS = 24  # snapengine serve --max-minors
DEFAULT_CACHE_MB = 300  # -c when a command does not give it (--cache-default)
DEFAULT_FALLOCATE_PERCENT = 10  # -f when a command does not give it: % of the origin


def check_settings(max_minors: int, cache_default_mb: int, fallocate_percent: float) -> None:
    """The daemon-wide settings (snapengine serve's options), or EINVAL naming the bad one."""
    if not 1 <= max_minors <= MAX_MINORS_LIMIT:
        raise SnapError(errno.EINVAL,
                        f"--max-minors {max_minors} is not in 1..{MAX_MINORS_LIMIT}")
    if cache_default_mb <= 0:
        raise SnapError(errno.EINVAL, f"--cache-default {cache_default_mb} MB is not positive")
    if not 0 < fallocate_percent <= 100:
        raise SnapError(errno.EINVAL,
                        f"--fallocate-percent {fallocate_percent} is not in (0, 100]")


def minor_number(minor: Any, max_minors: int) -> int:
    """A minor: an int or a string of ASCII digits, in 0..max_minors-1."""
    if isinstance(minor, str) and minor.isdecimal() and minor.isascii():
        minor = int(minor)
    if isinstance(minor, bool) or not isinstance(minor, int):
        raise SnapError(errno.EINVAL, f"minor {minor!r} is not a number")
    if not 0 <= minor < max_minors:
        raise SnapError(errno.EINVAL, f"minor {minor} is out of range 0..{max_minors - 1}")
    return minor


def megabytes(value: Any, option: str) -> int:
    """-c or -f: whole MB, 0 (or absent) meaning the default."""
    if value is None:
        return 0
    if isinstance(value, str) and value.lstrip("-").isdecimal():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SnapError(errno.EINVAL, f"{option} {value!r} is not a whole number of MB")
    if value < 0:
        raise SnapError(errno.EINVAL, f"{option} {value} MB is below 1 MB")
    if value > MAX_MB:
        raise SnapError(errno.EINVAL, f"{option} {value} MB is too large (at most {MAX_MB})")
    return value


def expand_megabytes(value: Any) -> int:
    """expand-cow-file's <MB>: a whole number, at least 1."""
    mb = megabytes(value, "expand-cow-file <MB>")
    if not mb:
        raise SnapError(errno.EINVAL, "expand-cow-file <MB> must be at least 1 MB")
    return mb


def cache_bytes(cache_mb: Any, default: int, mb_bytes: int = MB) -> int:
    """-c in bytes; 0 or absent: ``default``. More than the machine's memory is refused:
    a user who typed bytes is told the unit."""
    mb = megabytes(cache_mb, "-c")
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if mb * mb_bytes > memory:
        raise SnapError(errno.EINVAL, f"-c {mb} MB is more than this machine's memory "
                        f"({memory // mb_bytes} MB): -c is in MB, not bytes")
    return mb * mb_bytes if mb else default


def fallocate_bytes(fallocate_mb: Any, origin: Origin, percent: float,
                    mb_bytes: int = MB) -> int:
    """-f in bytes; 0 or absent: ``percent`` of the origin, at least 1 MiB. More than the
    origin (in whole MB) is refused: no snapshot can save more."""
    mb = megabytes(fallocate_mb, "-f")
    most = -(-origin.size // mb_bytes)
    if mb > most:
        raise SnapError(errno.EINVAL, f"-f {mb} MB is more than the origin {origin.path} "
                        f"({most} MB): -f is in MB, not bytes")
    if mb:
        return mb * mb_bytes
    return max(MiB, int(origin.size * percent / 100))


def find_origin(origins: Iterable[Origin], spec: Any, path: str | None = None) -> Origin:
    """The origin named ``spec`` (a NAME or PATH as served), or the one at ``path``
    (``spec`` made absolute by the client, whose cwd is not ours)."""
    origins = list(origins)
    if not isinstance(spec, str) or not spec:
        raise SnapError(errno.EINVAL, f"block device {spec!r} is not a path or export name")
    for origin in origins:
        if spec in (origin.name, origin.path):
            return origin
    path = path or os.path.abspath(spec)
    if os.path.isdir(path):
        raise SnapError(errno.ENOTBLK, f"{spec} is a directory, not a block device")
    real = os.path.realpath(path)
    for origin in origins:
        if origin.real_path == real:
            return origin
    names = ", ".join(o.name for o in origins) or "none"
    raise SnapError(errno.ENODEV, f"{spec} is not served by this daemon (origins: {names})")


def untracked_origin(origins: Iterable[Origin], minors: Mapping[int, Any], n: int,
                     block_device: Any, path: str | None) -> Origin:
    """For a new minor ``n``: the origin it would track; EBUSY if either is taken."""
    if n in minors:
        raise SnapError(errno.EBUSY, f"minor {n} is already in use ({minors[n].cow_path})")
    origin = find_origin(origins, block_device, path)
    if origin.minor is not None:
        raise SnapError(errno.EBUSY, f"origin {origin.path} is already tracked "
                        f"by minor {origin.minor}")
    return origin


def placed(path: str, origins: list[Origin], nbd_socket: str) -> str:
    """``path``, unless its file system is carried by one of our origins (EINVAL):
    every COW write would go through this daemon's own disk and wait for itself."""
    found = carrying_origin(os.path.dirname(path), [o.path for o in origins],
                            [o.name for o in origins], nbd_socket)
    if found:
        raise SnapError(errno.EINVAL, f"COW file {path} is on a file system carried by "
                        f"{found}: its writes would go through this daemon's own disk; "
                        "put COW files on storage that no origin carries")
    return path


def file_identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at ``path`` (links followed), None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def backing_origin(origins: Iterable[Origin], path: str) -> Origin | None:
    """The origin whose backing file ``path`` is: by name, or by inode (a link)."""
    real, identity = os.path.realpath(path), file_identity(path)
    for origin in origins:
        if origin.real_path == real or origin.identity == identity:
            return origin
    return None


def refuse_backing_file(origins: Iterable[Origin], path: str) -> None:
    """EINVAL if the COW file ``path`` is an origin's backing file."""
    origin = backing_origin(origins, path)
    if origin is not None:
        raise SnapError(errno.EINVAL, f"COW file {path} is the backing file of "
                        f"origin {origin.name}")


def check_origin_names(specs: list[tuple[str, str]]) -> None:
    """Origins given to the daemon: names never take the snapshot prefix, no name twice,
    no file twice (directly or through a link); EINVAL naming the first offender."""
    names: set[str] = set()
    files: dict[tuple[int, int], str] = {}
    for path, name in specs:
        if name.startswith(EXPORT_PREFIX):
            raise SnapError(errno.EINVAL, f"origin name {name!r} begins with {EXPORT_PREFIX!r}, "
                            "which names snapshot exports; choose another (--origin PATH=NAME)")
        if name in names:
            raise SnapError(errno.EINVAL, f"two origins named {name!r}")
        names.add(name)
        identity = file_identity(path)
        if identity is not None and identity in files:
            raise SnapError(errno.EINVAL, f"origin {path} is the same file as origin "
                            f"{files[identity]}; a file is served once")
        if identity is not None:
            files[identity] = path


def cow_path(cow_file: Any) -> str:
    """A COW file argument as an absolute path; EINVAL or EISDIR if it cannot be one."""
    if not isinstance(cow_file, str) or not cow_file or "\0" in cow_file:
        raise SnapError(errno.EINVAL, f"COW file {cow_file!r} is not a path")
    path = os.path.abspath(cow_file)
    if os.path.isdir(path) or cow_file.endswith("/"):
        raise SnapError(errno.EISDIR, f"COW file {cow_file} is a directory")
    return path


def new_cow_path(origins: Iterable[Origin], cow_file: Any) -> str:
    """Where a new COW file may be created: never over an existing file (EEXIST), never
    over an origin (EINVAL, checked first), in an existing directory (ENOENT)."""
    path = cow_path(cow_file)
    parent = os.path.dirname(path)
    if not os.path.exists(parent):
        raise SnapError(errno.ENOENT, f"directory {parent} of COW file {path} does not exist")
    if not os.path.isdir(parent):
        raise SnapError(errno.ENOTDIR, f"{parent} (parent of COW file {path}) is not a directory")
    refuse_backing_file(origins, path)
    if os.path.lexists(path):
        raise SnapError(errno.EEXIST, f"{path} already exists; a COW file is never overwritten")
    return path


def reload_cow_path(origins: Iterable[Origin], others: Iterable[tuple[int, str, Any]],
                    cow_file: Any) -> str:
    """A COW file for reload-*: never an origin's backing file (EINVAL), never a file
    another minor holds, by path or by inode (EBUSY). ``others``: (minor, COW path,
    identity) of the minors set up."""
    path = cow_path(cow_file)
    refuse_backing_file(origins, path)
    identity = file_identity(path)
    for number, other, other_identity in others:
        if other == path or (identity is not None and identity == other_identity):
            raise SnapError(errno.EBUSY, f"COW file {path} is held by minor {number} ({other})")
    return path
