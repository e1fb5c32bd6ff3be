"""RELIABILITY.md fault matrix rows that cut links (4: a node's link down, 5: a partition between
two nodes), on the namespace test cluster (gfvm.cluster: one network + mount namespace per node,
real gfvmd, real /gfvm mounts, traffic over veths and a bridge)."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from gfvm import control
from test_fm_harness import FAST, Writer, check_records, need_fuse, wait_for


class NsNode:
    """One namespace node seen from the test (mount reached through its anchor's root)."""

    def __init__(self, cluster, name):
        self.c = cluster
        self.name = name

    @property
    def mount(self):
        return f"/proc/{self.c.node(self.name).anchor_pid}/root/gfvm"

    def call(self, op, args=None, timeout=10):
        return control.call(self.c.control_socket(self.name), op, args or {}, timeout=timeout)

    def where(self, path):
        return self.call("fm.where", {"path": path})

    @property
    def log(self):
        return self.c.daemon_log(self.name)


@pytest.fixture
def ns(request):
    need_fuse()
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        pytest.skip("needs iproute2 and util-linux") if os.environ.get("CI") != "true" else pytest.fail("iproute2")
    from gfvm.cluster import Cluster

    name = f"f{os.getpid() % 100000:05d}{request.node.name[-2:].replace('_', 'x')}".lower()[:8]
    c = Cluster.up(3, name=name, replicas=3, start_daemons=False)
    try:
        section = "\n[fm]\n" + "".join(f"{k} = {v}\n" for k, v in {**FAST, "rereplicate_after": 120}.items())
        for n in c.nodes:
            toml = c.dirs(n).etc / "cluster.toml"
            toml.write_text(toml.read_text() + section)
        for n in c.nodes:
            c.start_daemon(n)
        for n in c.nodes:
            c.wait_daemon(n)
        nodes = {n: NsNode(c, n) for n in c.nodes}

        def stable():
            sts = [nd.call("fm.status") for nd in nodes.values()]
            return len({s["leader"] for s in sts}) == 1 and all(s["lease"] and s["leader"] for s in sts)

        wait_for(stable, 30, what="a metadata leader")
        yield c, nodes
    finally:
        Cluster.down(name)


def test_row4_isolated_master_stops_acknowledging_and_others_promote(ns):
    c, nodes = ns
    n1 = nodes["n1"]
    w = Writer(f"{n1.mount}/f", every=2, pause=0.005)
    w.start()
    wait_for(lambda: w.acked >= 32, 30, what="records")
    info = n1.where("f")
    c.link("n1", False)
    cut_acked = w.acked
    try:
        wait_for(lambda: nodes["n2"].where("f")["master"] in ("n2", "n3"), 30, what="promotion on n2/n3")
        time.sleep(2)
        # no write is acknowledged once n1 is cut off (one fsync batch may have been in flight)
        assert w.acked <= cut_acked + w.every, (cut_acked, w.acked)
        new = nodes[nodes["n2"].where("f")["master"]]
        after = new.where("f")
        assert after["epoch"] == info["epoch"] + 1
        assert check_records(open(f"{new.mount}/f", "rb").read(), w.acked) == []
    finally:
        c.link("n1", True)
        w.stop()
    # n1 comes back as a replica of the new master, resynced
    wait_for(lambda: n1.where("f")["master"] == after["master"], 30, what="n1 to learn the new master")
    wait_for(lambda: "n1" in new.where("f")["in_sync"], 30, what="n1 resynced")
    assert check_records(open(f"{n1.mount}/f", "rb").read(), w.acked) == []


def test_row5_partition_between_master_and_one_replica_no_failover(ns):
    c, nodes = ns
    n1, n3 = nodes["n1"], nodes["n3"]
    w = Writer(f"{n1.mount}/f", every=2, pause=0.005)
    w.start()
    wait_for(lambda: w.acked >= 32, 30, what="records")
    info = n1.where("f")
    c.partition("n1", "n3", True)
    try:
        before = w.acked
        wait_for(lambda: w.acked >= before + 32, 30, what="writes to go on with n1+n2")
        wait_for(lambda: n1.where("f")["members"]["n3"]["state"] == "outdated", 30, what="n3 outdated")
        time.sleep(FAST["failover_after"] * 2)
        now = nodes["n2"].where("f")
        assert now["master"] == "n1" and now["epoch"] == info["epoch"], now  # no failover
    finally:
        c.partition("n1", "n3", False)
    wait_for(lambda: "n3" in n1.where("f")["in_sync"], 30, what="n3 resynced after the heal")
    w.stop()
    assert w.error is None
    assert check_records(open(f"{n3.mount}/f", "rb").read(), w.acked) == []
