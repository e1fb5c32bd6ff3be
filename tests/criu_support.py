"""Helpers for tests/test_criu_*.py: the C workload (tests/criu_workload.c) run in its own PID
namespace under tini inside a node of a namespace cluster, talking to it over its TCP port from
inside the node's network namespace, and fixtures that kill every process they start by PID.

Not a test module (no test_ prefix); test modules import the fixtures they use from here.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import require, require_root, unique_name

WORKLOAD_SRC = Path(__file__).with_name("criu_workload.c")
REPO = Path(__file__).resolve().parents[1]


def reap(pid: int) -> None:
    """Reaps `pid` if it is our (dead or dying) child; ignores anything else."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def kill_and_reap(pid: int | None) -> None:
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    reap(pid)


def netns_connect(netns_path: Path | None, port: int, timeout: float) -> socket.socket:
    """A TCP connection to 127.0.0.1:port inside the network namespace at `netns_path`."""
    from gfvm.migrate.workload import connect_in_netns

    return connect_in_netns(netns_path, port, timeout)


class Workload:
    """One run of the C workload: `unshare --pid --fork setsid tini -s -- criu_workload ...`
    inside `node` of `cluster`. `root` is the host pid of its tini (the tree's root)."""

    def __init__(self, binary: Path, statedir: Path, cluster, node: str, *, mib: int, seed: int,
                 threads: int, child: bool, env: dict[str, str] | None = None) -> None:
        self.binary, self.statedir, self.cluster, self.node = binary, statedir, cluster, node
        self.env = env or {}
        self.mib, self.seed, self.threads, self.child = mib, seed, threads, child
        self.launcher: subprocess.Popen | None = None
        self.root: int | None = None
        self.port: int | None = None
        self.other_roots: list[int] = []  # earlier roots (before a restore), killed too

    def start(self) -> "Workload":
        self.statedir.mkdir(parents=True, exist_ok=True)
        # stdio is opened by a shell inside the node: CRIU resolves every open file's mount in
        # the node's mount namespace, so files opened from the host's would not be found.
        inner = ["unshare", "--pid", "--fork", "setsid", shutil.which("tini") or "tini", "-s", "--",
                 str(self.binary), str(self.statedir), str(self.mib), str(self.seed), str(self.threads),
                 "1" if self.child else "0"]
        log = self.statedir / "out.log"  # appended to (O_APPEND): CRIU skips its size check
        script = f'exec "$@" </dev/null >>{shlex.quote(str(log))} 2>&1'
        self.launcher = self.cluster.popen(self.node, ["sh", "-c", script, "sh", *inner],
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True,
                                           env={**os.environ, **self.env})
        deadline = time.monotonic() + 30
        port_file = self.statedir / "port"
        while not port_file.exists():
            if self.launcher.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"workload did not start: {(self.statedir / 'out.log').read_text()}")
            time.sleep(0.01)
        self.port = int(port_file.read_text())
        kids = Path(f"/proc/{self.launcher.pid}/task/{self.launcher.pid}/children").read_text().split()
        self.root = int(kids[0])
        return self

    def netns(self) -> Path:
        return self.cluster.node(self.node).netns_path

    def connect(self, timeout: float = 60) -> socket.socket:
        return netns_connect(self.netns(), self.port, timeout)

    def cmd(self, text: str, timeout: float = 60) -> str:
        """Sends one command and returns its one-line answer."""
        with self.connect(timeout) as s:
            s.sendall(text.encode() + b"\n")
            return recv_line(s)

    def region(self) -> tuple[int, int]:
        _, addr, length = self.cmd("addr").split()
        return int(addr), int(length)

    def moved_to(self, node: str, root: int) -> None:
        """Records that the tree now runs on `node` with root host pid `root` (after a restore)."""
        if self.root is not None:
            self.other_roots.append(self.root)
        self.node, self.root = node, root

    def host_pid(self, inner: int) -> int:
        from gfvm.migrate.lazypages import inner_to_host

        return inner_to_host(self.root)[inner]

    def read_memory(self, inner: int, addr: int, length: int) -> bytes:
        with open(f"/proc/{self.host_pid(inner)}/mem", "rb") as f:
            f.seek(addr)
            return f.read(length)

    def kill(self) -> None:
        for pid in [self.root, *self.other_roots]:
            kill_and_reap(pid)
        if self.launcher is not None:
            kill_and_reap(self.launcher.pid)


def recv_line(s: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


class ServerProc:
    """`python -m gfvm.migrate.lazypages ...` in a process of its own (so a test can SIGKILL it)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gfvm.migrate.lazypages_cli", *args],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=out,
                start_new_session=True,
            )
        line = self.proc.stdout.readline().decode()  # type: ignore[union-attr]
        if not line.startswith(("listening", "serving")):
            self.kill()
            raise RuntimeError(f"lazy-pages server did not start: {log.read_text()}")
        fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
        self.keeper_pid = int(fields["keeper"]) if fields.get("keeper", "-") != "-" else None

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        kill_and_reap(self.proc.pid)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def criu_env():
    """Checks root, CRIU, tini, a C compiler; makes this process a child subreaper (restored
    trees are re-parented to it, so their roots can be reaped)."""
    require_root()
    from gfvm.config import find_criu, find_tini
    from gfvm.migrate import criu

    require(find_criu() is not None, "CRIU is not installed (deploy/install)")
    require(find_tini() is not None, "tini is not installed")
    require(shutil.which("cc") is not None or shutil.which("gcc") is not None, "no C compiler")
    criu.become_subreaper()


@pytest.fixture(scope="session")
def workload_bin(criu_env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("workload") / "criu_workload"
    subprocess.run([shutil.which("cc") or "gcc", "-O2", "-Wall", "-pthread", "-o", str(out), str(WORKLOAD_SRC)],
                   check=True)
    return out


@pytest.fixture(scope="module")
def cluster2(criu_env):
    """A 2-node namespace cluster without daemons, shared by the tests of one module."""
    from gfvm.cluster import Cluster

    name = unique_name("cr")
    cluster = Cluster.up(2, name=name, start_daemons=False)
    try:
        yield cluster
    finally:
        Cluster.down(name)


@pytest.fixture
def make_workload(cluster2, workload_bin, tmp_path):
    """Factory: make_workload(node="n1", mib=16, ...) -> started Workload; all killed after the test."""
    made: list[Workload] = []

    def factory(node: str = "n1", *, mib: int = 16, seed: int = 42, threads: int = 3, child: bool = True,
                env: dict[str, str] | None = None) -> Workload:
        w = Workload(workload_bin, tmp_path / unique_name("wl"), cluster2, node, mib=mib, seed=seed,
                     threads=threads, child=child, env=env)
        made.append(w)
        return w.start()

    yield factory
    for w in made:
        w.kill()


@pytest.fixture
def servers():
    """Factory for ServerProc; every server and keeper it started is killed after the test."""
    made: list[ServerProc] = []

    def factory(args: list[str], log: Path) -> ServerProc:
        s = ServerProc(args, log)
        made.append(s)
        return s

    yield factory
    for s in made:
        s.kill()
        kill_and_reap(s.keeper_pid)
