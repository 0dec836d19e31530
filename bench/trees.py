"""Source trees of two revisions, and a snapengine daemon running a given tree's code.

A revision is a git commit (checked out with ``git worktree add --detach`` under a
temporary directory, removed on the way out) or ``WORKTREE``: this checkout as it is,
uncommitted changes included.

The venv's ``snapengine`` and ``elioctl`` are editable installs of this checkout, whose
import hook comes after ``sys.path``: with ``PYTHONPATH=TREE`` they import TREE's
``snapengine`` instead. ``snapengine serve`` then finds TREE's ``nbd_plugin.py`` and
hands nbdkit ``PYTHONPATH=TREE`` (serve.plugin_environment), so the daemon proper runs
TREE's code too; ``check_tree`` reads nbdkit's command line and environment in /proc
to make sure.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

from bench import BenchError
from bench.servers import pinned_start
from tests.harness import ROOT, Daemon, run
from tests.harness.sockets import START_TIMEOUT

WORKTREE = "WORKTREE"
DAEMON_CODE = ("snapengine", "nbd_plugin.py")  # what a tree's daemon runs


@dataclass(frozen=True)
class Tree:
    label: str  # "A", "B"
    rev: str  # as given on the command line
    commit: str  # what it is: a commit, or HEAD plus the work tree's changes
    path: str  # its root directory


def git(*args: str, check: bool = True) -> str:
    return run(["git", "-C", ROOT, *args], check=check).stdout.strip()


def describe_worktree() -> str:
    """HEAD, and how many files of the daemon's code differ from it (0: same code)."""
    changed = git("status", "--porcelain", "--", *DAEMON_CODE).splitlines()
    return (f"HEAD {git('rev-parse', '--short', 'HEAD')} + {len(changed)} uncommitted "
            f"change(s) in {', '.join(DAEMON_CODE)}")


@contextlib.contextmanager
def trees(revs: list[str], base: str) -> Iterator[list[Tree]]:
    """One Tree per revision, labelled A, B...; git worktrees made in ``base`` are
    removed (``git worktree remove --force``, then ``prune``) on the way out."""
    made: list[str] = []
    try:
        out = []
        for label, rev in zip("ABCDEFGH", revs):
            if rev == WORKTREE:
                out.append(Tree(label, rev, describe_worktree(), ROOT))
                continue
            commit = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
            if not commit:
                raise BenchError(f"{rev!r} is not a commit of {ROOT} (nor {WORKTREE})")
            path = os.path.join(base, label)
            made.append(path)
            git("worktree", "add", "--detach", path, commit)
            out.append(Tree(label, rev, commit[:12], path))
        yield out
    finally:
        for path in made:
            git("worktree", "remove", "--force", path, check=False)
        git("worktree", "prune", check=False)


def tree_environment(tree: str) -> str:
    """PYTHONPATH with ``tree`` first."""
    return os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")]))


@dataclass
class TreeDaemon(Daemon):
    """A Daemon (tests.harness) whose serve and elioctl run ``tree``'s code."""

    tree: str = ""

    def start(self, timeout: float = START_TIMEOUT) -> "TreeDaemon":
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = tree_environment(self.tree)  # serve inherits it
        try:
            super().start(timeout)
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
        return self

    def command(self, tool: str, *args: str) -> list[str]:
        return ["env", f"PYTHONPATH={tree_environment(self.tree)}", *super().command(tool, *args)]


@contextlib.contextmanager
def tree_daemon(tree: Tree, run_dir: str, origins: list[tuple[str, str]],
                cpu: int | None) -> Iterator[TreeDaemon]:
    """A started daemon of ``tree`` (on ``cpu`` if given), stopped on the way out."""
    d = TreeDaemon(run_dir, origins, [], verbose=False, tree=tree.path)
    try:
        with pinned_start(cpu):
            d.start()
        yield d
    finally:
        d.stop()


def proc_strings(pid: int, name: str) -> list[str]:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return [s.decode(errors="replace") for s in f.read().split(b"\0") if s]


def check_tree(d: TreeDaemon) -> str:
    """The plugin nbdkit runs, checked to be ``d.tree``'s, with ``d.tree`` first in its
    PYTHONPATH (where the plugin imports snapengine from); BenchError if not."""
    pid = d.pid
    plugins = [a for a in proc_strings(pid, "cmdline") if a.endswith("nbd_plugin.py")]
    env = dict(s.split("=", 1) for s in proc_strings(pid, "environ") if "=" in s)
    first = env.get("PYTHONPATH", "").split(os.pathsep)[0]
    want = os.path.realpath(os.path.join(d.tree, "nbd_plugin.py"))
    if len(plugins) != 1 or os.path.realpath(plugins[0]) != want:
        raise BenchError(f"nbdkit {pid} runs plugin {plugins}, not {want}")
    if os.path.realpath(first) != os.path.realpath(d.tree):
        raise BenchError(f"nbdkit {pid} imports from {first!r} first, not {d.tree}")
    return plugins[0]

