"""The namespace test cluster: up, exec, status, down, and cleanup after crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import unique_name
from gfvm.cluster import LIB_ROOT, NETNS_DIR, RUN_ROOT, Cluster, sysutil
from gfvm.errors import NotFound, UsageError


def leftovers(name: str) -> list[str]:
    """Everything of cluster `name` still on the machine: netns, links, dirs, processes."""
    found = [f"netns {p.name}" for p in NETNS_DIR.glob(f"{name}-*")] if NETNS_DIR.is_dir() else []
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [
        f"link {ln.split(':')[1].strip()}" for ln in links.splitlines()
        if ln.split(":")[1].strip().startswith(f"{name}-")
    ]
    found += [f"dir {d}" for d in (RUN_ROOT / name, LIB_ROOT / name) if d.exists()]
    return found


def gfvm_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "gfvm", *args], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"gfvm {' '.join(args)} failed: {proc.stderr}")
    return proc


def test_up_exec_down_leaves_nothing(root):
    name = unique_name()
    try:
        gfvm_cli("cluster", "up", "--nodes", "3", "--name", name)
        out = gfvm_cli("cluster", "exec", "--name", name, "n2", "--", "ip", "-br", "addr").stdout
        assert "10.77.0.2/24" in out
        assert "10.77.0.1/24" not in out
        cluster = Cluster.load(name)
        anchors = [n.anchor_pid for n in cluster.nodes.values()]
        daemons = [n.daemon_pid for n in cluster.nodes.values()]
        assert all(sysutil.pid_alive(p) for p in anchors + daemons)
    finally:
        gfvm_cli("cluster", "down", "--name", name)
    assert leftovers(name) == []
    assert not any(sysutil.pid_alive(p) for p in anchors + daemons)


def test_nodes_reach_each_other_over_tcp(make_cluster):
    cluster = make_cluster(3, start_daemons=False)
    server = cluster.popen(
        "n3", [sys.executable, "-c", "import socket;s=socket.create_server(('10.77.0.3',9099));"
               "c,_=s.accept();c.sendall(c.recv(5)[::-1])"],
    )
    try:
        client = (
            "import socket,time\n"
            "for _ in range(100):\n"
            "    try: c=socket.create_connection(('10.77.0.3',9099)); break\n"
            "    except OSError: time.sleep(0.05)\n"
            "c.sendall(b'hello'); print(c.recv(5).decode())"
        )
        out = cluster.run("n1", [sys.executable, "-c", client], capture_output=True, text=True, timeout=20)
        assert out.stdout.strip() == "olleh"
    finally:
        server.kill()
        server.wait()


def test_each_node_has_its_own_directories_and_identity(make_cluster):
    cluster = make_cluster(2, start_daemons=False)
    names = [
        cluster.run(n, ["cat", "/etc/gfvm/node.toml"], capture_output=True, text=True).stdout
        for n in ("n1", "n2")
    ]
    assert names == ['name = "n1"\n', 'name = "n2"\n']
    cluster.run("n1", ["touch", "/var/lib/gfvm/only-on-n1"], check=True)
    assert cluster.run("n2", ["test", "-e", "/var/lib/gfvm/only-on-n1"]).returncode == 1
    assert (cluster.dirs("n1").state / "only-on-n1").exists()


def test_daemons_answer_on_their_own_sockets(make_cluster):
    from gfvm import control

    cluster = make_cluster(2)
    pings = [control.call(cluster.control_socket(n), "ping") for n in ("n1", "n2")]
    assert [p["node"] for p in pings] == ["n1", "n2"]
    assert pings[0]["pid"] != pings[1]["pid"]
    assert all(p["cluster"] == cluster.name for p in pings)


def test_down_is_idempotent(root):
    name = unique_name()
    Cluster.up(1, name=name, start_daemons=False)
    Cluster.down(name)
    assert Cluster.down(name) == []
    assert leftovers(name) == []


def test_down_after_up_was_killed_midway(root):
    name = unique_name()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gfvm", "cluster", "up", "--nodes", "4", "--name", name],
        cwd=Path(__file__).parents[1], stdout=subprocess.PIPE, text=True,
    )
    # Kill it as soon as it has made its second node: some objects exist, others not yet.
    for line in proc.stdout:
        if "node n2" in line:
            break
    proc.kill()
    proc.wait()
    assert leftovers(name), "the killed run should have left something to clean"
    gfvm_cli("cluster", "down", "--name", name)
    assert leftovers(name) == []


def test_down_after_daemon_was_killed(make_cluster):
    cluster = make_cluster(2)
    victim = cluster.node("n1").daemon_pid
    os.kill(victim, signal.SIGKILL)
    assert sysutil.wait_gone([victim], 5) == []
    status = cluster.status()
    assert [n["daemon"] for n in status["nodes"]] == ["down", "up"]
    Cluster.down(cluster.name)
    assert leftovers(cluster.name) == []


def test_down_kills_every_process_of_the_node(make_cluster):
    cluster = make_cluster(1, start_daemons=False)
    child = cluster.popen("n1", ["setsid", "sleep", "300"])
    netns_id = sysutil.ns_inode(cluster.node("n1").netns_path)
    deadline = time.monotonic() + 10
    while child.pid not in sysutil.pids_in_netns(netns_id):  # nsenter joins right after spawn
        assert time.monotonic() < deadline
        time.sleep(0.01)
    Cluster.down(cluster.name)
    child.wait(timeout=10)
    assert leftovers(cluster.name) == []


def test_up_twice_is_refused(make_cluster):
    cluster = make_cluster(1, start_daemons=False)
    with pytest.raises(UsageError, match="already up"):
        Cluster.up(1, name=cluster.name, start_daemons=False)


@pytest.mark.parametrize("bad", ["", "UPPER", "toolongname", "a-b", "1x"])
def test_bad_cluster_names(bad):
    with pytest.raises(UsageError, match="cluster name"):
        Cluster.check_name(bad)


def test_exec_on_unknown_node_names_the_known_ones(make_cluster):
    cluster = make_cluster(2, start_daemons=False)
    proc = gfvm_cli("cluster", "exec", "--name", cluster.name, "n7", "--", "true", check=False)
    assert proc.returncode == 1
    assert "no node 'n7' (nodes: n1, n2)" in proc.stderr


def test_exec_passes_the_exit_status_through(make_cluster):
    cluster = make_cluster(1, start_daemons=False)
    proc = gfvm_cli("cluster", "exec", "--name", cluster.name, "n1", "--", "sh", "-c", "exit 7", check=False)
    assert proc.returncode == 7


def test_status_of_a_cluster_that_is_not_up():
    with pytest.raises(NotFound, match="no cluster named"):
        Cluster.load(unique_name())


PROBE = (
    "import socket,sys\n"
    "try: socket.create_connection((sys.argv[1], 9), timeout=1)\n"
    "except ConnectionRefusedError: sys.exit(0)\n"
    "except OSError: sys.exit(1)\n"
)


def reachable(cluster: Cluster, src: str, dst: str) -> bool:
    """A closed port answers with RST at once when the peer is reachable; silence means cut."""
    return cluster.run(src, [sys.executable, "-c", PROBE, cluster.node(dst).address]).returncode == 0


def test_link_down_cuts_only_that_node(make_cluster):
    cluster = make_cluster(3, start_daemons=False)
    assert reachable(cluster, "n1", "n3")
    cluster.link("n3", up=False)
    assert not reachable(cluster, "n1", "n3")
    assert reachable(cluster, "n1", "n2")
    cluster.link("n3", up=True)
    deadline = time.monotonic() + 5
    while not reachable(cluster, "n1", "n3"):
        assert time.monotonic() < deadline


def test_partition_cuts_one_pair_only(make_cluster):
    cluster = make_cluster(3, start_daemons=False)
    cluster.partition("n1", "n3")
    assert not reachable(cluster, "n1", "n3") and not reachable(cluster, "n3", "n1")
    assert reachable(cluster, "n1", "n2") and reachable(cluster, "n2", "n3")
    cluster.partition("n1", "n3", cut=False)
    assert reachable(cluster, "n1", "n3")


def rtt_ms(cluster: Cluster, src: str, dst: str, rounds: int = 20) -> float:
    """Median TCP connect time (SYN -> RST round trip) from src to a closed port on dst, in ms."""
    probe = (
        "import socket,sys,time,statistics\n"
        "ts=[]\n"
        f"for _ in range({rounds}):\n"
        "    t=time.perf_counter()\n"
        "    try: socket.create_connection((sys.argv[1], 9), timeout=5)\n"
        "    except ConnectionRefusedError: ts.append(time.perf_counter()-t)\n"
        "print(statistics.median(ts)*1000 if ts else -1)\n"
    )
    out = cluster.run(src, [sys.executable, "-c", probe, cluster.node(dst).address],
                      capture_output=True, text=True, check=True)
    return float(out.stdout)


def test_impair_delays_and_is_removed(make_cluster):
    cluster = make_cluster(2, start_daemons=False)
    assert rtt_ms(cluster, "n1", "n2") < 20
    cluster.impair("n1", delay_ms=60)
    assert rtt_ms(cluster, "n1", "n2", rounds=5) >= 55
    cluster.impair("n1")
    assert rtt_ms(cluster, "n1", "n2") < 20


def test_impair_loss_drops_packets(make_cluster):
    cluster = make_cluster(2, start_daemons=False)
    cluster.impair("n1", loss_pct=100)
    assert not reachable(cluster, "n1", "n2")
    cluster.impair("n1")
    assert reachable(cluster, "n1", "n2")
