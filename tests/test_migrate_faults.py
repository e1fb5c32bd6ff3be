"""RELIABILITY.md rows 8 and 9: a fault at each step of a migration leaves exactly one live copy
of the process and loses nothing; an impaired network (delay, jitter, loss) only slows it down.

Each case arms a named fault point (gfvm/migrate/faults.py) on the source (n1) or the target,
migrates, restarts whatever gfvmd died, waits until exactly one runnable copy of the workload
exists, and has the workload check its whole memory there and keep going."""

from __future__ import annotations

import pytest

from gfvm.control import RemoteError
from gfvm.errors import GfvmError
from gfvm.migrate.source import FILES
from migrate_support import logs_on_failure, mcluster_up, mworkload_bin, wait_for  # noqa: F401

SOURCE_POINTS = [
    "migrate.after_pick", "migrate.after_preflush", "migrate.after_freeze",
    "migrate.after_final_flush", "migrate.after_release", "migrate.after_dump",
    "migrate.after_images", "migrate.before_handoff", "migrate.after_handoff",
    "migrate.after_restart",
]
TARGET_POINTS = [
    "migrate.target.before_restore", "migrate.target.after_restore",
    "migrate.target.after_adopt", "migrate.target.after_run",
]
#: where the process must end up: after the commit point it runs on the target
ENDS_ON_TARGET = {"migrate.after_restart", "migrate.target.after_run"}
#: crashes every run tries; the others are @long
CRASH_QUICK = {"migrate.after_release", "migrate.after_handoff", "migrate.after_restart",
               "migrate.target.after_restore", "migrate.target.after_run"}


@pytest.fixture(scope="module")
def mc(mworkload_bin, tmp_path_factory):
    with mcluster_up(mworkload_bin, tmp_path_factory.mktemp("faults")) as mc:
        yield mc


def cases():
    for point in SOURCE_POINTS + TARGET_POINTS:
        yield pytest.param(point, "error", id=f"{point}-error")
        marks = () if point in CRASH_QUICK else (pytest.mark.long,)
        yield pytest.param(point, "crash", id=f"{point}-crash", marks=marks)


@pytest.mark.parametrize("point,action", list(cases()))
def test_fault_at_each_step_leaves_one_live_copy(mc, point, action):
    mc.ensure_daemons()
    p = mc.start("n1", mib=32, hot_mib=4)
    try:
        with logs_on_failure(mc):
            check_fault(mc, p, point, action)
    finally:
        for n in mc.nodes:
            if mc.c.daemon_alive(n):
                mc.call(n, "migrate.fault", {"name": point, "action": ""})
        mc.kill(p)


def check_fault(mc, p, point: str, action: str) -> None:
    target = next(n for n in mc.where(p)["in_sync"] if n != "n1")
    steps = p.client.status().steps
    faulty = target if point.startswith("migrate.target.") else "n1"
    mc.call(faulty, "migrate.fault", {"name": point, "action": action})
    try:
        mc.migrate(p, target)
        outcome = "ok"
    except (RemoteError, GfvmError) as exc:
        outcome = str(exc)
    # gfvmds that died come back (their keepers held the processes' memory meanwhile)
    mc.ensure_daemons()
    pid = mc.wait_one_copy(p, timeout=90)
    node = mc.node_of_pid(pid)
    expected = target if point in ENDS_ON_TARGET else "n1"
    assert node == expected, f"{point}={action}: runs on {node}, not {expected} ({outcome})"
    mc.moved(p, node)
    mc.wait_managed_only_on(p.id, node, 60)
    # its files are mastered where it runs, so it depends on no other node (a target that
    # crashed after the commit point takes them back from the source once it is in sync)
    # (ckpt and owner exist once a migration got that far)
    def masters() -> set[str]:
        out = set()
        for name in (*FILES, "ckpt", "owner"):
            try:
                out.add(mc.where(p, name)["master"])
            except RemoteError as exc:
                if exc.kind != "not-found":
                    raise
        return out

    wait_for(lambda: masters() == {node}, 60, f"{node} to master its files")
    assert p.client.verify() >= steps  # its whole memory, as the process sees it
    now = p.client.status().steps
    wait_for(lambda: p.client.status().steps > now + 500, 30, "progress")
    # and it can still migrate (nothing left half-done), once another node holds an in-sync
    # copy of every file `--to auto` looks at (a node that crashed resyncs first; files written
    # while it was down may have got a new member meanwhile, the others not)
    def another_holder() -> set:
        return set.intersection(*(set(mc.where(p, f)["in_sync"]) for f in FILES)) - {node}

    wait_for(another_holder, 90, "another node with an in-sync copy of the paging file")
    mc.migrate(p, "auto")
    assert p.client.verify() > now


def test_a_restore_failing_during_the_handoff_takes_back_the_files_that_moved(mc):
    """The target's restore fails while the source is still handing the files over (one
    promotion held for 5 s just after its commit, so the others are done and it has moved):
    the rollback cancels the handoff half-way, and must take back every file that moved before
    it thaws the process on the source (it once took back nothing: the handoff had not
    finished, and the files it had moved stayed mastered by the target)."""
    mc.ensure_daemons()
    p = mc.start("n1", mib=32, hot_mib=4)
    target = next(n for n in mc.where(p)["in_sync"] if n != "n1")
    try:
        with logs_on_failure(mc):
            mc.call(target, "migrate.fault", {"name": "migrate.target.after_adopt", "action": "error"})
            mc.call("n1", "fm.fault", {"name": "promote.after_commit", "action": "delay:5"})
            with pytest.raises((RemoteError, GfvmError), match="Rolled back"):
                mc.migrate(p, target)
            pid = mc.wait_one_copy(p, timeout=60)
            assert mc.node_of_pid(pid) == "n1"
            masters = {name: mc.where(p, name)["master"] for name in (*FILES, "ckpt", "owner")}
            assert set(masters.values()) == {"n1"}, masters
            assert p.client.verify() > 0
    finally:
        mc.call(target, "migrate.fault", {"name": "migrate.target.after_adopt", "action": ""})
        mc.call("n1", "fm.fault", {"name": "promote.after_commit", "action": ""})
        mc.kill(p)


@pytest.mark.parametrize("delay_ms,jitter_ms,loss_pct", [(20, 10, 1), (100, 50, 10)])
def test_impaired_network_during_migration_leaves_one_intact_copy(mc, delay_ms, jitter_ms,
                                                                  loss_pct):
    """Row 9: delay, jitter (reordering) and loss on the source's link during the migration
    (the second case: RELIABILITY.md's figures). Through this machine's user-space packet
    impairer the File Manager may drop the replica (no ack in time), and the migration then
    refuses or rolls back. Whatever happens: exactly one live copy, where the outcome says (the
    target if it succeeded, the source if it failed), with its whole memory intact."""
    mc.ensure_daemons()
    p = mc.start("n1", mib=16, hot_mib=1, rate=500)
    try:
        with logs_on_failure(mc):
            mc.c.impair("n1", delay_ms=delay_ms, jitter_ms=jitter_ms, loss_pct=loss_pct, seed=7)
            try:
                report = mc.migrate(p, "auto")
                outcome = report["target"]
            except (RemoteError, GfvmError) as exc:
                outcome = f"failed: {exc}"
            finally:
                mc.c.impair("n1")
            print(f"outcome under {delay_ms}+-{jitter_ms} ms, {loss_pct} % loss: {outcome}")
            pid = mc.wait_one_copy(p, timeout=120)
            node = mc.node_of_pid(pid)
            assert outcome == node or outcome.startswith("failed") and node == "n1", outcome
            mc.moved(p, node)
            assert p.client.verify() > 0
    finally:
        mc.kill(p)
