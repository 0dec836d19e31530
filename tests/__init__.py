"""snapengine's tests. A package, so that pytest imports them as ``tests.*`` with the
repository root on the import path, and tests and bench scripts alike use
``tests.harness``.
"""
