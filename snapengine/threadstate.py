"""Keep a Python thread state per nbdkit worker thread, for the life of its connection.

Design notes
------------
nbdkit's Python plugin runs every callback between ``PyGILState_Ensure`` and
``PyGILState_Release``. An nbdkit worker thread has no Python thread state of its
own, so each Ensure creates one (with a 16 KiB frame stack, one mmap) and each Release
destroys it (one munmap): per request, a thread state is built and torn down, and a
``threading.local`` is empty every time. Measured here with bench/minimal_plugin.py,
4 KiB requests at iodepth 32: about 14,000 requests/s as nbdkit does it, 60,000 to
75,000 once the thread state is kept (docs/performance.md).

``keep(handle)``, called from a data callback, takes one more PyGILState count on the
current thread (``PyGILState_Ensure`` while the GIL is held only counts). nbdkit's
Release then drops its own count, releases the GIL and leaves the thread state alive;
its next Ensure on this thread reuses it. The states are remembered per connection
handle, and ``release(handle)``, called from the plugin's ``close``, deletes them.

Why that is safe with nbdkit (server/connections.c, handle_single_connection): a
connection's worker threads serve only that connection and are all joined before its
``close`` callback runs, so the states ``release`` deletes belong to threads that have
exited (``PyThreadState_Clear`` then ``PyThreadState_Delete``, with the GIL held, as
for any thread state that is not current). With one thread per connection (nbdkit
``--threads 1``, or a serial thread model) the connection's own thread ran the
requests and runs ``close``: that state is the current one, and only our count is
given back (``PyGILState_Release(PyGILState_LOCKED)``), so that nbdkit's own Release
deletes it as before. A state whose connection never closes (the server quits first)
is deleted with the interpreter.
"""

from __future__ import annotations

import ctypes
from threading import get_ident

_api = ctypes.pythonapi  # called with the GIL held
_api.PyGILState_Ensure.restype = ctypes.c_int
_api.PyGILState_Release.argtypes = [ctypes.c_int]
_api.PyThreadState_Get.restype = ctypes.c_void_p
_api.PyThreadState_Clear.argtypes = [ctypes.c_void_p]
_api.PyThreadState_Delete.argtypes = [ctypes.c_void_p]
_LOCKED = 0  # PyGILState_LOCKED: the caller already held the GIL

# The OS threads whose state is kept: the data callbacks test ``get_ident() in
# threads`` (two C calls) before calling ``keep``. An ident reused by a new thread
# before the old one's connection is released only delays the keeping.
threads: set[int] = set()
_kept: dict[int, list[tuple[int, int]]] = {}  # id(handle) -> (thread ident, state)
_states: set[int] = set()  # every state kept: none is kept (or deleted) twice


def keep(handle: object) -> None:
    """Keep the current thread's Python state until ``release(handle)``."""
    ident = get_ident()
    if ident in threads:
        return
    threads.add(ident)
    state = _api.PyThreadState_Get()
    if state in _states:  # kept already, its ident dropped by an older connection
        return
    _api.PyGILState_Ensure()
    _states.add(state)
    _kept.setdefault(id(handle), []).append((ident, state))


def release(handle: object) -> int:
    """The connection of ``handle`` is closing, its worker threads gone: delete the
    thread states kept for it (the current thread's: give back our count only).
    Return how many there were."""
    kept = _kept.pop(id(handle), ())
    if not kept:
        return 0
    current = _api.PyThreadState_Get()
    for ident, state in kept:
        threads.discard(ident)
        _states.discard(state)
        if state == current:
            _api.PyGILState_Release(_LOCKED)
        else:
            _api.PyThreadState_Clear(state)
            _api.PyThreadState_Delete(state)
    return len(kept)
