"""Every way `gfvm migrate` says no, with a clear message and nothing changed: unknown or
unmanaged process, target = source, unknown node, a target without a replica (and what
--allow-remote does instead), no alive replica holder, two migrations of one process at once,
the process exiting during the migration, a target without enough memory or disk."""

from __future__ import annotations

import re
import signal
import threading
import time

import pytest

from gfvm.config import ClusterConfig
from gfvm.control import RemoteError
from migrate_support import mcluster_up, mworkload_bin, wait_for  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def mc(mworkload_bin, tmp_path_factory):
    with mcluster_up(mworkload_bin, tmp_path_factory.mktemp("refuse")) as mc:
        yield mc


@pytest.fixture
def proc(mc):
    """A small workload on n1 (killed afterwards); daemons a test killed are restarted first."""
    mc.ensure_daemons()
    p = mc.start("n1", mib=16, hot_mib=2)
    yield p
    mc.kill(p)


def refused(mc, node, args, kind=None) -> str:
    with pytest.raises(RemoteError) as info:
        mc.call(node, "migrate", args)
    if kind is not None:
        assert info.value.kind == kind, str(info.value)
    return str(info.value)


def unchanged(mc, p) -> None:
    """Nothing happened: the process runs on n1 only, unfrozen, its memory intact."""
    assert mc.managed_on(p.id) == ["n1"]
    assert mc.node_of_pid(mc.wait_one_copy(p, timeout=10)) == "n1"
    assert p.client.verify() > 0


def test_unknown_id(mc, proc):
    msg = refused(mc, "n1", {"id": "pnothere"}, "not-found")
    assert "no managed process 'pnothere'" in msg
    unchanged(mc, proc)


def test_unknown_pid(mc, proc):
    msg = refused(mc, "n1", {"pid": 4 << 20}, "not-found")
    assert "there is no process" in msg


def test_unmanaged_pid(mc, proc):
    anchor = mc.c.node("n1").anchor_pid  # a process of the node that gfvm does not manage
    msg = refused(mc, "n1", {"pid": anchor}, "not-found")
    assert f"process {anchor} is not managed by gfvm" in msg


def test_pid_of_a_managed_process_is_accepted_as_well(mc, proc):
    status = mc.call("n1", "status", {"id": proc.id})
    report = mc.call("n1", "migrate", {"pid": status["pid"]})
    assert report["id"] == proc.id
    mc.moved(proc, report["target"])
    assert proc.client.verify() > 0


def test_target_is_the_source(mc, proc):
    msg = refused(mc, "n1", {"id": proc.id, "to": "n1"}, "usage")
    assert "the target must be another node" in msg
    unchanged(mc, proc)


def test_unknown_target_node(mc, proc):
    msg = refused(mc, "n1", {"id": proc.id, "to": "n9"}, "not-found")
    assert "unknown node 'n9'" in msg
    unchanged(mc, proc)


def non_replica(mc, p) -> str:
    members = set(mc.where(p)["members"])
    return next(n for n in mc.nodes if n not in members)


def test_target_without_a_replica_is_refused(mc, proc):
    other = non_replica(mc, proc)
    msg = refused(mc, "n1", {"id": proc.id, "to": other}, "usage")
    assert f"{other} holds no in-sync replica" in msg and "--allow-remote" in msg
    unchanged(mc, proc)


def test_allow_remote_reads_pages_over_the_network(mc, proc):
    """The Flushing baseline: the target has no copy; the source stays master and serves."""
    other = non_replica(mc, proc)
    report = mc.migrate(proc, other, allow_remote=True)
    assert report["target"] == other and report["remote"]
    assert "network" in report["why"]
    assert proc.client.verify() > 0  # every page came over the network, checked
    assert mc.where(proc)["master"] == "n1"  # no handoff: n1 still holds the files


def test_no_alive_replica_holder(mc, proc):
    replica = next(n for n in mc.where(proc)["in_sync"] if n != "n1")
    mc.c.stop_daemon(replica, signal.SIGKILL)

    def replica_dead():
        return replica not in mc.call("n1", "fm.where", {"path": f"procs/{proc.id}/index"})[
            "members"] or not mc.call("n1", "fm.where", {"path": f"procs/{proc.id}/index"})[
            "members"][replica]["alive"]

    wait_for(replica_dead, 30, f"n1 to see {replica} dead")
    msg = refused(mc, "n1", {"id": proc.id}, "unavailable")
    assert "no alive node holds an in-sync replica" in msg and "--allow-remote" in msg
    unchanged(mc, proc)


def test_two_migrations_of_one_process_at_once(mc, proc):
    mc.call("n1", "migrate.fault", {"name": "migrate.after_preflush", "action": "delay:3"})
    first: dict = {}

    def run_first():
        try:
            first["report"] = mc.call("n1", "migrate", {"id": proc.id})
        except Exception as exc:  # noqa: BLE001 - checked below
            first["error"] = exc

    t = threading.Thread(target=run_first)
    t.start()
    try:
        wait_for(lambda: proc.id in mc.call("n1", "migrate.state")["outgoing"], 20, "the first")
        msg = refused(mc, "n1", {"id": proc.id}, "usage")
        assert "already being migrated" in msg
    finally:
        t.join(120)
    assert "report" in first, first.get("error")
    mc.moved(proc, first["report"]["target"])
    assert proc.client.verify() > 0


def test_process_exits_during_the_migration(mc, proc):
    mc.call("n1", "migrate.fault", {"name": "migrate.after_pick", "action": "delay:2"})
    result: dict = {}

    def run():
        try:
            result["report"] = mc.call("n1", "migrate", {"id": proc.id})
        except RemoteError as exc:
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    wait_for(lambda: proc.id in mc.call("n1", "migrate.state")["outgoing"], 20, "the migration")
    proc.client.command("exit")
    t.join(60)
    err = result.get("error")
    assert err is not None, result
    assert "exited during the migration" in str(err)
    for node in mc.nodes:  # the target dropped its reservation
        assert proc.id not in mc.call(node, "migrate.state")["incoming"] or mc.call(
            node, "migrate.state")["incoming"][proc.id]["phase"] != "prepared"
    assert mc.copies(proc) == []


def set_section(mc, section: str, values: dict) -> None:
    """Writes [section] into every node's cluster.toml and restarts every gfvmd."""
    for node in mc.nodes:
        path = mc.c.dirs(node).etc / "cluster.toml"
        cfg = ClusterConfig.parse(path.read_text())
        cfg.sections[section] = values
        path.write_text(cfg.to_toml())
    for node in mc.nodes:
        mc.c.stop_daemon(node)
        mc.c.start_daemon(node)
    mc.wait_ready()


@pytest.mark.parametrize("key,what", [("memory_reserve_mib", "free memory"),
                                      ("disk_reserve_mib", "free disk")])
def test_target_without_enough_memory_or_disk(mworkload_bin, tmp_path, key, what):
    with mcluster_up(mworkload_bin, tmp_path) as mc:
        set_section(mc, "migrate", {key: 1 << 30})  # keep 1 PiB free: no node qualifies
        p = mc.start("n1", mib=16, hot_mib=2)
        with pytest.raises(RemoteError) as info:
            mc.call("n1", "migrate", {"id": p.id})
        msg = str(info.value)
        assert "no node can take the process" in msg and what in msg, msg
        assert re.search(r"n[23] has \d+ MiB of " + what, msg), msg
        unchanged(mc, p)
