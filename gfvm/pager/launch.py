"""Starting a managed process tree: own PID namespace, tini as init, own cgroup, held before exec.

The tree gfvmd starts for `gfvm run -- CMD ARGS` is (host view, each line execs or forks the next):

    sh (join the tree's cgroups) -exec-> unshare --pid --fork
        -fork-> [inner pid 1] setsid -exec-> tini -s --            (init: reaps, forwards signals)
            -fork-> [inner pid 2] sh -c 'kill -STOP $$; exec "$@"' (the shim) -exec-> CMD ARGS

setsid runs inside the namespace so that the session leader is inside it (CRIU refuses otherwise).
The shim stops itself before it execs CMD; gfvmd finds it stopped, seizes it with ptrace
(PTRACE_O_TRACEEXEC), lets it continue and creates the userfaultfd inside CMD's address space at the
exec stop, before CMD's first instruction (Pager._attach_at_exec in gfvm/pager/service.py).
CMD's stdout and stderr go to a log file. Everything here blocks.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from gfvm.config import find_tini
from gfvm.errors import FeatureMissing, GfvmError
from gfvm.pager import procfs
from gfvm.pager.cgroup import TreeCgroup

SHIM_SCRIPT = 'kill -STOP $$; exec "$@"'


@dataclass
class LaunchedTree:
    """Host pids of a freshly started tree; `shim_pid` is stopped, waiting to exec CMD."""

    popen: subprocess.Popen  # the `unshare` process (gfvmd's child: someone must wait() for it)
    init_pid: int  # tini, inner pid 1: the root CRIU dumps
    shim_pid: int  # inner pid 2: becomes CMD at exec


def tree_argv(cmd: list[str]) -> list[str]:
    """The command line that starts CMD in its own PID namespace under tini, stopped before exec."""
    tini = find_tini()
    if tini is None:
        raise FeatureMissing(
            "tini is not installed (Debian package `tini`): each managed process "
            "tree runs under it as its init"
        )
    return [
        "unshare",
        "--pid",
        "--fork",
        "setsid",
        tini,
        "-s",
        "--",
        "/bin/sh",
        "-c",
        SHIM_SCRIPT,
        "gfvm-shim",
        *cmd,
    ]


def start_tree(
    cmd: list[str],
    cgroup: TreeCgroup,
    log_path: Path,
    *,
    cwd: str = "/",
    env: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> LaunchedTree:
    """Starts `cmd` as a new managed tree and returns once its shim has stopped itself.

    On failure everything started is killed again and GfvmError says why (with the log's tail).
    """
    if not cmd:
        raise GfvmError("no command given")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            cgroup.join_and_exec_argv(tree_argv(cmd)),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=cwd,
            env=env if env is not None else dict(os.environ),
            start_new_session=True,  # not in gfvmd's session: signals to gfvmd do not reach it
        )
    try:
        init_pid, shim_pid = _find_stopped_shim(popen, timeout)
    except BaseException:
        cgroup.kill_all()
        popen.kill()
        popen.wait()
        raise
    return LaunchedTree(popen, init_pid, shim_pid)


def _find_stopped_shim(popen: subprocess.Popen, timeout: float) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        rc = popen.poll()
        if rc is not None:
            raise GfvmError(f"the process tree exited during start-up (exit status {rc})")
        init = _only_child(popen.pid)
        shim = _only_child(init) if init else None
        if shim:
            try:
                if procfs.state(shim) in ("T", "t") and procfs.inner_pid(shim) == 2:
                    return init, shim
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise GfvmError(
                f"the process tree did not reach its start point within {timeout:.0f} s"
            )
        time.sleep(0.002)


def _only_child(pid: int) -> int | None:
    try:
        kids = procfs.children(pid)
    except ProcessLookupError:
        return None
    return kids[0] if len(kids) == 1 else None
