"""Driving the migration workload under gfvm: `gfvm demo` and `gfvm bench migrate` (the tests
have their own copy in tests/migrate_support.py, with test-only checks).

Two ways to reach the nodes, with the same methods (`run_workload`, `migrate`):
  - NamespaceNodes: a local namespace cluster, from the host: every node's gfvmd through its
    control socket, the workload at 127.0.0.1 inside its node's network namespace;
  - ThisNode: a configured cluster, from one of its nodes: only this node's gfvmd, the workload
    over the network at the address cluster.toml gives its node; `end` ends a workload it started
    wherever it went (nothing tears that cluster down).

Everything here blocks.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from gfvm import control
from gfvm.config import ClusterConfig, NodePaths, this_node_name
from gfvm.errors import GfvmError, Unavailable
from gfvm.migrate import workload as wl

#: the states gfvmd's `status` reports for a tree that runs on its node (an ended one's start
#: with "exited" or "killed")
LIVE = ("starting", "running", "released")


def wait_ready(cluster, timeout: float = 60.0) -> None:
    """Waits until every gfvmd answers and its File Manager holds a lease (a metadata leader
    with a majority): creating a file in /gfvm fails before that."""
    deadline = time.monotonic() + timeout
    for node in cluster.nodes:
        cluster.wait_daemon(node, timeout)
    while True:
        try:
            if all(control.call(cluster.control_socket(n), "fm.status", timeout=10).get("lease")
                   for n in cluster.nodes):
                return
        except GfvmError:
            pass
        if time.monotonic() > deadline:
            raise GfvmError(f"the File Managers of cluster {cluster.name} did not settle "
                            f"within {timeout:.0f} s")
        time.sleep(0.1)


@dataclass
class Managed:
    """A migration workload running under gfvm: its gfvm id and a client that follows it."""

    id: str
    node: str
    client: wl.WorkloadClient
    migrated: bool = False  # a migration of it was started (it may run on another node)


def run_workload(cluster, node: str, binary: Path, statedir: Path, **kw) -> Managed:
    """`gfvm run` of the migration workload on `node` (keywords: workload.argv's); waits until
    its memory is filled."""
    statedir.mkdir(parents=True, exist_ok=True)
    for stale in ("port", "result"):
        (statedir / stale).unlink(missing_ok=True)
    summary = control.call(cluster.control_socket(node), "run",
                           {"cmd": wl.argv(binary, statedir, **kw)})
    client = wl.WorkloadClient(statedir, cluster.node(node).netns_path)
    client.wait_ready(timeout=600)
    return Managed(summary["id"], node, client)


def migrate(cluster, proc: Managed, to: str = "auto", *, progress=None, **args) -> dict:
    """Migrates `proc` from the node it runs on; afterwards its client talks to the target."""
    report = control.call(cluster.control_socket(proc.node), "migrate",
                          {"id": proc.id, "to": to, **args}, on_progress=progress)
    proc.node = report["target"]
    proc.client.netns = cluster.node(proc.node).netns_path
    return report


class NamespaceNodes:
    """A local namespace cluster, reached from the host (tearing it down ends what runs on it)."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster

    def run_workload(self, node: str, binary: Path, statedir: Path, **kw) -> Managed:
        """See run_workload."""
        return run_workload(self.cluster, node, binary, statedir, **kw)

    def migrate(self, proc: Managed, to: str = "auto", *, progress=None, **args) -> dict:
        """See migrate."""
        return migrate(self.cluster, proc, to, progress=progress, **args)


class ThisNode:
    """A configured cluster (`paths`: this node's directories), reached from one of its nodes:
    workloads start here through this node's gfvmd, and their clients follow them over the
    network to the address of the node they run on."""

    def __init__(self, paths: NodePaths) -> None:
        self.paths = paths
        self.config = ClusterConfig.load(paths.cluster_toml)
        self.name = this_node_name(paths)
        self.config.node(self.name)  # a node.toml naming a node the cluster does not list
        self.started: list[Managed] = []  # every workload run_workload started, for `end`

    def call(self, op: str, args: dict | None = None, **kw) -> dict:
        """One request to this node's gfvmd (DaemonNotRunning says how to start it)."""
        return control.call(self.paths.control_socket, op, args, **kw)

    def wait_ready(self, timeout: float = 30.0) -> dict:
        """Waits until this node's File Manager holds a metadata lease (creating files in the
        mount needs one); returns its fm.status. Unavailable, saying what to check, if not."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.call("fm.status", timeout=10)
            if status.get("lease"):
                return status
            if time.monotonic() > deadline:
                alive = sorted(n for n, v in status.get("nodes", {}).items() if v.get("alive"))
                raise Unavailable(
                    f"gfvmd on {self.name} has no metadata lease after {timeout:.0f} s: it reaches "
                    f"only {', '.join(alive) or 'no node'} of {len(self.config.nodes)}, and needs "
                    "a majority; start gfvmd on the other nodes (`systemctl start gfvmd`) and "
                    "check the network between them (`gfvm status`, `journalctl -u gfvmd`)")
            time.sleep(0.2)

    def address(self, node: str) -> str:
        return self.config.node(node).address

    def run_workload(self, node: str, binary: Path, statedir: Path, **kw) -> Managed:
        """`gfvm run` of the workload here (`node` must be this node); `binary` and `statedir`
        must be where every node sees them (the mount), for after a migration."""
        if node != self.name:
            raise GfvmError(f"this node is {self.name}: it cannot start a process on {node}")
        statedir.mkdir(parents=True, exist_ok=True)
        summary = self.call("run", {"cmd": wl.argv(binary, statedir, **kw)})
        proc = Managed(summary["id"], node, wl.WorkloadClient(statedir, host=self.address(node)))
        self.started.append(proc)

        def alive() -> bool:
            return self.call("status", {"id": proc.id}).get("state") in LIVE

        proc.client.wait_ready(timeout=600, alive=alive)
        return proc

    def migrate(self, proc: Managed, to: str = "auto", *, progress=None, **args) -> dict:
        """Migrates `proc` from this node; afterwards its client talks to the target."""
        if proc.node != self.name:
            raise GfvmError(f"{proc.id} runs on {proc.node}: migrate it from there")
        proc.migrated = True  # from now on it may run elsewhere, even if this call fails
        report = self.call("migrate", {"id": proc.id, "to": to, **args}, on_progress=progress)
        proc.node = report["target"]
        proc.client.host = self.address(proc.node)
        return report

    def end(self, proc: Managed) -> str | None:
        """Ends the workload, wherever it went; returns None when it is gone, else what is left
        and where. Asks it to exit over the network; failing that, waits for a migration of it
        that is still under way, then SIGKILLs its tree when it (still or again) runs here (its
        PID namespace's init, by the pid this gfvmd reports for its id, never by name), or asks
        it to exit on the other nodes when it left."""
        if self._exit(proc):
            return None
        deadline = time.monotonic() + 60
        while (target := self._outgoing(proc)) is not None:
            proc.node = target
            if time.monotonic() > deadline:
                return f"{proc.id} is still being migrated to {target}: end it there"
            time.sleep(0.5)
        try:
            st = self.call("status", {"id": proc.id}, timeout=10)
        except GfvmError:
            st = {}
        if st.get("state") in LIVE:  # a tree that runs here
            pid = st.get("init_pid")
            if not pid:
                return f"{proc.id} runs on {self.name}, but gfvmd reports no pid for it"
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return None
        if not proc.migrated:
            return None  # it ended here
        for node in [proc.node] + [n.name for n in self.config.nodes if n.name != proc.node]:
            if node != self.name:
                proc.node, proc.client.host = node, self.address(node)
                if self._exit(proc):
                    return None
        return (f"{proc.id} did not answer `exit` on any node: if `gfvm ls` on another node "
                "lists it, end it there")

    def _exit(self, proc: Managed) -> bool:
        try:
            proc.client.command("exit", timeout=10)
            return True
        except (OSError, GfvmError):
            return False

    def _outgoing(self, proc: Managed) -> str | None:
        """The target of a migration of `proc` this node is running, or None."""
        try:
            out = self.call("migrate.state", timeout=10).get("outgoing", {})
        except GfvmError:
            return None
        return out[proc.id]["target"] if proc.id in out else None
