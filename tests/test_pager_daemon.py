"""The pager inside a real gfvmd on a namespace node: CLI, adopt errors, crashes, takeover."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from conftest import require_root
from pager_support import Workload, build_workload, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


@pytest.fixture(scope="module")
def workload_bin(tmp_path_factory):
    require_root()
    return build_workload(tmp_path_factory.mktemp("wl"))


@pytest.fixture
def node(make_cluster):
    return make_cluster(1)


def gfvm(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = cluster.run(
        "n1",
        [sys.executable, "-m", "gfvm", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
        cwd=REPO,
    )
    if check:
        assert proc.returncode == 0, f"gfvm {' '.join(args)}: {proc.stderr}"
    return proc


def status(cluster, gfvm_id: str) -> dict:
    return json.loads(gfvm(cluster, "status", gfvm_id, "--json").stdout)


def test_run_ls_status_flush_and_exit(node, workload_bin, tmp_path):
    wl = Workload(workload_bin, tmp_path, 1024)
    try:
        proc = gfvm(node, "run", "--name", "wl", "--", *wl.argv())
        gfvm_id = proc.stdout.strip()
        assert gfvm_id and "output:" in proc.stderr
        conn = wl.accept()
        conn.cmd("fill 0 1024 7")
        flushed = json.loads(gfvm(node, "flush", gfvm_id, "--json").stdout)
        assert flushed["pages"] >= 1024 or status(node, gfvm_id)["pages_in_file"] >= 1024
        st = status(node, gfvm_id)
        assert st["name"] == "wl" and st["node"] == "n1" and st["state"] == "running"
        assert st["spaces"][0]["asid"] == 2 and st["spaces"][0]["host_pid"] == st["pid"]
        assert st["managed_bytes"] >= 1024 * 4096
        assert st["rss"] >= 1024 * 4096
        assert st["pages_in_file"] >= 1024 and st["dirty_pages"] == 0
        assert os.path.exists(node.dirs("n1").host_path(__import__("pathlib").Path(st["log_path"])))
        listing = json.loads(gfvm(node, "ls", "--json").stdout)
        assert [p["id"] for p in listing] == [gfvm_id]
        assert "wl" in gfvm(node, "ls").stdout
        conn.send("exit 3")
        wait_for(lambda: status(node, gfvm_id)["state"].startswith("exited"), what="exit")
        assert status(node, gfvm_id)["state"] == "exited (status 3)"
    finally:
        wl.close()


def test_managed_process_does_not_inherit_the_daemons_oom_protection(node, workload_bin, tmp_path):
    # The systemd unit gives gfvmd a low OOM score; its workloads must stay ordinary targets.
    # (Lowering it needs CAP_SYS_RESOURCE, which this machine lacks, so raise it instead.)
    daemon_pid = node.node("n1").daemon_pid
    with open(f"/proc/{daemon_pid}/oom_score_adj", "w") as f:
        f.write("500")
    wl = Workload(workload_bin, tmp_path, 16)
    try:
        gfvm_id = gfvm(node, "run", "--", *wl.argv()).stdout.strip()
        wl.accept()
        pid = status(node, gfvm_id)["pid"]
        with open(f"/proc/{pid}/oom_score_adj") as f:
            assert f.read().strip() == "0"
    finally:
        wl.close()


def test_run_without_command_is_a_usage_error(node):
    proc = gfvm(node, "run", check=False)
    assert proc.returncode == 2 and "give the command" in proc.stderr


def test_adopt_unknown_pid(node):
    proc = gfvm(node, "adopt", "4194303", check=False)
    assert proc.returncode == 1 and "no such process" in proc.stderr


def test_adopt_kernel_thread(node):
    proc = gfvm(node, "adopt", "2", check=False)  # kthreadd
    assert proc.returncode == 1 and "kernel thread" in proc.stderr


def test_adopt_zombie(node):
    child = subprocess.Popen(["true"])
    wait_for(
        lambda: open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z",
        what="a zombie",
    )
    try:
        proc = gfvm(node, "adopt", str(child.pid), check=False)
        assert proc.returncode == 1 and "zombie" in proc.stderr
    finally:
        child.wait()


def test_adopt_traced_process_names_the_tracer(node):
    from gfvm import native

    sleeper = subprocess.Popen(["sleep", "60"])
    tracer = native.Tracer()
    try:
        tracer.stop_process(sleeper.pid)
        proc = gfvm(node, "adopt", str(sleeper.pid), check=False)
        assert proc.returncode == 1
        assert f"already being traced by pid {os.getpid()}" in proc.stderr
    finally:
        tracer.close()
        sleeper.kill()
        sleeper.wait()


def test_adopt_running_process(node, workload_bin, tmp_path):
    wl = Workload(workload_bin, tmp_path, 512)
    proc = subprocess.Popen(wl.argv())
    try:
        conn = wl.accept()
        conn.cmd("fill 0 512 4")
        out = gfvm(node, "adopt", str(proc.pid), "--name", "adopted")
        gfvm_id = out.stdout.strip()
        conn.cmd("random 100 5 1")
        gfvm(node, "flush", gfvm_id)
        st = status(node, gfvm_id)
        assert st["adopted"] and st["pid"] == proc.pid
        assert st["pages_in_file"] >= 512
        assert conn.cmd("verify") == "ok 512"
    finally:
        wl.close()
        proc.kill()
        proc.wait()


def test_process_killed_mid_flush_leaves_daemon_serving(node, workload_bin, tmp_path):
    wl = Workload(workload_bin, tmp_path, 16384)  # 64 MiB written continuously
    try:
        gfvm_id = gfvm(node, "run", "--", *wl.argv()).stdout.strip()
        conn = wl.accept()
        conn.cmd("fill 0 16384 1")
        conn.send("writeloop 5000")
        wait_for(lambda: status(node, gfvm_id)["pages_paged_out"] > 0, what="flushing")
        os.kill(status(node, gfvm_id)["pid"], signal.SIGKILL)
        wait_for(
            lambda: status(node, gfvm_id)["state"].startswith(("exited", "killed")),
            what="the kill to be noticed",
        )
        # the daemon still serves: a new managed process works
        wl2 = Workload(workload_bin, tmp_path, 64)
        try:
            gfvm(node, "run", "--", *wl2.argv())
            c2 = wl2.accept()
            c2.cmd("fill 0 64 2")
            assert c2.cmd("verify") == "ok 64"
        finally:
            wl2.close()
    finally:
        wl.close()


def _evicted_under(node, gfvm_id: str, limit: int) -> bool:
    """The process's RSS is under `limit` because pages were evicted (RSS alone reads 0 until
    the pager has published the tree's processes, which may come after a fill)."""
    s = status(node, gfvm_id)
    return s["pages_evicted"] > 0 and s["rss"] <= limit


def test_gfvmd_killed_blocks_then_takes_back(node, workload_bin, tmp_path):
    """With half of its pages evicted to the paging file, a process whose gfvmd dies must not read
    zeros: it waits, and the restarted gfvmd takes it back from the keeper and serves it."""
    wl = Workload(workload_bin, tmp_path, 8192)  # 32 MiB, limit 16 MiB
    try:
        gfvm_id = gfvm(node, "run", "--mem-limit", "16M", "--", *wl.argv()).stdout.strip()
        conn = wl.accept()
        conn.cmd("fill 0 8192 3")
        wait_for(lambda: _evicted_under(node, gfvm_id, 16 * MiB), timeout=30, what="eviction")
        time.sleep(0.5)  # let the last eviction finish: no injection in flight at the kill
        node.stop_daemon("n1", signal.SIGKILL)
        conn.send("verify")
        readable, _, _ = select.select([conn.sock], [], [], 1.5)
        assert not readable  # blocked on a missing page, not reading zeros
        node.start_daemon("n1")
        node.wait_daemon("n1")
        assert conn.f.readline().strip() == "ok 8192"
        st = status(node, gfvm_id)
        assert st["state"] == "running" and st["last_error"] is None
        conn.cmd("random 2000 4 9")
        assert conn.cmd("verify") == "ok 8192"
    finally:
        wl.close()


def _keeper_pid(cluster) -> int | None:
    """The keeper of node n1 (None if there is none): found among the processes of the node's
    own network namespace, never by name alone."""
    from gfvm.cluster import sysutil

    netns = sysutil.ns_inode(cluster.node("n1").netns_path)
    for pid in sysutil.pids_in_netns(netns):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"gfvm.pager.keeper" in f.read():
                    return pid
        except FileNotFoundError:
            continue
    return None


def test_process_killed_mid_fault_leaves_daemon_serving(node, workload_bin, tmp_path):
    wl = Workload(workload_bin, tmp_path, 8192)
    try:
        gfvm_id = gfvm(node, "run", "--mem-limit", "8M", "--", *wl.argv()).stdout.strip()
        conn = wl.accept()
        conn.cmd("fill 0 8192 3")
        wait_for(lambda: _evicted_under(node, gfvm_id, 8 * MiB), timeout=30, what="eviction")
        pid = status(node, gfvm_id)["pid"]
        conn.send("verify")  # faults pages back in from the paging file...
        time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)  # ... and dies while they are being served
        wait_for(
            lambda: status(node, gfvm_id)["state"].startswith(("exited", "killed")),
            what="the death to be noticed",
        )
        wl2 = Workload(workload_bin, tmp_path, 64)
        try:
            gfvm(node, "run", "--", *wl2.argv())
            assert wl2.accept().cmd("fill 0 64 1") == "ok"
        finally:
            wl2.close()
    finally:
        wl.close()


def test_keeper_killed_is_replaced_and_still_protects(node, workload_bin, tmp_path):
    wl = Workload(workload_bin, tmp_path, 8192)
    try:
        gfvm_id = gfvm(node, "run", "--mem-limit", "16M", "--", *wl.argv()).stdout.strip()
        conn = wl.accept()
        conn.cmd("fill 0 8192 5")
        wait_for(lambda: _evicted_under(node, gfvm_id, 16 * MiB), timeout=30, what="eviction")
        old = _keeper_pid(node)
        assert old
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: _keeper_pid(node) not in (None, old), timeout=10, what="a new keeper")
        time.sleep(0.5)  # the trees give it their uffds (posted jobs)
        node.stop_daemon("n1", signal.SIGKILL)
        conn.send("verify")
        readable, _, _ = select.select([conn.sock], [], [], 1.5)
        assert not readable  # the new keeper's copies keep the registrations: the process waits
        node.start_daemon("n1")
        node.wait_daemon("n1")
        assert conn.f.readline().strip() == "ok 8192"
    finally:
        wl.close()


def test_fork_while_gfvmd_is_down(node, workload_bin, tmp_path):
    wl = Workload(workload_bin, tmp_path, 1024)
    try:
        gfvm_id = gfvm(node, "run", "--", *wl.argv()).stdout.strip()
        conn = wl.accept()
        conn.cmd("fill 0 1024 6")
        gfvm(node, "flush", gfvm_id)
        node.stop_daemon("n1", signal.SIGKILL)
        conn.send("forkstay")
        readable, _, _ = select.select([conn.sock], [], [], 1.0)
        assert not readable  # fork() waits until someone reads the uffd's fork event
        node.start_daemon("n1")
        node.wait_daemon("n1")
        answer = conn.f.readline().strip()
        assert answer.startswith("ok")
        child = wl.accept()
        wait_for(lambda: len(status(node, gfvm_id)["spaces"]) == 2, what="the child to be tracked")
        child.cmd("random 100 7 7")
        assert child.cmd("verify") == "ok 1024" and conn.cmd("verify") == "ok 1024"
        flushed = json.loads(gfvm(node, "flush", gfvm_id, "--json").stdout)
        assert flushed["rejected"] == 0
    finally:
        wl.close()
