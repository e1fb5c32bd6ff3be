"""`gfvm migrate --to auto` end to end on 3 namespace nodes with real gfvmds and real CRIU: the
target holds a replica, the workload's own check passes there and it keeps going; the source's
gfvmd and link die right after the restart and the workload still completes correctly."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from migrate_support import mcluster_up, mworkload_bin, wait_for  # noqa: F401 (fixture)


def test_migrate_auto_to_a_replica_then_the_source_dies(mworkload_bin, tmp_path):
    with mcluster_up(mworkload_bin, tmp_path) as mc:
        p = mc.start("n1", mib=256, hot_mib=32, rate=20000)
        time.sleep(1)
        before = p.client.status()
        replicas = set(mc.where(p)["in_sync"]) - {"n1"}
        progress: list = []
        report = mc.migrate(p, "auto", progress=progress)

        assert report["target"] in replicas, report
        assert not report["remote"]
        assert mc.managed_on(p.id) == [report["target"]]
        pid = mc.wait_one_copy(p)
        assert mc.node_of_pid(pid) == report["target"]
        assert p.client.verify() >= before.steps  # its own check of all 256 MiB
        after = p.client.status()
        wait_for(lambda: p.client.status().steps > after.steps + 1000, 30, "progress on the target")
        # the report: one progress line per step, then the numbers
        assert len(progress) >= 9, progress
        breakdown = report["freeze_breakdown_s"]
        for step in ("final_flush", "memory_release", "dump", "image_replication", "handoff",
                     "restore"):
            assert breakdown[step] > 0, breakdown
        assert report["freeze_s"] >= sum(v for v in breakdown.values() if v > 0) * 0.99
        assert report["written_during_freeze"]["checkpoint_bytes"] > 0
        assert report["network_bytes_during_freeze"] > 0
        # all 256 MiB left the source's memory: cold pages before the freeze, hot ones during
        assert report["pages_released"] + report["released_early"]["pages"] >= 65536
        assert set(report["new_pids"]) == {"1", "2"} and report["new_pids"]["2"] == pid

        # The source fails right after the restart: gfvmd killed, link cut.
        mc.c.stop_daemon("n1", signal.SIGKILL)
        mc.c.link("n1", False)
        p.client.finish(60000)
        assert p.client.wait_result(timeout=180).startswith("ok"), p.client.result()


REPO = str(Path(__file__).resolve().parents[1])


def test_cli_prints_the_report(mworkload_bin, tmp_path):
    """`gfvm migrate ID` inside the source node: progress lines, then the report; --json too."""
    with mcluster_up(mworkload_bin, tmp_path) as mc:
        p = mc.start("n1", mib=32, hot_mib=4)
        out = mc.c.run("n1", [sys.executable, "-P", "-m", "gfvm", "migrate", p.id],
                       capture_output=True, text=True, cwd="/",
                       env={"PYTHONPATH": REPO})
        assert out.returncode == 0, out.stderr
        assert "final flush" in out.stdout and "frozen for" in out.stdout, out.stdout
        assert "new pids on" in out.stdout
        target = out.stdout.split("moved n1 -> ")[1].split()[0]
        mc.moved(p, target)
        assert p.client.verify() > 0
        out = mc.c.run(target, [sys.executable, "-P", "-m", "gfvm", "migrate", p.id, "--to", "n1",
                                "--json"], capture_output=True, text=True, cwd="/",
                       env={"PYTHONPATH": REPO})
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["target"] == "n1"
        mc.moved(p, "n1")
        assert p.client.verify() > 0
