"""What a migrated process keeps: threads, a child process, an open file and pipe contents,
file mmaps, signal handlers, a listening TCP socket; and afterwards it can discard, remap and
fork memory and migrate again. The process is tests/criu_workload.c run under `gfvm run` on a
3-node namespace cluster with real gfvmds; each check is the workload's own."""

from __future__ import annotations

import pytest

from criu_support import criu_env, workload_bin  # noqa: F401 (fixtures)
from migrate_support import mcluster_up, mworkload_bin  # noqa: F401 (fixture)
from gfvm.migrate import workload as wl


@pytest.fixture(scope="module")
def mc(mworkload_bin, tmp_path_factory):
    with mcluster_up(mworkload_bin, tmp_path_factory.mktemp("feat")) as mc:
        yield mc


@pytest.fixture
def feature_proc(mc, workload_bin, tmp_path):
    """Factory: a criu_workload under gfvm on n1 (killed after the test)."""
    made = []

    def start(*, mib=16, threads=1, child=False):
        statedir = tmp_path / f"cw{len(made)}"
        statedir.mkdir()
        cmd = [str(workload_bin), str(statedir), str(mib), "7", str(threads), "1" if child else "0"]
        summary = mc.call("n1", "run", {"cmd": cmd})
        client = wl.WorkloadClient(statedir, mc.c.node("n1").netns_path)
        client.wait_ready(timeout=60)
        made.append((summary["id"], client))
        return summary["id"], client

    yield start
    for gfvm_id, _client in made:
        for node in mc.managed_on(gfvm_id):
            status = mc.call(node, "status", {"id": gfvm_id})
            import os
            import signal

            try:
                os.kill(status["init_pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass


def migrate(mc, gfvm_id, client, source="n1", to="auto"):
    report = mc.call(source, "migrate", {"id": gfvm_id, "to": to})
    client.netns = mc.c.node(report["target"]).netns_path
    assert client.command("ping") == "pong 2"  # same pid inside its namespace
    return report


def test_multithreaded_process(mc, feature_proc):
    gfvm_id, client = feature_proc(threads=4)
    assert client.command("threads") == "ok 4"
    migrate(mc, gfvm_id, client)
    assert client.command("threads") == "ok 4"  # every thread runs on the target
    assert client.command("hot").startswith("ok")
    assert client.command("verify").startswith("ok")


def test_process_with_a_child(mc, feature_proc):
    gfvm_id, client = feature_proc(child=True)
    assert client.command("child").startswith("child ok")
    report = migrate(mc, gfvm_id, client)
    assert set(report["new_pids"]) == {"1", "2", "3"}  # tini, the workload, its child
    assert client.command("child").startswith("child ok")  # the child checks its own memory
    assert client.command("verify").startswith("ok")


def test_open_file_pipe_and_file_mmaps(mc, feature_proc):
    gfvm_id, client = feature_proc()
    assert client.command("files") == "ok" and client.command("pipe") == "ok"
    migrate(mc, gfvm_id, client)
    assert client.command("files") == "ok"  # offset, content, shared and private file maps
    assert client.command("pipe") == "ok"  # the bytes left in the pipe


def test_signal_handlers(mc, feature_proc):
    gfvm_id, client = feature_proc()
    assert client.command("signal").startswith("ok")
    migrate(mc, gfvm_id, client)
    assert client.command("signal").startswith("ok")  # SIGUSR1 handled, SIGUSR2 still ignored


def test_listening_socket(mc, feature_proc):
    gfvm_id, client = feature_proc()
    port = client.port
    report = migrate(mc, gfvm_id, client)
    # the same port now answers in the target's network namespace, and no longer on n1
    assert client.port == port
    assert client.command("verify").startswith("ok")
    other = wl.WorkloadClient(client.statedir, mc.c.node("n1").netns_path)
    with pytest.raises(OSError):
        other.command("ping", timeout=5)
    assert report["target"] != "n1"


def test_memory_changes_after_a_migration_and_a_second_migration(mc, feature_proc):
    gfvm_id, client = feature_proc(mib=32)
    report = migrate(mc, gfvm_id, client)
    assert client.command("discard") == "ok"  # MADV_DONTNEED: zeros from now on
    assert client.command("forkcheck") == "ok"
    assert client.command("remap").startswith("ok")  # mremap of the whole region
    back = migrate(mc, gfvm_id, client, source=report["target"], to="n1")
    assert back["target"] == "n1"
    assert client.command("verify").startswith("ok")  # discarded half still zeros, rest intact
    assert client.command("forkcheck") == "ok"
