"""The man pages (docgen/manpages.py): each renders cleanly with man and groff, and says
everything the parsers know: every sub-command, option and positional, in its own section."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import textwrap
import tomllib

import pytest

from docgen import build_parsers, subcommands
from docgen.manpages import Page, write_pages
from snapengine.config import load as load_config
from snapengine.rundir import (CTL_SOCKET, DAEMON_LOG, DEFAULT_RUN_DIR, DEFAULT_STATE_DIR,
                               INFO_FILE, NBD_SOCKET, REGISTRY_FILE)
from tests.harness import require

PROGRAMS = ["snapengine", "elioctl", "update-img"]
HELP = {"-h", "--help"}
STATE_NAMES = ["0 dormant incremental", "1 dormant snapshot", "2 active incremental",
               "3 active snapshot", "4 unverified incremental", "5 unverified snapshot"]
NOT_CONFIG_KEYS = {"--help", "--config", "--version"}
RAW = argparse.RawDescriptionHelpFormatter
TOML_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool}


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, str]:
    outdir = tmp_path_factory.mktemp("man")
    paths = write_pages(str(outdir))
    assert sorted(paths) == sorted(os.path.join(outdir, f"{p}.8") for p in PROGRAMS)
    return {prog: os.path.join(outdir, f"{prog}.8") for prog in PROGRAMS}


def man(path: str, width: int = 100) -> subprocess.CompletedProcess:
    require("man")
    env = dict(os.environ, MANWIDTH=str(width), LC_ALL="C.UTF-8")
    return subprocess.run(["man", "-l", path], env=env, capture_output=True, text=True,
                          timeout=60)


def rendered(path: str) -> str:
    result = man(path)
    assert result.returncode == 0, result.stderr
    return re.sub(".\b", "", result.stdout)  # no overstrike, whatever the pager settings


def sections(text: str) -> dict[str, str]:
    """The rendered page by section (a heading at column 0) and sub-section (at 3)."""
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        heading = re.fullmatch(r"(?:   )?(\S.*?)\s*", line)
        if heading and not re.search(r"\(8\)$", line):  # not the header or footer
            current = found.setdefault(heading.group(1), [])
        current.append(line)
    return {name: "\n".join(lines) for name, lines in found.items()}


def plain(roff: str) -> str:
    """A line of roff as the text it shows."""
    text = re.sub(r"\\f[BIRP]|\\[,/&]", "", roff)
    return text.replace("\\-", "-").replace("\\ ", " ").replace("\\e", "\\")


def tags(source: str) -> dict[str, set[str]]:
    """The tags of the tagged paragraphs (.TP) of a page, by section and sub-section."""
    found: dict[str, set[str]] = {}
    current: set[str] = set()
    lines = source.splitlines()
    for line, following in zip(lines, lines[1:]):
        if line.startswith((".SH ", ".SS ")):
            current = found.setdefault(plain(line.split(" ", 1)[1].strip('"')), set())
        elif line == ".TP":
            current.add(plain(following))
    return found


def has_word(text: str, word: str) -> bool:
    """``word`` as itself: -c is not the -c of --cache-default."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def options(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions for o in a.option_strings if o not in HELP]


def positionals(parser: argparse.ArgumentParser) -> list[str]:
    return [str(a.metavar or a.dest) for a in parser._get_positional_actions()
            if not isinstance(a, argparse._SubParsersAction)]


@pytest.mark.parametrize("width", [80, 100])
@pytest.mark.parametrize("prog", PROGRAMS)
def test_renders_without_warnings(pages, prog, width):
    result = man(pages[prog], width)
    assert result.returncode == 0 and result.stderr == ""
    require("groff")
    groff = subprocess.run(["groff", "-man", "-ww", "-z", pages[prog]], capture_output=True,
                           text=True, timeout=60)
    assert groff.returncode == 0 and groff.stderr == ""


@pytest.mark.parametrize("prog", PROGRAMS)
def test_every_option_and_subcommand_in_its_section(pages, prog):
    """Each is a tag of its own section (the program's OPTIONS, or the sub-command's),
    and shows in the rendered text there."""
    parser = build_parsers()[prog]
    with open(pages[prog], encoding="utf-8") as f:
        found = tags(f.read())
    text = sections(rendered(pages[prog]))
    expected = {"OPTIONS": parser, **{f"{prog} {name}": sub
                                      for name, sub in subcommands(parser).items()}}
    missing = [f"COMMANDS {name}" for name in subcommands(parser)
               if f"{prog} {name}" not in found["COMMANDS"]]
    for heading, sub in expected.items():
        tagged = found.get(heading, set())
        leading = {piece.split(" ", 1)[0] for tag in tagged for piece in tag.split(", ")}
        missing += [f"{heading} {o}" for o in options(sub)
                    if o not in leading or not has_word(text.get(heading, ""), o)]
        missing += [f"{heading} {p}" for p in positionals(sub)
                    if p not in tagged or p not in text.get(heading, "")]
    assert missing == []


@pytest.mark.parametrize("prog", PROGRAMS)
def test_hand_written_sections(pages, prog):
    found = sections(rendered(pages[prog]))
    assert {"NAME", "SYNOPSIS", "DESCRIPTION", "EXIT STATUS", "FILES", "EXAMPLES",
            "SEE ALSO"} <= set(found)
    assert "22 (EINVAL)" in found["EXIT STATUS"] and has_word(found["EXIT STATUS"], "0")
    assert found["EXAMPLES"].count(prog) >= 2
    for path in [f"{DEFAULT_RUN_DIR}/{name}" for name in (CTL_SOCKET, NBD_SOCKET, INFO_FILE)] \
            + [f"{DEFAULT_STATE_DIR}/{name}" for name in (REGISTRY_FILE, DAEMON_LOG)]:
        assert path in found["FILES"]
    others = [p for p in PROGRAMS if p != prog]
    assert all(f"{p}(8)" in found["SEE ALSO"] for p in others)


def test_elioctl_states(pages):
    states = sections(rendered(pages["elioctl"]))["STATES"]
    assert [name for name in STATE_NAMES if name in states] == STATE_NAMES


def test_snapengine_configuration_file(pages, tmp_path):
    """Every key of serve with its type, and an example that serve's own loader reads as
    the defaults."""
    serve = subcommands(build_parsers()["snapengine"])["serve"]
    config = sections(rendered(pages["snapengine"]))["CONFIGURATION FILE"]
    keys = [o.removeprefix("--").replace("-", "_") for a in serve._actions
            for o in a.option_strings if o.startswith("--") and o not in NOT_CONFIG_KEYS
            and o != "--origin"]
    assert keys, "serve has no options"
    for key in keys:
        assert re.search(rf"^ +{key} \((string|integer|float|boolean)\)$", config, re.M), key
    assert "[[origins]] (array of tables: path, name)" in config
    assert not re.search(r"^ +config \(", config, re.M)
    example = textwrap.dedent(config.split("and one origin:\n", 1)[1])
    values = tomllib.loads(example)
    assert values.pop("origins") == [{"path": "/srv/disk0.img", "name": "disk0"}]
    assert set(values) <= set(keys)
    for key, value in values.items():
        kind = re.search(rf"^ +{key} \((\w+)\)$", config, re.M).group(1)
        assert type(value) is TOML_TYPES[kind], key
    (tmp_path / "snapengine.toml").write_text(example)
    loaded = load_config(str(tmp_path / "snapengine.toml"), serve).values
    assert loaded.pop("config_origins") == [("/srv/disk0.img", "disk0")]
    assert loaded == {key: serve.get_default(key) for key in values}


def test_help_text_escaped(pages):
    """Text from the parsers never reaches roff raw: no line of it is a request, and every
    hyphen is a minus."""
    for prog in PROGRAMS:
        with open(pages[prog], encoding="utf-8") as f:
            source = f.read()
        requests = {line.split()[0] for line in source.splitlines() if line.startswith((".", "'"))}
        assert requests <= {".TH", ".nh", ".ad", ".SH", ".SS", ".B", ".BR", ".br", ".PP",
                            ".TP", ".nf", ".fi", ".RS", ".RE", ".sp"}, prog
        assert "-" not in re.sub(r"\\[-e]", "", source), prog


def test_parser_text_is_escaped(tmp_path):
    """Dots, apostrophes, backslashes and hyphens in a parser's text show as themselves."""
    parser = argparse.ArgumentParser(prog="demo", formatter_class=RAW, description=(
        "Its first line,\n.TH and a dot at the start of the next\n  'an indented quote'\n"))
    parser.add_argument("--dry-run", action="store_true", help=".SH is not a heading")
    parser.add_argument("path", metavar="<a\\b>", help="'quoted' and C:\\fB\\dir")
    path = tmp_path / "demo.8"
    path.write_text(str(Page(parser, "a demo", [])))
    result = man(str(path))
    assert result.returncode == 0 and result.stderr == ""
    text = " ".join(re.sub(".\b", "", result.stdout).split())
    for shown in (".TH and a dot", "'an indented quote'", "--dry-run", ".SH is not a heading",
                  "<a\\b>", "'quoted' and C:\\fB\\dir"):
        assert shown in text
