"""``snapengine serve --config FILE``: serve's options from a TOML file.

Every long option of ``serve`` is a key, its name without the dashes and with ``_`` for
``-`` (``--run-dir`` is ``run_dir``, ``--durable`` the boolean ``durable``), except
``--origin``, which becomes an array of tables ``[[origins]]`` with ``path`` and
``name``, and ``--config`` itself. The keys are read off the parser, so the file can
express exactly what the command line can. Options given on the command line win: the
file's values become the parser's defaults, then the command line is parsed again.

A bad file is refused before anything starts: EINVAL, naming the file, the line and the
key (tomllib reports the line of a syntax error; for a value of the wrong type or an
unknown key, the line is found in the text).
"""

from __future__ import annotations

import argparse
import errno
import re
import tomllib
from dataclasses import dataclass
from typing import Any

from .errors import SnapError

ORIGINS = "origins"  # [[origins]] path = "...", name = "..."
ORIGIN_KEYS = ("path", "name")
NOT_KEYS = {"help", "config", "origin"}
_KEY_LINE = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\'[^\']*\'|[A-Za-z0-9_-]+)\s*=')
_TABLE_LINE = re.compile(r"\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]")
_TOML_LINE = re.compile(r"at line (\d+)")


def option_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The config keys of ``parser`` (serve's), each with the option it stands for."""
    return {a.dest: a for a in parser._actions
            if a.option_strings and a.dest not in NOT_KEYS}


def key_type(action: argparse.Action) -> type:
    """The TOML type a key takes: bool for a flag, else the option's type (str by default)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return bool
    return action.type if action.type in (int, float) else str


TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


class ConfigError(SnapError):
    def __init__(self, path: str, line: int | None, key: str, message: str) -> None:
        where = f"{path}, line {line}" if line else path
        super().__init__(errno.EINVAL, f"config {where}: {key}: {message}")


def key_lines(text: str) -> dict[str, int]:
    """Where each key is set: ``"max_minors"`` or ``"origins[1].path"`` (and a table's
    own name) → its line number, 1-based. Enough of TOML for pointing at a line."""
    lines: dict[str, int] = {}
    table, counts = "", {}
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        m = _TABLE_LINE.match(line)
        if m:
            name = m.group(2)
            if m.group(1) == "[[":
                counts[name] = counts.get(name, -1) + 1
                name = f"{name}[{counts[name]}]"
            table = name
            lines.setdefault(table, number)
            continue
        m = _KEY_LINE.match(line)
        if m:
            key = m.group(1).strip("\"'")
            lines.setdefault(f"{table}.{key}" if table else key, number)
    return lines


def _syntax_error(path: str, text: str, e: tomllib.TOMLDecodeError) -> ConfigError:
    m = _TOML_LINE.search(str(e))
    line = int(m.group(1)) if m else None
    key = "?"
    if line is not None and line <= len(text.splitlines()):
        k = _KEY_LINE.match(text.splitlines()[line - 1])
        key = k.group(1).strip("\"'") if k else "?"
    return ConfigError(path, line, key, f"not valid TOML: {e}")


def read(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The parsed file and where its keys are."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise SnapError(e.errno or errno.EIO, f"config {path}: {e.strerror}")
    text = raw.decode("utf-8", errors="replace")
    try:
        return tomllib.loads(text), key_lines(text)
    except tomllib.TOMLDecodeError as e:
        raise _syntax_error(path, text, e)


def check_type(path: str, line: int | None, key: str, value: Any, want: type) -> Any:
    ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(path, line, key, f"must be {TYPE_NAMES[want]}, not {value!r}")
    return value


def _origins(path: str, lines: dict[str, int], value: Any) -> list[tuple[str, str]]:
    """``[[origins]]`` tables → (path, name) pairs; the name defaults to the path."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(path, lines.get(ORIGINS), ORIGINS,
                          "must be an array of tables: [[origins]] path = ..., name = ...")
    out = []
    for i, table in enumerate(value):
        where = f"{ORIGINS}[{i}]"
        for key in table:
            if key not in ORIGIN_KEYS:
                raise ConfigError(path, lines.get(f"{where}.{key}"), f"{where}.{key}",
                                  f"unknown key (an origin has {' and '.join(ORIGIN_KEYS)})")
        if "path" not in table:
            raise ConfigError(path, lines.get(where), f"{where}.path", "missing")
        fields = [check_type(path, lines.get(f"{where}.{k}"), f"{where}.{k}", table.get(k, ""), str)
                  for k in ORIGIN_KEYS]
        out.append((fields[0], fields[1] or fields[0]))
    return out


@dataclass
class Config:
    """A config file's settings (dest → value, ``config_origins`` the origins) and the
    line of each key."""

    path: str
    values: dict[str, Any]
    lines: dict[str, int]

    def blame(self, e: SnapError, args: argparse.Namespace,
              keys: dict[str, argparse.Action]) -> SnapError:
        """``e`` (a check of the options, naming ``--max-minors``, say) as an error of
        this file's key and line when the value came from the file; else ``e``."""
        for key, value in self.values.items():
            action = keys.get(key)
            if action is None or getattr(args, key, None) != value:
                continue  # not an option, or the command line's value
            if any(opt in str(e) for opt in action.option_strings):
                return ConfigError(self.path, self.lines.get(key), key, e.detail)
        return e


def load(path: str, parser: argparse.ArgumentParser) -> Config:
    """Read and type-check ``path`` against ``parser``'s (serve's) options."""
    data, lines = read(path)
    keys = option_keys(parser)
    out: dict[str, Any] = {}
    for key, value in data.items():
        line = lines.get(key)
        if key == ORIGINS:
            out["config_origins"] = _origins(path, lines, value)
        elif key in keys:
            out[key] = check_type(path, line, key, value, key_type(keys[key]))
        else:
            known = ", ".join(sorted([*keys, ORIGINS]))
            raise ConfigError(path, line, key, f"unknown key (known: {known})")
    return Config(path, out, lines)
