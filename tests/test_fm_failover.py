"""A master's daemon dies (kill -9) in the middle of writes: nothing fsynced is lost, a replica
takes over and accepts writes, the old master comes back, resyncs and never serves stale data."""

from __future__ import annotations

import os
import signal

import pytest

from test_fm_harness import Cluster, Writer, check_records, page, wait_for


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path, 3, replicas=2, fm={"rereplicate_after": 120})
    yield c
    c.close()


def _replica_of(cluster, rel):
    w = cluster.nodes[0].where(rel)
    return next(n for n in cluster.nodes if n.name in w["members"] and n.name != w["master"]), w


def test_kill9_master_during_writes_then_promote_and_return(cluster):
    n1 = cluster["n1"]
    (n1.mount / "w").mkdir()
    writer = Writer(n1.mount / "w" / "f", every=4)
    writer.start()
    wait_for(lambda: writer.acked >= 64, 30, what="64 acknowledged records")
    replica, w0 = _replica_of(cluster, "w/f")
    n1.kill(signal.SIGKILL)
    writer.stop()
    acked = writer.acked
    assert acked >= 64

    # every fsynced record is readable from the replica (through the replica's own mount)
    wait_for(lambda: replica.where("w/f")["master"] == replica.name or replica.call(
        "fm.promote", {"path": "w/f", "node": replica.name}), 30, what="the replica to take over")
    data = (replica.mount / "w" / "f").read_bytes()
    assert check_records(data, acked) == []
    w1 = replica.where("w/f")
    assert w1["master"] == replica.name and w1["epoch"] > w0["epoch"]
    assert w1["members"]["n1"]["state"] == "outdated"

    # the new master accepts writes
    with open(replica.mount / "w" / "f", "r+b") as f:
        f.seek(0)
        f.write(page(0, salt=99))
        f.flush()
        os.fsync(f.fileno())

    # the old master comes back: it resyncs and never serves its stale copy
    n1.start()
    got = (n1.mount / "w" / "f").read_bytes()[:4096]
    assert got == page(0, salt=99)
    wait_for(lambda: "n1" in n1.where("w/f")["in_sync"], 30, what="n1 back in sync")
    data1 = (n1.mount / "w" / "f").read_bytes()
    assert data1[:4096] == page(0, salt=99)
    assert check_records(data1[4096:], 0) == []
    assert data1 == (replica.mount / "w" / "f").read_bytes()
