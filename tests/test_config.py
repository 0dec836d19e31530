"""``snapengine serve --config FILE``: the keys, the command line winning, the errors."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from snapengine import config
from snapengine.errors import SnapError
from snapengine.serve import build_parser, parse_serve, subcommand

from tests.harness.daemon import Daemon
from tests.harness.files import sparse_file
from tests.harness.process import BIN

SERVE_KEYS = {"run_dir", "state_dir", "tcp", "max_minors", "cache_default", "fallocate_percent",
              "durable", "socket_group", "max_connections", "threads", "metrics", "daemon",
              "verbose"}


def write(tmp_path, text: str) -> str:
    path = os.path.join(tmp_path, "se.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def test_every_serve_option_is_a_key():
    keys = set(config.option_keys(subcommand(build_parser(), "serve")))
    assert keys == SERVE_KEYS


def test_file_values_and_command_line_wins(tmp_path):
    path = write(tmp_path, """\
run_dir = "/tmp/r"
max_minors = 8
fallocate_percent = 5
durable = true

[[origins]]
path = "/srv/a.img"
name = "a"

[[origins]]
path = "/srv/b.img"
""")
    args = parse_serve(["serve", "--config", path, "--max-minors", "12"])
    assert args.run_dir == "/tmp/r" and args.durable is True
    assert args.max_minors == 12  # the command line wins
    assert args.fallocate_percent == 5.0 and isinstance(args.fallocate_percent, float)
    assert args.config_origins == [("/srv/a.img", "a"), ("/srv/b.img", "/srv/b.img")]
    assert parse_serve(["serve", "--config", path, "--run-dir", "/x"]).run_dir == "/x"


@pytest.mark.parametrize("text, line, key, what", [
    ('run_dir = "/r"\nmax_minor = 8\n', 2, "max_minor", "unknown key"),
    ('run_dir = "/r"\n\n# a comment\nmax_minors = "8"\n', 4, "max_minors", "must be an integer"),
    ('durable = 1\n', 1, "durable", "must be a boolean"),
    ('run_dir = 7\n', 1, "run_dir", "must be a string"),
    ('run_dir = "/r"\nmax_minors = 8 8\n', 2, "max_minors", "not valid TOML"),
    ('[[origins]]\npath = "/a"\n\n[[origins]]\nnmae = "b"\n', 5, "origins[1].nmae",
     "unknown key"),
    ('[[origins]]\nname = "b"\n', 1, "origins[0].path", "missing"),
    ('origins = "/a"\n', 1, "origins", "array of tables"),
    ('[server]\nrun_dir = "/r"\n', 1, "server", "unknown key"),
])
def test_bad_file_names_key_and_line(tmp_path, text, line, key, what):
    path = write(tmp_path, text)
    with pytest.raises(SnapError) as e:
        config.load(path, subcommand(build_parser(), "serve"))
    assert e.value.errno == errno.EINVAL
    assert f"config {path}, line {line}: {key}: " in str(e.value), e.value
    assert what in str(e.value), e.value


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "snapengine"), "serve", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("text, needle", [
    ('max_minors = 999\n', "line 1: max_minors: --max-minors 999 is not in 1..255"),
    ('\n[[origins]]\npath = "/nonexistent/x.img"\n',
     "line 3: origins[0].path: origin /nonexistent/x.img"),
    ('max_connections = 0\n', "line 1: max_connections: --max-connections 0 is below 1"),
    ('threads = 0\n', "line 1: threads: --threads 0 is not in 1..256"),
])
def test_bad_value_exits_einval_naming_key_and_line(tmp_path, text, needle):
    """Checked by serve's own checks, and blamed on the file's key and line; nothing
    starts (the run dir is not even made)."""
    run_dir = os.path.join(tmp_path, "run")
    path = write(tmp_path, f'run_dir = "{run_dir}"\n' + text)
    r = serve("--config", path)
    assert r.returncode == errno.EINVAL, r
    line_no, rest = needle.split(": ", 1)
    shifted = f"line {int(line_no.split()[1]) + 1}: {rest}"  # run_dir is line 1
    assert f"snapengine: serve: {os.strerror(errno.EINVAL)}: config {path}, {shifted}" \
        in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not os.path.exists(run_dir)


def test_command_line_error_is_not_blamed_on_the_file(tmp_path):
    path = write(tmp_path, f'run_dir = "{tmp_path}/run"\nmax_minors = 8\n')
    r = serve("--config", path, "--max-minors", "999")
    assert r.returncode == errno.EINVAL
    assert "config" not in r.stderr and "--max-minors 999" in r.stderr, r.stderr


def test_missing_file(tmp_path):
    r = serve("--config", os.path.join(tmp_path, "none.toml"))
    assert r.returncode == errno.ENOENT and "none.toml" in r.stderr, r


@pytest.mark.e2e
def test_daemon_from_config_file(tmp_path):
    """A daemon configured by the file alone (run dir, state dir, two origins, max
    minors); --max-minors on the command line wins: minor 5 exists only through it."""
    run_dir, state = os.path.join(tmp_path, "run"), os.path.join(tmp_path, "state")
    a = sparse_file(os.path.join(tmp_path, "a.img"), 64 << 20)
    b = sparse_file(os.path.join(tmp_path, "b.img"), 64 << 20)
    path = write(tmp_path, f"""\
run_dir = "{run_dir}"
state_dir = "{state}"
max_minors = 4
verbose = true

[[origins]]
path = "{a}"
name = "alpha"

[[origins]]
path = "{b}"
name = "beta"
""")
    d = Daemon(run_dir, origins=[], extra=["--max-minors", "6"], config=path)
    try:
        d.start()
        d.elioctl("setup-snapshot", "beta", os.path.join(tmp_path, "cow"), "5")
        info = d.info()
        assert [(m["minor"], m["block_device"]) for m in info["devices"]] == [(5, b)]
        assert os.path.exists(os.path.join(state, "registry.json"))
        r = d.elioctl("setup-snapshot", "alpha", os.path.join(tmp_path, "cow2"), "6",
                      check=False)
        assert r.returncode == errno.EINVAL, r  # 0..5 only
    finally:
        assert d.stop() == 0
