"""snapengine: point-in-time snapshots and changed-block tracking in user space, over NBD."""

__version__ = "0.1.0"
