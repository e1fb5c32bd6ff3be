"""Small blocking helpers for the test cluster: run commands, find processes by namespace,
kill by PID. Nothing here kills by name: processes are found through the namespaces the
cluster itself created."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from gfvm.errors import GfvmError


class CommandFailed(GfvmError):
    """A system command the cluster runs failed; the message has its stderr."""


def run(argv: list[str], *, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    """Runs argv (blocking), capturing output; raises CommandFailed with stderr when check fails."""
    proc = subprocess.run(argv, capture_output=True, text=True, input=input)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip()
        raise CommandFailed(f"`{' '.join(argv)}` failed ({proc.returncode}): {msg}")
    return proc


def ns_inode(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) identifying the namespace at `path`, or None if it is gone."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return (st.st_dev, st.st_ino)


def pids_in_netns(netns_id: tuple[int, int]) -> list[int]:
    """Every live process whose network namespace is `netns_id` (blocking /proc scan)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        if ns_inode(f"/proc/{entry.name}/ns/net") == netns_id:
            found.append(int(entry.name))
    return found


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Waits until none of `pids` is alive (reaping our own children); returns the survivors."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in pids:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def _fuse_mounts(mountinfo: str) -> dict[int, str]:
    """{FUSE connection id: mount point} from a mountinfo text."""
    mounts = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype = fields[sep + 1]
        if fstype == "fuse" or fstype.startswith("fuse."):
            major, minor = fields[2].split(":")
            if major == "0":  # FUSE superblocks use anonymous devices: the id is the minor
                mounts[int(minor)] = fields[4]
    return mounts


def fuse_connections_of_node(pid: int, mount_point: str) -> list[int]:
    """FUSE connection ids of the mounts a node made at `mount_point` (seen through `pid`).

    Mounts the node's mount namespace merely copied from ours are excluded, so cleaning up a
    node never aborts a FUSE mount that belongs to someone else.
    """
    try:
        theirs = _fuse_mounts(Path(f"/proc/{pid}/mountinfo").read_text())
    except OSError:  # gone, or exiting (EINVAL)
        return []
    ours = _fuse_mounts(Path("/proc/self/mountinfo").read_text())
    return [cid for cid, mp in theirs.items() if mp == mount_point and cid not in ours]


def abort_fuse_connection(conn_id: int) -> None:
    """Aborts a FUSE connection so nothing stays blocked on a dead or stopping daemon."""
    try:
        Path(f"/sys/fs/fuse/connections/{conn_id}/abort").write_text("1")
    except (FileNotFoundError, OSError):
        pass
