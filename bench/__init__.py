"""Measurement scripts, run as modules from the repository root, with the venv's
interpreter: ``.venv/bin/python -m bench.run`` (``make bench`` runs them all). They use
the test harness (``tests.harness``) for the daemon, NBD clients and files."""

BLOCK = 4096  # bytes: snapengine's tracking unit
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


class BenchError(Exception):
    """A step of a benchmark failed: the message says which and why."""
