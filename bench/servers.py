"""The peers' servers (nbdkit, qemu-storage-daemon), the image files, and CPU pinning.

Pinning (``--pin``): the servers run on SERVER_CPU, fio on FIO_CPU. nbdkit and qemu are
started under ``taskset -c SERVER_CPU``. snapengine's daemon is started by the test
harness (``snapengine serve``, which then starts nbdkit): ``pinned_start`` sets this
process's own CPU affinity to SERVER_CPU around that start, so the supervisor, nbdkit
and every thread they create inherit it (a thread inherits the affinity of the thread
that creates it; setting it on a running process after the fact would need every task
of /proc/PID/task, and would miss threads already being created). ``check_pinned``
then checks every task of the process.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Iterator

from bench import BenchError, MiB
from tests.harness import remove_stale_socket, stop_process, wait_socket

SERVER_CPU = 0
FIO_CPU = 1


@contextlib.contextmanager
def server(name: str, cmd: list[str], socks: list[str], log: str) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` (a foreground server: nbdkit, qemu), wait until every socket of
    ``socks`` answers; SIGTERM it and wait for it on the way out."""
    for sock in socks:
        remove_stale_socket(sock)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        for sock in socks:
            wait_socket(sock, proc, name, log)
        yield proc
    finally:
        try:
            stop_process(proc)
        finally:
            for sock in socks:
                remove_stale_socket(sock)


def taskset(cpu: int | None) -> list[str]:
    """The command prefix that runs a command on ``cpu`` (none: no prefix)."""
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


def nbdkit_cmd(sock: str, plugin: list[str], cpu: int | None = None) -> list[str]:
    return taskset(cpu) + ["nbdkit", "-f", "--exit-with-parent", "-U", sock, *plugin]


def qemu_fleecing_cmd(image: str, fleece: str, sock: str, cpu: int | None = None) -> list[str]:
    """Origin through a copy-before-write node (target: ``fleece``), snapshot through
    a snapshot-access node: QEMU's image fleecing (7.x)."""
    blockdevs = [
        f"driver=file,filename={image},node-name=disk-file",
        "driver=raw,file=disk-file,node-name=disk",
        f"driver=file,filename={fleece},node-name=tmp-file",
        "driver=raw,file=tmp-file,node-name=tmp",
        "driver=copy-before-write,file=disk,target=tmp,node-name=cbw",
        "driver=snapshot-access,file=cbw,node-name=acc",
    ]
    cmd = taskset(cpu) + ["qemu-storage-daemon"]
    for b in blockdevs:
        cmd += ["--blockdev", b]
    return cmd + ["--nbd-server", f"addr.type=unix,addr.path={sock}",
                  "--export", "type=nbd,id=e1,node-name=cbw,name=origin,writable=on",
                  "--export", "type=nbd,id=e2,node-name=acc,name=snap"]


# -- files ----------------------------------------------------------------------------

def make_image(path: str, size: int) -> None:
    """A sparse raw file, then random data written over all of it (reads are real)."""
    chunk = 4 * MiB
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, chunk):
            f.write(os.urandom(min(chunk, size - offset)))


def file_sizes(path: str) -> tuple[int, int]:
    """(apparent, real) bytes: what ``du --apparent-size -B1`` and ``du -B1`` say."""
    st = os.stat(path)
    return st.st_size, st.st_blocks * 512


def fs_type(path: str) -> str:
    """The file system type of the mount holding ``path`` (/proc/mounts: "ext4", "tmpfs")."""
    real = os.path.realpath(path)
    best, kind = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1].replace("\\040", " ")
            inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, kind = mnt, fields[2]
    return kind


# -- CPU pinning ----------------------------------------------------------------------

def check_can_pin() -> None:
    """--pin needs both CPUs in this process's affinity."""
    have = os.sched_getaffinity(0)
    if not {SERVER_CPU, FIO_CPU} <= have:
        raise BenchError(f"--pin needs CPUs {SERVER_CPU} and {FIO_CPU}; this process may "
                         f"run on {sorted(have)}")


@contextlib.contextmanager
def pinned_start(cpu: int | None) -> Iterator[None]:
    """Run the body (a server's start) with this process on ``cpu``: the processes it
    starts, and their threads, inherit it. The old affinity is restored after."""
    if cpu is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def check_pinned(pid: int, cpu: int) -> int:
    """Every task (thread) of ``pid`` may run on ``cpu`` only; returns how many tasks."""
    tasks = os.listdir(f"/proc/{pid}/task")
    for tid in tasks:
        try:
            got = os.sched_getaffinity(int(tid))
        except ProcessLookupError:  # the thread has exited meanwhile
            continue
        if got != {cpu}:
            raise BenchError(f"task {tid} of process {pid} runs on CPUs {sorted(got)}, "
                             f"not {cpu}")
    return len(tasks)
