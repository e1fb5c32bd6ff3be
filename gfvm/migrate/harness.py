"""Driving gfvm on a local namespace cluster from outside it: `gfvm demo` and `gfvm bench
migrate` (the tests have their own copy in tests/migrate_support.py, with test-only checks).

Everything here blocks; it talks to each node's gfvmd over its control socket from the host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from gfvm import control
from gfvm.errors import GfvmError
from gfvm.migrate import workload as wl


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
