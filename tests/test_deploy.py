"""deploy/: the systemd unit is valid and gfvmd speaks systemd's readiness protocol."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from conftest import require

REPO = Path(__file__).parents[1]
DEPLOY = REPO / "deploy"
GFVM = f"{sys.executable} -P -m gfvm"  # this checkout's gfvm, run inside a node


def test_systemd_unit_verifies():
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze not installed")
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(DEPLOY / "gfvmd.service")], capture_output=True, text=True
    )
    # verify also complains when /usr/local/bin/gfvmd is not installed yet: that is the only
    # message allowed here.
    problems = [ln for ln in proc.stderr.splitlines() if "/usr/local/bin/gfvmd" not in ln]
    assert problems == []


def test_gfvmd_notifies_systemd_when_ready(tmp_path, root):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(tmp_path / "notify"),
        "GFVM_ETC": str(tmp_path / "etc"),
        "GFVM_STATE": str(tmp_path / "state"),
        "GFVM_RUN": str(tmp_path / "run"),
        "GFVM_MOUNT": str(tmp_path / "mnt"),
    }
    daemon = subprocess.Popen([sys.executable, "-m", "gfvm.daemon"], env=env, cwd=Path(__file__).parents[1])
    try:
        assert notify.recv(100) == b"READY=1"
        assert (tmp_path / "run" / "gfvmd.sock").exists()
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        notify.close()
    assert not (tmp_path / "run" / "gfvmd.sock").exists()


def test_vagrantfile_validates():
    if shutil.which("vagrant") is None:
        import pytest

        pytest.skip("vagrant is not installed (apt-get install vagrant); not a gfvm requirement")
    repo = Path(__file__).parents[1]
    proc = subprocess.run(["vagrant", "validate", "--ignore-provider"], capture_output=True,
                          text=True, cwd=repo, timeout=300)
    (repo / ".gfvm-cluster-secret").unlink(missing_ok=True)  # made by the Vagrantfile
    assert "validated successfully" in proc.stdout, proc.stdout + proc.stderr


def _provision(cluster, tmp_path) -> None:
    """Provisions every node of `cluster` (made with start_daemons=False, provision=False) with
    deploy/provision-node exactly as the Vagrantfile does (minus install and systemd), then
    starts each node's gfvmd and waits until they all see each other."""
    secret = tmp_path / "secret"
    secret.write_text("5a" * 32)
    node_list = ",".join(f"{n.name}={n.address}" for n in cluster.nodes.values())
    for node in cluster.nodes:
        proc = cluster.run(
            node,
            [str(REPO / "deploy" / "provision-node"), "--node", node, "--nodes", node_list,
             "--secret", str(secret), "--name", cluster.name, "--no-install", "--no-systemd"],
            capture_output=True, text=True, env={**os.environ, "GFVM": GFVM, "PYTHONPATH": str(REPO)},
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"node {node} ready" in proc.stdout
        assert not (cluster.dirs(node).etc / "ca").exists()  # no CA key left on a node
    for node in cluster.nodes:
        cluster.start_daemon(node)
    for node in cluster.nodes:
        assert cluster.wait_daemon(node)["node"] == node
    cluster.wait_fm_ready()  # every node sees every other alive over the authenticated channel


def test_provision_node_script_sets_up_working_nodes(make_cluster, tmp_path):
    """The script the Vagrant VMs run, run inside namespace nodes: every node joins with matching
    credentials, its gfvmd starts and reaches its peers over mutual TLS."""
    from gfvm import control

    cluster = make_cluster(3, start_daemons=False, provision=False)
    _provision(cluster, tmp_path)
    assert control.call(cluster.control_socket("n1"), "ping")["cluster"] == cluster.name


def test_demo_cluster_migrates_on_provisioned_nodes(make_cluster, tmp_path):
    """What the Vagrantfile promises after `vagrant up`: `gfvm demo --cluster`, run on n1 of
    provisioned nodes (inside it, as `gfvm cluster exec n1 -- ...` does), moves its workload to
    another node, where the workload's own memory check passes; it leaves nothing in /gfvm."""
    from migrate_support import require_migration

    require_migration()
    cluster = make_cluster(3, start_daemons=False, provision=False)
    _provision(cluster, tmp_path)
    proc = cluster.run(
        "n1", [*GFVM.split(), "demo", "--cluster", "--mib", "64"], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    moved = re.search(r"moved n1 -> (n\d+)", proc.stdout)
    assert moved and moved.group(1) != "n1", out
    target = moved.group(1)
    assert f"its own check of all 64 MiB on {target}: ok at step" in proc.stdout, out
    assert ", 0 failed checks" in proc.stdout, out
    assert "demo finished" in proc.stdout, out
    left = cluster.run("n1", ["ls", "-A", "/gfvm"], capture_output=True, text=True)
    assert "demo" not in left.stdout.split(), left.stdout


def test_demo_cluster_ends_its_workload_when_the_migration_fails(make_cluster, tmp_path):
    """`gfvm demo --cluster` whose migration fails (a fault point on n1): it exits non-zero
    saying so, and ends the workload it started and removes its files."""
    from gfvm import control
    from gfvm.migrate.harness import LIVE
    from migrate_support import require_migration, wait_for

    require_migration()
    cluster = make_cluster(3, start_daemons=False, provision=False)
    _provision(cluster, tmp_path)
    control.call(cluster.control_socket("n1"), "migrate.fault",
                 {"name": "migrate.after_dump", "action": "error"})
    proc = cluster.run(
        "n1", [*GFVM.split(), "demo", "--cluster", "--mib", "16"], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "demo failed: " in proc.stdout and "ended p" in proc.stdout, out

    def running() -> list:
        return [(node, p["id"], p["state"]) for node in cluster.nodes
                for p in control.call(cluster.control_socket(node), "ls")["processes"]
                if p["state"] in LIVE]

    # gfvmd notices within a second that a tree ended
    wait_for(lambda: running() == [], 10, f"no managed process left running: {running()}\n{out}")
    left = cluster.run("n1", ["ls", "-A", "/gfvm"], capture_output=True, text=True)
    assert "demo" not in left.stdout.split(), left.stdout
