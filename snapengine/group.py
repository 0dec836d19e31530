"""One snapshot point for several origins (INTERFACE.md §9): the parts of a command.

``setup-snapshot`` takes triples (block device, COW file, minor), ``transition-to-snapshot``
pairs (COW file, minor). The control protocol carries a single part as plain values (as
before) and several as lists of equal length, one list per field (``columns``). Every
part is checked, then all are installed by one ``transitions.Group``: one snapshot
point, all or nothing. An error names its part (``part``) so the administrator knows
which triple failed; the exit status is that part's errno.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

from .errors import SnapError

T = TypeVar("T")


def columns(**fields: Any) -> list[dict[str, Any]]:
    """The parts of a command: ``fields`` are each a value (one part) or a list (one
    value per part; None: absent in every part); EINVAL if the lists differ in length."""
    lists = {k: v for k, v in fields.items() if isinstance(v, list)}
    if not lists:
        return [fields]
    lengths = {len(v) for v in lists.values()}
    if len(lengths) != 1 or 0 in lengths or any(
            v is not None for k, v in fields.items() if k not in lists):
        raise SnapError(errno.EINVAL, "a group command needs the same number of values "
                        f"in each of {', '.join(sorted(fields))}")
    n = lengths.pop()
    return [{k: (v[i] if k in lists else None) for k, v in fields.items()} for i in range(n)]


@contextmanager
def part(name: str, count: int) -> Iterator[None]:
    """Errors raised in the body name the part ``name``, when there are several."""
    try:
        yield
    except SnapError as e:
        if count == 1:
            raise
        raise SnapError(e.errno, f"{name}: {e.detail}") from None


def build(parts: list[dict[str, Any]], names: list[str],
          make: Callable[[dict[str, Any], set], T]) -> list[T]:
    """``make(part, seen)`` for every part, in order, its errors naming the part;
    ``seen`` is shared, for ``once``."""
    seen: set = set()
    out = []
    for p, name in zip(parts, names):
        with part(name, len(parts)):
            out.append(make(p, seen))
    return out


def once(kind: str, value: Any, seen: set) -> None:
    """The same minor, origin or COW file twice in one command: EINVAL (not EBUSY)."""
    if (kind, value) in seen:
        raise SnapError(errno.EINVAL, f"{kind} {value} is given twice in one command")
    seen.add((kind, value))
