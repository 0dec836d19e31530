"""Bash completion (docgen/completion.py), in real bash with bash-completion: each
generated file sourced directly or by bash-completion's loader, its registered function
called on a command line, COMPREPLY compared with what the parsers hold."""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import pytest

from docgen import build_parsers, subcommands
from docgen.completion import write_scripts
from snapengine.rundir import INFO_FILE, RUN_DIR_ENV
from tests.harness import IN_CI, require

BASH_COMPLETION = "/usr/share/bash-completion/bash_completion"
PROGRAMS = ["snapengine", "elioctl", "update-img"]
MINORS = ["3", "7"]
# Load the completion of "$1" ($LOAD: by sourcing its file, or through bash-completion's
# loader), find its function with complete -p, and complete the command line "$@".
COMPLETE = f"""
source {BASH_COMPLETION}
if [[ $LOAD == source ]]; then source "$BASH_COMPLETION_USER_DIR/completions/$1"
else __load_completion "$1"; fi
spec=$(complete -p "$1") || exit 3
func=${{spec##*-F }}; func=${{func%% *}}
COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${{#COMP_LINE}}
"$func" "$1" "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD - 1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> str:
    """A bash-completion user directory holding the generated files."""
    path = tmp_path_factory.mktemp("bash-completion")
    paths = write_scripts(str(path / "completions"))
    assert sorted(os.path.basename(p) for p in paths) == sorted(PROGRAMS)
    return str(path)


@pytest.fixture
def run_dir(tmp_path) -> str:
    """A daemon's run directory whose info file lists minors 3 and 7 (compact JSON; a
    COW file's name quoting a minor 9 is not one)."""
    path = tmp_path / "run"
    path.mkdir()
    devices = [{"minor": 3, "cow_file": '/var/backup/"minor": 9', "state": 3},
               {"minor": 7, "cow_file": "/var/backup/b", "state": 2}]
    (path / INFO_FILE).write_text(json.dumps({"version": "0.1.0", "devices": devices}))
    return str(path)


@pytest.fixture
def files(tmp_path) -> str:
    """A directory holding the file cow1 and the directory sub."""
    path = tmp_path / "files"
    (path / "sub").mkdir(parents=True)
    (path / "cow1").write_text("")
    return str(path)


def complete(user_dir: str, *words: str, load: str = "source", run_dir: str = "/nonexistent",
             path: str | None = None) -> list[str]:
    """COMPREPLY for the command line ``words``, the last word being completed."""
    require("bash")
    if not os.path.exists(BASH_COMPLETION):
        (pytest.fail if IN_CI else pytest.skip)(f"missing: {BASH_COMPLETION}")
    env = {k: v for k, v in os.environ.items() if k != RUN_DIR_ENV}
    env.update(BASH_COMPLETION_USER_DIR=user_dir, LOAD=load, **{RUN_DIR_ENV: run_dir})
    if path is not None:
        env["PATH"] = path
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", COMPLETE, "bash", *words],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return [line for line in result.stdout.split("\n") if line]


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if a.help != argparse.SUPPRESS}


def parser_of(*words: str) -> argparse.ArgumentParser:
    parser = build_parsers()[words[0]]
    for word in words[1:]:
        parser = subcommands(parser)[word]
    return parser


@pytest.mark.parametrize("load", ["source", "loader"])
def test_subcommands(user_dir, load):
    assert complete(user_dir, "elioctl", "tr", load=load) == [
        "transition-to-incremental", "transition-to-snapshot"]
    assert set(complete(user_dir, "elioctl", "", load=load)) == set(
        subcommands(parser_of("elioctl")))
    assert set(complete(user_dir, "snapengine", "", load=load)) == set(
        subcommands(parser_of("snapengine")))


@pytest.mark.parametrize("load", ["source", "loader"])
@pytest.mark.parametrize("indent", [None, 4], ids=["compact", "indented"])
@pytest.mark.parametrize("where", ["env", "option", "option="])
def test_minors_from_the_info_file(user_dir, run_dir, tmp_path, load, indent, where):
    """From $ELIO_RUN_DIR, or from --run-dir DIR (also split at an =) over the run
    directory the environment names; read with grep and sed, never with python."""
    info = os.path.join(run_dir, INFO_FILE)
    with open(info) as f:
        doc = json.load(f)
    with open(info, "w") as f:
        json.dump(doc, f, indent=indent)  # the daemon writes it indented
    other = tmp_path / "other"  # what the environment names when --run-dir is given
    other.mkdir()
    (other / INFO_FILE).write_text(json.dumps({"version": "0.1.0", "devices": [{"minor": 1}]}))
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name in ("python", "python3"):
        (fake_bin / name).write_text(f"#!/bin/sh\ntouch {tmp_path}/python-ran\nexit 1\n")
        (fake_bin / name).chmod(0o755)
    before = {"env": [], "option": ["--run-dir", run_dir],
              "option=": ["--run-dir", "=", run_dir]}[where]
    words = ["elioctl", *before, "transition-to-incremental", ""]
    assert complete(user_dir, *words, load=load, run_dir=run_dir if where == "env" else
                    str(other), path=f"{fake_bin}:{os.environ['PATH']}") == MINORS
    assert not (tmp_path / "python-ran").exists()


def test_minors_of_every_command_acting_on_one(user_dir, run_dir):
    for words in (["destroy", ""], ["info", ""], ["watch", "--json", ""],
                  ["transition-to-snapshot", "/var/backup/cow2", ""], ["destroy", "7"]):
        expected = [m for m in MINORS if m.startswith(words[-1])]
        assert complete(user_dir, "elioctl", *words, run_dir=run_dir) == expected, words


def test_no_minors_without_an_info_file(user_dir, tmp_path):
    assert complete(user_dir, "elioctl", "destroy", "", run_dir=str(tmp_path)) == []


def test_setup_snapshot_options(user_dir):
    offered = complete(user_dir, "elioctl", "setup-snapshot", "-")
    assert {"-c", "-f"} <= set(offered)
    assert set(offered) == options(parser_of("elioctl", "setup-snapshot"))


@pytest.mark.parametrize("words", [
    pytest.param(["elioctl", "setup-snapshot", "disk0"], id="setup-snapshot-cow-file"),
    pytest.param(["elioctl", "setup-snapshot"], id="block-device"),
    pytest.param(["elioctl", "transition-to-snapshot"], id="transition-cow-file"),
    pytest.param(["elioctl", "changed-blocks"], id="changed-blocks"),
    pytest.param(["update-img", "4"], id="update-img-cow-file"),
    pytest.param(["update-img", "--full", "4"], id="update-img-image"),
    pytest.param(["snapengine", "serve", "--config"], id="config"),
    pytest.param(["snapengine", "serve", "--origin"], id="origin"),
])
def test_paths(user_dir, files, words):
    assert complete(user_dir, *words, f"{files}/") == [f"{files}/cow1", f"{files}/sub"]


@pytest.mark.parametrize("words", [
    pytest.param(["elioctl", "--run-dir"], id="elioctl-run-dir"),
    pytest.param(["update-img", "--run-dir"], id="update-img-run-dir"),
    pytest.param(["snapengine", "serve", "--run-dir"], id="serve-run-dir"),
    pytest.param(["snapengine", "serve", "--state-dir"], id="state-dir"),
    pytest.param(["elioctl", "setup-snapshot", "--freeze"], id="freeze"),
])
def test_directories(user_dir, files, words):
    assert complete(user_dir, *words, f"{files}/") == [f"{files}/sub"]


def test_update_img(user_dir, run_dir):
    offered = complete(user_dir, "update-img", "--")
    assert set(offered) == {o for o in options(parser_of("update-img")) if o.startswith("--")}
    assert complete(user_dir, "update-img", "--run-dir", run_dir, "") == MINORS
    assert complete(user_dir, "update-img", "", run_dir=run_dir) == MINORS
    assert complete(user_dir, "update-img", "--minor", "", run_dir=run_dir) == MINORS


def test_serve_options(user_dir):
    offered = complete(user_dir, "snapengine", "serve", "--")
    assert "--run-dir" in offered
    assert set(offered) == {o for o in options(parser_of("snapengine", "serve"))
                            if o.startswith("--")}


def test_files_define_no_function_twice(user_dir):
    """Each file's functions are its own: sourced into one shell, none redefines another's."""
    require("bash")
    defined = {}
    for prog in PROGRAMS:
        script = f'source "{user_dir}/completions/{prog}"; declare -F'
        out = subprocess.run(["bash", "--norc", "--noprofile", "-c", script],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        defined[prog] = {line.split()[-1] for line in out.splitlines()}
    for prog in PROGRAMS:
        others = set().union(*(defined[p] for p in PROGRAMS if p != prog))
        assert defined[prog] and not defined[prog] & others, prog
