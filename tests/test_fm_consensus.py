"""The metadata log under cancellation: three File Managers in the test's own trio loop (as in
test_fm_api.py), their real Consensus objects, a fault point to hold an op in the middle of
being applied, and a cancel delivered right there.

An op the leader has applied locally must reach the followers: otherwise the leader's metadata
holds an op no other node ever gets, and the nodes disagree for good (seen as a rolled-back
migration whose source believed the target master of a file, and the target the source)."""

from __future__ import annotations

import json

import pytest
import trio

from gfvm.fm.consensus import LEADER
from gfvm.fm.meta import RECENT_REQUESTS, ROOT, MetaState
from test_fm_api import trio_cluster


async def _cancel_while_applying(op, held_on) -> None:
    """Runs `op()` and cancels it once node `held_on` (its Files) is inside applying a metadata
    op (held there for a second by the fault point)."""
    faults = held_on.fm.faults
    before = faults.hits.get("meta.before_effects", 0)
    faults.arm("meta.before_effects", "delay:1")
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            await op()

    async with trio.open_nursery() as n:
        n.start_soon(run)
        while faults.hits.get("meta.before_effects", 0) == before:
            await trio.sleep(0.005)
        scope.cancel()


async def _all_agree(nodes) -> None:
    """Every node caught up with the leader; their metadata is identical."""
    for files in nodes.values():
        await files.fm.consensus.sync()
    states = {name: (f.fm.consensus.last, f.fm.consensus.state.to_dict()) for name, f in nodes.items()}
    first = next(iter(states.values()))
    assert all(s == first for s in states.values()), {n: s[0] for n, s in states.items()}


async def test_a_submit_cancelled_after_the_leader_applied_it_still_reaches_every_node(tmp_path):
    async with trio_cluster(tmp_path) as nodes:
        leader = next(f for f in nodes.values() if f.fm.consensus.role == LEADER)
        await _cancel_while_applying(lambda: leader.makedirs("cancelled"), leader)
        await leader.makedirs("after")  # the next op builds on the cancelled one everywhere
        await _all_agree(nodes)
        for files in nodes.values():
            assert sorted(await files.listdir("")) == ["after", "cancelled"]


async def test_a_submit_cancelled_after_the_leader_applied_it_commits_without_another_op(tmp_path):
    async with trio_cluster(tmp_path) as nodes:
        leader = next(f for f in nodes.values() if f.fm.consensus.role == LEADER)
        c = leader.fm.consensus
        await _cancel_while_applying(lambda: leader.makedirs("cancelled"), leader)
        with trio.fail_after(5):  # the followers' acknowledgements move the commit point
            while c.commit < c.last:
                await c.wait_changed()
        await _all_agree(nodes)
        for files in nodes.values():
            assert await files.listdir("") == ["cancelled"]


async def test_a_submit_from_a_follower_cancelled_while_the_leader_applies_it_is_decided(tmp_path):
    """A follower's submit cancelled while the leader applies its op returns once the leader
    has answered: the op's fate is decided, and a read barrier right after sees it."""
    async with trio_cluster(tmp_path) as nodes:
        leader = next(f for f in nodes.values() if f.fm.consensus.role == LEADER)
        follower = next(f for f in nodes.values() if f is not leader)
        await _cancel_while_applying(lambda: follower.makedirs("cancelled"), leader)
        await follower.fm.consensus.sync()
        assert await follower.listdir("") == ["cancelled"]
        await _all_agree(nodes)


@pytest.mark.parametrize("where", ["leader", "follower"])
async def test_a_read_barrier_waits_for_the_op_in_flight_at_the_leader(tmp_path, where):
    """sync() while the leader's op waits for the followers' acknowledgements (each follower
    holds it 0.3 s, less than an election timeout) returns only once that op is committed and
    applied here: whoever re-reads after a cancelled or failed submit learns its fate."""
    async with trio_cluster(tmp_path) as nodes:
        leader = next(f for f in nodes.values() if f.fm.consensus.role == LEADER)
        followers = [f for f in nodes.values() if f is not leader]
        before = [f.fm.faults.hits.get("meta.before_effects", 0) for f in followers]
        for f in followers:
            f.fm.faults.arm("meta.before_effects", "delay:0.3")
        reader = leader if where == "leader" else followers[0]
        async with trio.open_nursery() as n:
            n.start_soon(leader.makedirs, "in-flight")
            while [f.fm.faults.hits.get("meta.before_effects", 0) for f in followers] == before:
                await trio.sleep(0.005)
            in_flight = leader.fm.consensus.last  # applied and offered there, not committed
            await reader.fm.consensus.sync()
            assert leader.fm.consensus.commit >= in_flight
            assert reader.fm.consensus.last >= in_flight
            assert await reader.listdir("") == ["in-flight"]


@pytest.mark.parametrize("op", ["mkdir", "remove"])
async def test_a_request_sent_again_after_its_answer_was_lost_is_applied_once(tmp_path, op):
    """The leader commits a follower's op but its answer is lost (an I/O error in its place):
    the follower sends the request again. It gets the first result, not the EEXIST or ENOENT of
    applying it a second time, and the op is applied once."""
    async with trio_cluster(tmp_path) as nodes:
        leader = next(f for f in nodes.values() if f.fm.consensus.role == LEADER)
        follower = next(f for f in nodes.values() if f is not leader)
        if op == "remove":
            await follower.makedirs("gone")
        before = leader.fm.consensus.last[1]
        answers = leader.fm.faults.hits.get("meta.before_answer", 0)
        leader.fm.faults.arm("meta.before_answer", "error")
        if op == "mkdir":
            entry = await follower.fm.mkdir(ROOT, "once", 0o700)
            assert entry.name == "once"
        else:
            await follower.remove("gone")
        # answered, the answer lost, sent again, answered again
        assert leader.fm.faults.hits.get("meta.before_answer", 0) == answers + 2
        assert leader.fm.consensus.last[1] == before + 1
        await _all_agree(nodes)
        for files in nodes.values():
            assert await files.listdir("") == (["once"] if op == "mkdir" else [])


def test_a_request_id_is_remembered_in_snapshots_and_forgotten_when_old():
    st = MetaState()
    for i in range(RECENT_REQUESTS + 5):
        op = {"op": "mkdir", "parent": ROOT, "name": f"d{i}", "mode": 0o700, "ino": st.next_ino,
              "now": 0, "rid": f"r{i}"}
        st.check(op)
        st.apply(op)
    again = MetaState.from_dict(json.loads(json.dumps(st.to_dict())))
    newest = f"r{RECENT_REQUESTS + 4}"
    want = {"ino": st.resolve(f"d{RECENT_REQUESTS + 4}").ino}
    assert again.answered(newest) == st.answered(newest) == want
    assert st.answered("r0") is None and again.answered("r4") is None
    assert again.answered("r5") is not None
