"""Right after start-up, /gfvm waits for the metadata leader's lease instead of answering EIO."""

from __future__ import annotations

import os

from test_fm_harness import Cluster, wait_for

# The default timing (a 3 s lease): a new leader may act only one lease after its election, so
# a command issued as soon as the daemons answer runs into that window.
DEFAULT_TIMING = {"heartbeat": 0.5, "lease": 3.0, "rpc_timeout": 2.0, "write_timeout": 3.0,
                  "failover_after": 8.0, "io_timeout": 20.0}


def test_first_commands_right_after_start_wait_for_the_lease_and_succeed(tmp_path):
    c = Cluster(tmp_path, 3, replicas=2, fm=DEFAULT_TIMING, start=False)
    try:
        for node in c.nodes:
            node.start(wait=False)
        for node in c.nodes:  # each answers its first ping: /gfvm is mounted
            wait_for(lambda node=node: os.path.ismount(node.mount) and node.call("ping", timeout=2),
                     20, interval=0.02, what=f"{node.name} to answer a ping")
        n1, n2, n3 = c.nodes
        (n1.mount / "first").mkdir()  # a lookup that must be confirmed with the leader, then mkdir
        data = os.urandom(3 << 20)
        with open(n1.mount / "first" / "f", "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        (n3.mount / "from-n3").write_bytes(b"n3 was first too")
        assert (n2.mount / "first" / "f").read_bytes() == data
        assert (n2.mount / "from-n3").read_bytes() == b"n3 was first too"
    finally:
        c.close()
