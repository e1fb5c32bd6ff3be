"""A chain of migrations n1 -> n2 -> n3 -> n1 of one workload, checked after every hop. With
R=3 every node holds a replica, so every hop is to a replica (pages read locally)."""

from __future__ import annotations

from migrate_support import mcluster_up, mworkload_bin, wait_for  # noqa: F401 (fixture)


def test_chain_n1_n2_n3_n1(mworkload_bin, tmp_path):
    with mcluster_up(mworkload_bin, tmp_path, replicas=3) as mc:
        p = mc.start("n1", mib=256, hot_mib=32, rate=20000)
        steps = p.client.status().steps
        for hop in ("n2", "n3", "n1"):
            source = p.node
            report = mc.migrate(p, hop)
            assert report["target"] == hop and report["source"] == source
            assert not report["remote"]
            pid = mc.wait_one_copy(p)
            assert mc.node_of_pid(pid) == hop
            assert mc.managed_on(p.id) == [hop]
            checked = p.client.verify()  # its own check of the whole region
            assert checked >= steps
            wait_for(lambda: p.client.status().steps > checked + 1000, 30, f"progress on {hop}")
            steps = p.client.status().steps
        p.client.finish(20000)
        assert p.client.wait_result(timeout=120).startswith("ok")
