"""``snapengine attach NAME`` / ``snapengine detach NAME``: an export as a block device.

What the systemd unit snapengine-attach@NAME runs at boot and at shutdown, and what an
administrator can run by hand. Two ways, chosen by ``--method`` (default ``auto``):

  nbd   nbd-client -unix RUN/nbd.sock -N NAME /dev/nbdK, the first free nbd device;
        needs the kernel's nbd module (``auto`` loads it with modprobe when it can)
  loop  nbdfuse RUN/attached/NAME/disk URI (a process serving the export as one file,
        in its own session, its output in RUN/attached/NAME.log), then
        ``losetup -f --show`` of that file: /dev/loopK

The device is printed on stdout and kept with how it was made in RUN/attached/NAME.json,
which ``detach`` reads. ``detach`` refuses (EBUSY) a device still mounted: the mount is
to be stopped first (systemd does, by the order the fstab line gives), or the file
system would lose what it has not written. Then it flushes the device, detaches it and
waits for nbdfuse to exit.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from . import config, ready
from .errors import SnapError
from .rundir import RunDir, default_run_dir

ATTACHED_DIR = "attached"  # in the run dir: NAME.json, NAME/ (nbdfuse's mount), NAME.log
FUSE_TIMEOUT = 10.0  # seconds for nbdfuse's file to appear, and for nbdfuse to exit
READY_TIMEOUT = 30.0  # seconds the daemon gets to answer on nbd.sock
METHODS = ("auto", "nbd", "loop")


@dataclass
class Attachment:
    name: str
    method: str  # "nbd" or "loop"
    device: str  # /dev/nbdK or /dev/loopK
    fuse_dir: str = ""  # loop: nbdfuse's mount point
    fuse_pid: int = 0  # loop: the nbdfuse process


def add_commands(sub) -> None:
    """``attach`` and ``detach`` on ``snapengine``'s sub-command parser ``sub``."""
    for name, func, text in (("attach", attach_command, "attach export NAME as a block "
                              "device and print the device"),
                             ("detach", detach_command, "detach the block device of export "
                              "NAME (refused while it is mounted)")):
        p = sub.add_parser(name, help=text, description=text + ". " + METHOD_HELP)
        p.set_defaults(func=func)
        p.add_argument("--run-dir", metavar="DIR", help="the daemon's run directory (default: the config "
                       "file's run_dir, else env ELIO_RUN_DIR, else /run/elastio-snap)")
        p.add_argument("--config", metavar="FILE", help="the daemon's TOML config file, "
                       "for its run_dir")
        if name == "attach":
            p.add_argument("--method", choices=METHODS, default="auto",
                           help="nbd (nbd-client), loop (nbdfuse + losetup) or auto: nbd "
                           "where the nbd module loads, else loop (default %(default)s)")
        p.add_argument("name", metavar="NAME", help="the origin's export name")


METHOD_HELP = ("With nbd-client where the kernel has the nbd module, else with nbdfuse and "
               "a loop device; kept in RUN/attached/NAME.json.")


def run_dir_of(args: argparse.Namespace) -> RunDir:
    if args.run_dir:
        return RunDir(os.path.abspath(args.run_dir))
    if args.config:
        data, lines = config.read(args.config)
        if "run_dir" in data:
            value = config.check_type(args.config, lines.get("run_dir"), "run_dir",
                                      data["run_dir"], str)
            return RunDir(os.path.abspath(value))
    return RunDir(os.path.abspath(default_run_dir()))


def state_path(run_dir: RunDir, name: str) -> str:
    return os.path.join(run_dir.path, ATTACHED_DIR, f"{name}.json")


def _run(cmd: list[str]) -> str:
    """Run ``cmd``; its stdout, or SnapError naming it with its stderr."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise SnapError(errno.ENOENT, f"{cmd[0]} is not installed")
    if r.returncode != 0:
        raise SnapError(errno.EIO, f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r.stdout.strip()


def nbd_module() -> bool:
    """The kernel has the nbd module (loaded now if it can be) and nbd-client exists."""
    if shutil.which("nbd-client") is None:
        return False
    if not os.path.isdir("/sys/module/nbd"):
        subprocess.run(["modprobe", "-q", "nbd"], capture_output=True, check=False)
    return os.path.isdir("/sys/module/nbd")


def free_nbd_device() -> str:
    for k in range(256):
        if not os.path.exists(f"/sys/block/nbd{k}"):
            break
        if not os.path.exists(f"/sys/block/nbd{k}/pid"):
            return f"/dev/nbd{k}"
    raise SnapError(errno.EBUSY, "no free /dev/nbd device")


def attach(run_dir: RunDir, name: str, method: str = "auto") -> Attachment:
    """Attach export ``name`` of the daemon at ``run_dir``; EBUSY if it is already."""
    path = state_path(run_dir, name)
    if os.path.exists(path):
        raise SnapError(errno.EBUSY, f"{name} is already attached as "
                        f"{load(run_dir, name).device} ({path})")
    wait_export(run_dir, name)
    if method == "auto":
        method = "nbd" if nbd_module() else "loop"
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if method == "nbd":
        device = free_nbd_device()
        _run(["nbd-client", "-unix", run_dir.nbd_socket, "-N", name, device])
        done = Attachment(name, method, device)
    else:
        done = attach_loop(run_dir, name)
    with open(path + ".tmp", "w") as f:
        json.dump(asdict(done), f)
    os.rename(path + ".tmp", path)
    return done


def wait_export(run_dir: RunDir, name: str) -> None:
    """Until the daemon answers on nbd.sock (it may still be starting), then check that
    it serves ``name``: ENOENT if not."""
    import nbd  # python3-libnbd

    deadline = time.monotonic() + READY_TIMEOUT
    while not ready.nbd_answers(run_dir.nbd_socket):
        if time.monotonic() > deadline:
            raise SnapError(errno.ECONNREFUSED, f"no daemon answers on {run_dir.nbd_socket}")
        time.sleep(0.2)
    h = nbd.NBD()
    try:
        h.connect_uri(run_dir.nbd_uri(name))
        h.shutdown()
    except nbd.Error as e:
        raise SnapError(errno.ENOENT, f"no export {name} on {run_dir.nbd_socket}: {e.string}")


def attach_loop(run_dir: RunDir, name: str) -> Attachment:
    fuse_dir = os.path.join(run_dir.path, ATTACHED_DIR, name)
    os.makedirs(fuse_dir, mode=0o700, exist_ok=True)
    disk = os.path.join(fuse_dir, "disk")
    with open(os.path.join(run_dir.path, ATTACHED_DIR, f"{name}.log"), "ab") as log:
        fuse = subprocess.Popen(["nbdfuse", disk, run_dir.nbd_uri(name)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + FUSE_TIMEOUT
    while not os.path.exists(disk):
        if fuse.poll() is not None or time.monotonic() > deadline:
            _stop_fuse(fuse_dir, fuse.pid)
            raise SnapError(errno.EIO, f"nbdfuse did not serve {disk}; see "
                            f"{os.path.join(run_dir.path, ATTACHED_DIR, name + '.log')}")
        time.sleep(0.05)
    try:
        device = _run(["losetup", "-f", "--show", disk])
    except SnapError:
        _stop_fuse(fuse_dir, fuse.pid)
        raise
    return Attachment(name, "loop", device, fuse_dir, fuse.pid)


def load(run_dir: RunDir, name: str) -> Attachment:
    try:
        with open(state_path(run_dir, name)) as f:
            return Attachment(**json.load(f))
    except FileNotFoundError:
        raise SnapError(errno.ENOENT, f"{name} is not attached (no {state_path(run_dir, name)})")


def mount_points(device: str) -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[0] == device]


def detach(run_dir: RunDir, name: str) -> Attachment:
    """Flush and detach ``name``'s device, stop its nbdfuse; EBUSY while mounted."""
    done = load(run_dir, name)
    points = mount_points(done.device)
    if points:
        raise SnapError(errno.EBUSY, f"{done.device} ({name}) is mounted on "
                        f"{', '.join(points)}: unmount it first")
    if os.path.exists(done.device):
        _run(["blockdev", "--flushbufs", done.device])
    if done.method == "nbd":
        _run(["nbd-client", "-d", done.device])
    else:
        if os.path.exists(done.device):
            _run(["losetup", "-d", done.device])
        _stop_fuse(done.fuse_dir, done.fuse_pid)
    os.unlink(state_path(run_dir, name))
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_fuse(fuse_dir: str, pid: int) -> None:
    """Unmount nbdfuse's directory (it then flushes and exits); SIGTERM it if it lingers."""
    subprocess.run(["fusermount3", "-u", fuse_dir], capture_output=True, check=False)
    deadline = time.monotonic() + FUSE_TIMEOUT
    while _alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
    _reap(pid)
    try:
        os.rmdir(fuse_dir)
    except OSError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # our child when attach fails half-way
    except ChildProcessError:
        pass


def attach_command(args: argparse.Namespace) -> int:
    done = attach(run_dir_of(args), args.name, args.method)
    print(f"snapengine: attached {done.name} as {done.device} ({done.method})", file=sys.stderr)
    print(done.device)
    return 0


def detach_command(args: argparse.Namespace) -> int:
    done = detach(run_dir_of(args), args.name)
    print(f"snapengine: detached {done.name} from {done.device}", file=sys.stderr)
    return 0
