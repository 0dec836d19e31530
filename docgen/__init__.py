"""docgen: the man pages and bash completion of snapengine's three programs, generated
from their argparse parsers so that they cannot drift from ``--help``.

``python -m docgen.manpages OUTDIR`` (manpages.py) and ``python -m docgen.completion
OUTDIR`` (completion.py) both walk the parsers that ``build_parsers`` returns.
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from typing import Callable, Iterator

Render = Callable[[str, argparse.ArgumentParser], str]  # (program, its parser) -> the text

from snapengine import cli, serve, updateimg
from snapengine.rundir import RUN_DIR_ENV, STATE_DIR_ENV

BUILDERS: dict[str, Callable[[], argparse.ArgumentParser]] = {  # program -> its parser
    "snapengine": serve.build_parser,
    "elioctl": cli.build_parser,
    "update-img": updateimg.build_parser,
}


@contextmanager
def _without(*names: str) -> Iterator[None]:
    """The environment without ``names`` for a while, then as it was."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def build_parsers() -> dict[str, argparse.ArgumentParser]:
    """Each program's parser, its defaults those of a clean environment: the builder's
    own $ELIO_RUN_DIR or $SNAPENGINE_STATE_DIR must not end up in a man page."""
    with _without(RUN_DIR_ENV, STATE_DIR_ENV):
        return {prog: build() for prog, build in BUILDERS.items()}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``parser``'s sub-commands, by name (none if it has no sub-parsers)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def write_files(outdir: str, file_name: Callable[[str], str], render: Render) -> list[str]:
    """One file per program in ``outdir`` (made if missing), named ``file_name(prog)``
    and holding ``render(prog, parser)``; their paths."""
    os.makedirs(outdir, exist_ok=True)
    paths = []
    for prog, parser in build_parsers().items():
        path = os.path.join(outdir, file_name(prog))
        with open(path, "w", encoding="utf-8") as f:
            f.write(render(prog, parser))
        paths.append(path)
    return paths


def command_line(module: str, what: str, write: Callable[[str], list[str]],
                 argv: list[str] | None) -> int:
    """``python -m docgen.MODULE OUTDIR``: ``write(OUTDIR)``."""
    parser = argparse.ArgumentParser(prog=f"python -m docgen.{module}",
                                     description=f"write {what} into OUTDIR")
    parser.add_argument("outdir", metavar="OUTDIR")
    write(parser.parse_args(argv).outdir)
    return 0
