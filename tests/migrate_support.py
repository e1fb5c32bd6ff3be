"""Helpers for tests/test_migrate_*.py: a namespace cluster with real gfvmds, the migration
workload (gfvm/migrate/workload.c) run under gfvm, migrations through the control socket, and
the checks every migration test makes (where the process runs, how many live copies exist).

Not a test module. Processes are only ever found through the unique state directory each test
gives its workload (it is on their command line), never by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require, require_root, unique_name
from gfvm import control
from gfvm.config import find_criu, find_tini
from gfvm.migrate import workload as wl


def require_migration() -> None:
    require_root()
    require(find_criu() is not None, "CRIU is not installed")
    require(find_tini() is not None, "tini is not installed")
    require(Path("/dev/fuse").exists(), "FUSE is missing")


@pytest.fixture(scope="session")
def mworkload_bin(tmp_path_factory) -> Path:
    require_migration()
    return wl.build(tmp_path_factory.mktemp("mwl"))


def wait_for(predicate, timeout: float = 30.0, what: str = "condition", interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    """One workload started under gfvm: its gfvm id, state dir and client."""

    id: str
    statedir: Path
    client: wl.WorkloadClient
    node: str


class MCluster:
    """A namespace cluster plus the migration tests' helpers."""

    def __init__(self, cluster, binary: Path, tmp: Path) -> None:
        self.c = cluster
        self.binary = binary
        self.tmp = tmp
        self._n = 0

    @property
    def nodes(self) -> list[str]:
        return list(self.c.nodes)

    def call(self, node: str, op: str, args: dict | None = None, **kw) -> dict:
        return control.call(self.c.control_socket(node), op, args or {}, **kw)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Every gfvmd answers and its File Manager has a valid lease (a metadata leader with a
        majority): before that, creating files in /gfvm fails."""
        for node in self.nodes:
            self.c.wait_daemon(node, timeout)

        def ok() -> bool:
            try:
                return all(self.call(n, "fm.status").get("lease") for n in self.nodes)
            except Exception:  # noqa: BLE001 - not yet
                return False

        wait_for(ok, timeout, "every File Manager to have a lease")

    def restart_daemon(self, node: str) -> None:
        self.c.stop_daemon(node, signal.SIGKILL)
        self.c.start_daemon(node)
        self.wait_ready()

    def ensure_daemons(self) -> None:
        """Restarts any gfvmd a previous test (or a fault point) killed, including one that is
        still on its way out (its control socket closes before the process is gone)."""
        from gfvm.cluster import sysutil

        restarted = False
        for n in self.nodes:
            try:
                self.call(n, "ping", timeout=5)
                continue
            except Exception:  # noqa: BLE001 - not answering: dead or dying
                pass
            pid = self.c.node(n).daemon_pid
            if pid:
                sysutil.wait_gone([pid], 10)
            self.c.stop_daemon(n, signal.SIGKILL)  # forgets the pid (kills it if it hung)
            self.c.start_daemon(n)
            restarted = True
        if restarted:
            self.wait_ready()

    def start(self, node: str = "n1", *, mib: int = 64, hot_mib: int = 8, rate: int = 20000,
              check_s: float = 0, extra_cmd: list[str] | None = None) -> Proc:
        """Runs the migration workload under gfvm on `node` and waits until it is ready."""
        self._n += 1
        statedir = self.tmp / f"wl{self._n}"
        statedir.mkdir(parents=True, exist_ok=True)
        for stale in ("port", "result"):
            (statedir / stale).unlink(missing_ok=True)
        argv = wl.argv(self.binary, statedir, mib=mib, hot_mib=hot_mib, rate=rate, check_s=check_s)
        summary = self.call(node, "run", {"cmd": extra_cmd or argv})
        client = wl.WorkloadClient(statedir, self.c.node(node).netns_path)
        client.wait_ready(timeout=120)
        return Proc(summary["id"], statedir, client, node)

    def migrate(self, proc: Proc, to: str = "auto", *, node: str | None = None,
                progress: list | None = None, **args) -> dict:
        """Migrates `proc` from the node it runs on; on success points its client at the new
        node. Raises control.RemoteError when gfvmd reports a failure."""
        source = node or proc.node
        report = self.call(source, "migrate", {"id": proc.id, "to": to, **args},
                           on_progress=progress.append if progress is not None else None)
        self.moved(proc, report["target"])
        return report

    def moved(self, proc: Proc, node: str) -> None:
        proc.node = node
        proc.client.netns = self.c.node(node).netns_path

    def managed_on(self, gfvm_id: str) -> list[str]:
        """The nodes whose pager manages `gfvm_id` (running)."""
        out = []
        for node in self.nodes:
            if not self.c.daemon_alive(node):
                continue
            try:
                listing = self.call(node, "ls", timeout=30)["processes"]
            except Exception:  # noqa: BLE001 - a daemon going down meanwhile
                continue
            if any(p["id"] == gfvm_id and not str(p["state"]).startswith(("exited", "killed"))
                   for p in listing):
                out.append(node)
        return out

    def wait_managed_only_on(self, gfvm_id: str, node: str, timeout: float) -> None:
        """Waits until `node`'s pager, and no other, manages `gfvm_id`; says who did last."""
        seen: list[list[str]] = []
        try:
            wait_for(lambda: seen.append(self.managed_on(gfvm_id)) or seen[-1] == [node],
                     timeout, f"only {node} to manage it")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; managed on {seen[-1]} at the end") from None

    def where(self, proc: Proc, name: str = "index") -> dict:
        return self.call(proc.node, "fm.where", {"path": f"procs/{proc.id}/{name}"})

    def copies(self, proc: Proc) -> list[int]:
        """Host pids of every copy of the workload process (its command line names the test's
        own state dir), zombies excluded."""
        return workload_pids(proc.statedir)

    def live_copies(self, proc: Proc) -> list[int]:
        """Copies that can run: not frozen by a cgroup and not stopped."""
        return [p for p in self.copies(proc) if _runnable(p)]

    def wait_one_copy(self, proc: Proc, timeout: float = 60.0) -> int:
        """Waits until exactly one copy of the process exists and it can run; returns its pid."""
        def one():
            copies = self.copies(proc)
            return copies[0] if len(copies) == 1 and _runnable(copies[0]) else None

        try:
            return wait_for(one, timeout, "exactly one live copy of the process")
        except AssertionError:
            raise AssertionError(
                f"copies: {[(p, _state(p)) for p in self.copies(proc)]}") from None

    def node_of_pid(self, pid: int) -> str:
        """Which node's network namespace the process lives in."""
        from gfvm.cluster import sysutil

        ino = sysutil.ns_inode(f"/proc/{pid}/ns/net")
        for name, n in self.c.nodes.items():
            if sysutil.ns_inode(n.netns_path) == ino:
                return name
        raise AssertionError(f"pid {pid} is in no node of the cluster")

    def kill(self, proc: Proc) -> None:
        for pid in self.copies(proc):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def log(self, node: str, n: int = 4000) -> str:
        return self.c.daemon_log(node).read_text(errors="replace")[-n:]


@contextmanager
def logs_on_failure(mc: MCluster):
    """Prints every gfvmd's log tail, the managed processes' output and the kernel's last
    messages when the block fails (pytest shows them with the failure)."""
    try:
        yield
    except BaseException:
        for node in mc.nodes:
            print(f"===== gfvmd log of {node}\n{mc.log(node, 6000)}")
            for out in sorted(mc.c.dirs(node).run.glob("procs/*/output.log")):
                print(f"===== {node}: {out.parent.name}'s output\n"
                      f"{out.read_text(errors='replace')[-1500:]}")
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
        print("===== kernel log\n" + "\n".join(dmesg.splitlines()[-15:]))
        raise


def workload_pids(statedir: Path) -> list[int]:
    """Workload processes whose working directory is `statedir` (the workload chdirs there; its
    command line is no help: the kernel reads it from process memory, which may be paged out)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/cwd") != str(statedir):
                continue
            if not os.readlink(f"/proc/{entry}/exe").endswith("gfvm-migrate-workload"):
                continue
        except OSError:
            continue
        if _state(int(entry)) not in ("Z", "X", "?"):
            found.append(int(entry))
    return sorted(found)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def _runnable(pid: int) -> bool:
    """Not stopped (T/t) and not in a frozen cgroup."""
    from gfvm import native

    if _state(pid) in ("T", "t", "Z", "X", "?"):
        return False
    try:
        return native.frozen_cgroup(pid) is None
    except ProcessLookupError:
        return False


@contextmanager
def mcluster_up(binary: Path, tmp: Path, *, nodes: int = 3, replicas: int = 2,
                daemon_env: dict | None = None):
    """A fresh cluster, torn down on exit (also on failure)."""
    from gfvm.cluster import Cluster

    require_migration()
    name = unique_name("m")
    try:
        cluster = Cluster.up(nodes, name=name, replicas=replicas, daemon_env=daemon_env)
        mc = MCluster(cluster, binary, tmp)
        mc.wait_ready()
        try:
            yield mc
        except BaseException:
            for node in mc.nodes:  # shown by pytest with the failure
                print(f"===== gfvmd log of {node}\n{mc.log(node, 6000)}")
            raise
    finally:
        Cluster.down(name)
