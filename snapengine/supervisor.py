"""The supervisor: ``snapengine serve`` running nbdkit, and stopping it cleanly.

nbdkit alone waits for every client to disconnect before it exits on SIGTERM, so an
attached file system would keep it up for ever. The supervisor turns SIGTERM and SIGINT
into the clean shutdown instead (the ``shutdown`` request: every COW file closed clean,
later writes refused), then stops nbdkit. Under systemd (NOTIFY_SOCKET) it is the
unit's main process and sends READY=1 once both sockets answer (ready.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from . import ready
from .client import request
from .control import remove_stale_socket
from .errors import SnapError
from .rundir import RunDir

SHUTDOWN_GRACE = 2.0  # seconds nbdkit gets to exit once tracking has stopped


class Stop(Exception):
    """SIGTERM or SIGINT reached the supervisor."""


def _stop(signum: int, frame) -> None:
    raise Stop(signal.Signals(signum).name)


def supervise(cmd: list[str], env: dict[str, str], run_dir: RunDir, log: str) -> int:
    """Run nbdkit and stop it cleanly on a signal; return the exit status. The engine
    is told to stop tracking first (later writes refused with ESHUTDOWN); then nbdkit is
    asked to exit, and killed after a grace period: nothing is left to lose. nbdkit runs
    with umask 077: what it creates (nbd.sock before the daemon sets its mode, the
    registry, the log) is private from the start."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # logrotate's HUP: the log reopens itself
    cmd = cmd + [f"supervisor={os.getpid()}"]  # nbdkit exits when this process is gone
    try:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                umask=0o077)
    except Stop:
        return 0
    try:
        with open(run_dir.supervisor_pid, "w") as f:
            f.write(f"{os.getpid()}\n")
        if os.environ.get("NOTIFY_SOCKET") and not notify_ready(proc, run_dir, log):
            return shutdown(proc, run_dir) or 1
        status = proc.wait()
        return status if status >= 0 else 128 - status  # killed: 128 + signal
    except Stop as e:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        print(f"snapengine: {e}: shutting down", file=sys.stderr)
        ready.notify("STOPPING=1")
        return shutdown(proc, run_dir)
    finally:
        for path in (run_dir.supervisor_pid, run_dir.nbdkit_pid):  # nbdkit's, if killed
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        for sock in (run_dir.nbd_socket, run_dir.ctl_socket):  # nbdkit's, if killed
            try:
                remove_stale_socket(sock)
            except SnapError:
                pass  # another daemon took over the run directory


def notify_ready(proc: subprocess.Popen, run_dir: RunDir, log: str) -> bool:
    """READY=1 to systemd once both sockets answer; False if they never do (the reason
    on stderr: the journal), and nbdkit is then stopped."""
    try:
        ready.wait(run_dir, proc.poll, log)
    except SnapError as e:
        print(f"snapengine: serve: {e}", file=sys.stderr)
        return False
    ready.notify(f"READY=1\nSTATUS=serving on {run_dir.nbd_socket}\nMAINPID={os.getpid()}")
    return True


def shutdown(proc: subprocess.Popen, run_dir: RunDir) -> int:
    clean = True
    try:
        request(run_dir.ctl_socket, "shutdown")
    except SnapError as e:  # nbdkit may be gone already (it got the signal too)
        clean = proc.poll() == 0
        if not clean:
            print(f"snapengine: clean shutdown request failed: {e}", file=sys.stderr)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(SHUTDOWN_GRACE)
    except subprocess.TimeoutExpired:  # clients still connected: they can only read now
        proc.kill()
        proc.wait()
        try:  # nbdkit could not remove it: no stale view of the minors
            os.unlink(run_dir.info)
        except FileNotFoundError:
            pass
    return 0 if clean else 1


def daemonize(cmd: list[str], env: dict[str, str], run_dir: RunDir, log: str) -> int:
    """Fork the supervisor into the background; return once the daemon answers."""
    pid = os.fork()
    if pid == 0:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os._exit(supervise(cmd, env, run_dir, log))
    ready.wait(run_dir, lambda: exit_status(pid), log)
    print(f"snapengine: daemon ready, pid {pid} (log {log})", file=sys.stderr)
    return 0


def exit_status(pid: int) -> int | None:
    """The exit status of child ``pid`` if it has exited, else None."""
    done, status = os.waitpid(pid, os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if done else None
