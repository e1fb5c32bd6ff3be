"""Replicated metadata: every node applies the same metadata ops in the same order (Raft-lite).

Why this shape: /gfvm must show one tree on every node, and every file's configuration (epoch,
master, in-sync members) must change only with a majority's agreement (RELIABILITY.md: promotion
= epoch+1 persisted by a majority; at most one master per epoch). One small replicated log of
metadata ops gives both, with the whole cluster as the voters (the third node of a 3-node
cluster is thereby the witness of every R=2 file).

Protocol (Raft's election and commit rules; the log is the state plus at most one pending op):
- Terms and votes are persisted before they are acted on. A node votes for a candidate whose last
  (term, version) is at least its own, once per term; a node that heard from a live leader within
  `lease` ignores candidates (leader stickiness), which also makes the leader lease below sound.
- The leader handles one op at a time: it checks it (`MetaState.check`), applies and persists it
  (version + 1), sends it to every follower and reports success once a majority (itself
  included) has persisted it. A new leader first commits a no-op of its own term.
- A follower applies an op only on top of the exact (term, version) the leader names as its
  predecessor; anything else (behind, or holding an uncommitted op of an old term) gets the
  leader's whole state (`MetaInstall`), which is small.

Leases (who may act on its local metadata): the leader holds authority while a majority
acknowledged its heartbeats sent within `lease`. Another node holds a lease for `lease` from the
moment it *sent* a heartbeat the leader answered with a grant; the leader grants only with
authority, only to a node whose metadata includes every committed op, and only once `lease` has
passed since it was elected (so leases granted by its predecessor have run out). Consequence used
by the File Manager: once an op is committed, any node still acting on the state before it stops
within `lease` (nodes share CLOCK_MONOTONIC rates; `lease` includes a margin).

Concurrency: one trio task applies ops at a time (`_apply_lock`); listeners (`on_applied`,
`on_installed`) run under it, in version order, before the op is acknowledged.

Cancellation: applying an op (log, state, listeners, `last`) and, on the leader, offering it to
the followers run shielded, so a cancelled caller never leaves a node whose state holds an op
its `last` does not count (that node would take its next op under the same version and stay
different from the others for good). The commit point moves on with the followers'
acknowledgements, whether or not the submitter still waits. A follower's submit, once sent,
waits for the leader's answer before a cancel takes effect. So when a cancelled `submit`
returns, its op is committed, refused, or in flight at the leader, and `sync` (which waits for
the op in flight at the leader) tells which: callers that must know re-read after it.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import secrets
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from gfvm.errors import GfvmError, Unavailable
from gfvm.fm import messages as m
from gfvm.fm.faults import Faults
from gfvm.fm.meta import MetaError, MetaState
from gfvm.fm.metalog import MetaLog

log = logging.getLogger(__name__)

FOLLOWER, CANDIDATE, LEADER = "follower", "candidate", "leader"
Version = tuple[int, int]  # (term, version)


@dataclass(frozen=True)
class Timing:
    """Failure-detection and lease timing of the File Manager ([fm] in cluster.toml)."""

    heartbeat: float = 0.5  # every node -> every node
    lease: float = 3.0  # see the module header
    rpc_timeout: float = 2.0  # one request/answer between nodes
    write_timeout: float = 3.0  # a member that has not acknowledged a frame by then is dropped
    failover_after: float = 8.0  # a master silent this long loses its files to a replica
    rereplicate_after: float = 30.0  # a member down this long is replaced by another node
    io_timeout: float = 20.0  # how long a read or write waits for an up-to-date copy before EIO

    @classmethod
    def from_section(cls, section: dict | None) -> "Timing":
        section = dict(section or {})
        kw = {}
        for name in cls.__dataclass_fields__:
            if name in section:
                v = section[name]
                if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                    from gfvm.errors import ConfigError

                    raise ConfigError(f"[fm] {name} must be a positive number, not {v!r}")
                kw[name] = float(v)
        t = cls(**kw)
        if t.failover_after <= t.lease:
            from gfvm.errors import ConfigError

            raise ConfigError("[fm] failover_after must be longer than lease")
        return t


#: election timeouts are drawn from [1, 2] x this many leases
ELECTION_LEASES = 1.5


class NotLeader(Unavailable):
    pass


class Consensus:
    """This node's replica of the metadata log. See the module header."""

    def __init__(
        self,
        node: str,
        nodes: list[str],
        metalog: MetaLog,
        timing: Timing,
        net,
        *,
        prepare: Callable[[dict], dict],
        on_applied: Callable[[int, dict, dict], Awaitable[None]],
        on_installed: Callable[[], Awaitable[None]],
        faults: Faults | None = None,
    ) -> None:
        self.node = node
        self.nodes = sorted(nodes)
        self.others = [n for n in self.nodes if n != node]
        self.majority = len(self.nodes) // 2 + 1
        self.metalog = metalog
        self.timing = timing
        self.net = net
        self.prepare = prepare
        self.on_applied = on_applied
        self.on_installed = on_installed
        self.faults = faults or Faults()
        state, last, term, voted = metalog.load()
        self.state: MetaState = state
        self.last: Version = last
        self.term = term
        self.voted_for: str | None = voted
        self._vote_lock = trio.Lock()
        self.commit: Version = last if not self.others else (0, 0)
        self.role = FOLLOWER
        self.leader: str | None = None
        self.leader_contact = -1e9  # when we last heard from a leader (trio clock)
        self.leader_since = 0.0
        self.lease_until = -1e9  # followers: granted by the leader
        self._acks: dict[str, float] = {}  # leader: send time of the latest heartbeat each acked
        self._follower_last: dict[str, Version] = {}
        self._pending: tuple[Version, Version, bytes] | None = None  # (prev, this, op json)
        self._apply_lock = trio.Lock()
        self._submit_lock = trio.Lock()
        self._changed = trio.Event()  # set whenever last/commit/role change
        self._wake_replicators = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._leader_scope: trio.CancelScope | None = None

    # -- small helpers --

    def _now(self) -> float:
        return trio.current_time()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def lease_valid(self) -> bool:
        """May this node act on its local metadata now (see the module header)? Never blocks."""
        now = self._now()
        if self.role == LEADER:
            return now < self.authority_until() and now >= self.leader_since + self.timing.lease
        return now < self.lease_until

    def authority_until(self) -> float:
        if not self.others:
            return float("inf")
        times = sorted(list(self._acks.values()) + [self._now()], reverse=True)
        if len(times) < self.majority:
            return -1e9
        return times[self.majority - 1] + self.timing.lease

    async def _persist_vote(self) -> None:
        # One save at a time, each writing the (term, vote) current when it starts: concurrent
        # callers (an election and a vote request) could otherwise race on the file and let an
        # older term land last, and Raft's safety rests on the persisted vote never going back.
        async with self._vote_lock:
            await trio.to_thread.run_sync(self.metalog.save_vote, self.term, self.voted_for)

    async def _set_term(self, term: int, voted_for: str | None = None) -> None:
        if term > self.term:
            self.term = term
            self.voted_for = voted_for
            await self._persist_vote()
            if self.role != FOLLOWER:
                self._become_follower()

    def _become_follower(self) -> None:
        if self.role == LEADER:
            log.info("metadata: %s steps down in term %d", self.node, self.term)
        self.role = FOLLOWER
        if self._leader_scope is not None:
            self._leader_scope.cancel()
            self._leader_scope = None
        self._notify()

    # -- service --

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if not self.others:
                await self._become_leader()
            else:
                nursery.start_soon(self._election_loop)
            task_status.started()
            await trio.sleep_forever()

    #: set by the File Manager: the Membership (who hears whom), for leader placement
    membership = None
    _no_stand_until = 0.0

    def _better_connected(self) -> str | None:
        """A live follower that hears more nodes than we do (after a partial partition), or None."""
        ms = self.membership
        if ms is None:
            return None
        mine = len(ms.hears())
        for peer in self.others:
            if len(ms.hears_of(peer)) > mine:
                return peer
        return None

    async def _election_loop(self) -> None:
        base = self.timing.lease * ELECTION_LEASES
        while True:
            timeout = random.uniform(base, 2 * base)
            await trio.sleep(timeout / 4)
            if self.role == LEADER:
                better = self._better_connected()
                if better is not None:
                    # a leader that cannot reach everybody the others reach makes healthy
                    # nodes look dead to it: hand over to a better connected node
                    log.warning("metadata: %s hears fewer nodes than %s; standing down", self.node, better)
                    self._no_stand_until = self._now() + 4 * self.timing.lease
                    self.leader = None
                    self.leader_contact = -1e9
                    self._become_follower()
                continue
            if self._now() < self._no_stand_until or self._better_connected() is not None:
                continue
            if self._now() - self.leader_contact < timeout:
                continue
            await self._run_election()

    async def _poll(self, term: int, pre: bool) -> int:
        """Asks every peer for its vote in `term`; returns the votes (ours included) as soon as
        a majority granted or everyone answered."""
        req = m.VoteRequest(term, self.node, self.last[0], self.last[1], pre)
        results: dict[str, bool] = {}

        async def ask(peer: str) -> None:
            granted = False
            try:
                with trio.move_on_after(self.timing.rpc_timeout):
                    r = await self.net.request(peer, req)
                    if r.term > self.term and not (pre and r.term == term):
                        await self._set_term(r.term)
                    granted = bool(r.granted) and r.term == term
            except Exception as exc:  # noqa: BLE001 - an unreachable voter is simply no vote
                log.debug("vote request to %s failed: %s", peer, exc)
            finally:
                results[peer] = granted

        async with trio.open_nursery() as n:
            for peer in self.others:
                n.start_soon(ask, peer)
            while len(results) < len(self.others) and 1 + sum(results.values()) < self.majority:
                with trio.move_on_after(0.01):
                    await trio.sleep_forever()
            n.cancel_scope.cancel()
        return 1 + sum(results.values())

    async def _run_election(self) -> None:
        # pre-vote first: only a node that would win bumps the term (no disruption)
        if await self._poll(self.term + 1, True) < self.majority or self.role == LEADER:
            return
        if self._now() - self.leader_contact < self.timing.lease:
            return  # a leader showed up meanwhile
        self.term += 1
        self.voted_for = self.node
        self.role = CANDIDATE
        self.leader = None
        await self._persist_vote()
        term = self.term
        log.info("metadata: %s stands for election in term %d", self.node, term)
        votes = await self._poll(term, False)
        if self.role == CANDIDATE and self.term == term and votes >= self.majority:
            await self._become_leader()
        elif self.role == CANDIDATE:
            self.role = FOLLOWER

    async def _become_leader(self) -> None:
        if not self.others:  # alone: no election, just a new term
            self.term += 1
            self.voted_for = self.node
            await self._persist_vote()
        self.role = LEADER
        self.leader = self.node
        self.leader_since = self._now()
        if not self.others:
            self.leader_since -= self.timing.lease  # nobody else could hold a lease
        self._acks = {}
        self._follower_last = {}
        log.info("metadata: %s is leader in term %d (version %d)", self.node, self.term, self.last[1])
        self._notify()
        assert self._nursery is not None
        self._nursery.start_soon(self._lead, self.term)

    async def _lead(self, term: int) -> None:
        with trio.CancelScope() as scope:
            self._leader_scope = scope
            async with trio.open_nursery() as n:
                for peer in self.others:
                    n.start_soon(self._replicate_to, peer, term)
                # a leader commits earlier terms' ops only through one of its own
                try:
                    await self.submit({"op": "noop"}, internal=True)
                except Unavailable as exc:
                    log.info("metadata: leader no-op not committed: %s", exc)
                await trio.sleep_forever()

    async def _replicate_to(self, peer: str, term: int) -> None:
        """Leader: keeps `peer` up to date and collects its heartbeat acknowledgements."""
        flast: Version | None = None  # what the follower last said it holds (None: unknown)
        force_install = False
        while self.role == LEADER and self.term == term:
            wake = self._wake_replicators
            sent = self._now()
            sent_op = False
            try:
                with trio.move_on_after(self.timing.rpc_timeout):
                    if flast is not None and flast != self.last and (
                            force_install or not self._pending or flast != self._pending[0]):
                        reply = await self._install(peer, term)
                    elif flast is not None and flast != self.last:
                        prev, this, op = self._pending
                        sent_op = True
                        reply = await self.net.request(peer, m.MetaAppend(
                            term, self.node, prev[0], prev[1], this[0], this[1], op,
                            self.commit[0], self.commit[1]))
                    else:
                        reply = await self.net.request(peer, m.MetaAppend(
                            term, self.node, self.last[0], self.last[1], 0, 0, b"",
                            self.commit[0], self.commit[1]))
                    if reply.term > self.term:
                        await self._set_term(reply.term)
                        return
                    if reply.term == term:
                        self._acks[peer] = sent
                    flast = (reply.last_term, reply.last_version)
                    force_install = sent_op and not reply.ok  # the op did not apply there
                    self._follower_last[peer] = flast
                    if self.term == term:
                        self._advance_commit()
                    self._notify()
                    if flast != self.last:
                        continue  # more to send: do not wait for the next tick
            except Unavailable as exc:
                log.debug("metadata: %s unreachable: %s", peer, exc)
            except Exception as exc:  # noqa: BLE001 - keep replicating to the others
                log.warning("metadata: replicating to %s failed: %r", peer, exc)
                force_install = True
            with trio.move_on_after(self.timing.heartbeat):
                await wake.wait()

    async def _install(self, peer: str, term: int):
        blob = zlib.compress(json.dumps(self.state.to_dict(), separators=(",", ":")).encode(), 1)
        if len(blob) > m.MAX_SNAPSHOT:
            raise Unavailable(f"metadata snapshot of {len(blob)} bytes exceeds the frame cap")
        req = m.MetaInstall(term, self.node, self.last[0], self.last[1], self.commit[0],
                            self.commit[1], blob)
        return await self.net.request(peer, req)

    # -- submitting ops --

    async def submit(self, request: dict, *, internal: bool = False) -> tuple[int, dict]:
        """Runs a metadata request through the log; returns (version, result) once committed.

        On a follower the request goes to the leader; the call returns after this node has
        applied the op too. Raises MetaError (the op is invalid now) or Unavailable (no leader
        or no majority). Blocks for about one round trip plus an fsync on a majority.

        A call that raises Unavailable or is cancelled may still have committed its op (the
        leader applied it and offers it to the followers whatever became of the caller): a
        caller that must know re-reads the state after `sync()`.
        """
        if self.role != LEADER:
            if internal:
                raise NotLeader("not the leader")
            return await self._submit_remote(request)
        async with self._submit_lock:
            if self.role != LEADER:
                raise NotLeader("lost the leadership")
            term = self.term
            wait_ready = self.leader_since + self.timing.lease - self._now()
            if wait_ready > 0 and request.get("op") != "noop":
                await trio.sleep(wait_ready)  # leases of the previous leader run out first
            with trio.move_on_after(self.timing.rpc_timeout * 2):
                while self._now() >= self.authority_until() and self.role == LEADER:
                    await self.wait_changed()  # a new leader: wait for its first acks
            if self._now() >= self.authority_until():
                raise Unavailable("the metadata leader cannot reach a majority of the nodes")
            async with self._apply_lock:
                # the waits above may have seen this node step down (and apply a new
                # leader's ops): decide on the state as it is now
                if self.role != LEADER or self.term != term:
                    raise NotLeader("lost the leadership")
                answered = self.state.answered(request.get("rid"))
                if answered is not None:  # sent again, applied before: answered as then, once
                    version, result = self.last, answered  # once all up to `last` is committed
                else:
                    op = self.prepare(dict(request))
                    self.state.check(op)
                    prev = self.last
                    version = (term, prev[1] + 1)
                    raw = json.dumps(op, separators=(",", ":")).encode()
                    if len(raw) > m.MAX_OP:
                        raise MetaError(errno.E2BIG, "metadata operation too large")
                    with trio.CancelScope(shield=True):
                        # Once applied here the op must be offered to the followers, whatever
                        # becomes of the caller: a cancel between the two left the leader alone
                        # with an op no follower ever got, and its next op took the same version
                        # (the nodes' metadata then disagreed for good).
                        result = await self._apply_locked(op, version)
                        self._pending = (prev, version, raw)
                        self._wake_replicators.set()
                        self._wake_replicators = trio.Event()
            with trio.move_on_after(self.timing.io_timeout) as cs:
                while self.commit < version:
                    if self.role != LEADER or self.term != term:
                        raise Unavailable("lost the metadata leadership before the op committed")
                    self._advance_commit()
                    if self.commit < version:
                        await self.wait_changed()
            if cs.cancelled_caught:
                raise Unavailable("metadata op not acknowledged by a majority of the nodes")
            return version[1], result

    def _advance_commit(self) -> None:
        """Leader: the newest op of its own term that a majority (itself included) holds is
        committed, and so is every op before it. Called whenever a follower acknowledges, so
        the commit point moves on even when the op's submitter was cancelled. Never blocks."""
        if self.role != LEADER:
            return
        held = sorted([self.last, *(self._follower_last.get(p, (0, 0)) for p in self.others)],
                      reverse=True)
        newest = held[self.majority - 1]
        if newest[0] == self.term and newest > self.commit:
            self.commit = newest
            self._notify()

    async def _submit_remote(self, request: dict) -> tuple[int, dict]:
        # one id for every send of this request: the leader applies it once (see meta.py)
        request = {**request, "rid": secrets.token_hex(12)}
        with trio.move_on_after(self.timing.io_timeout) as cs:
            while True:
                if self.role == LEADER:  # we were elected meanwhile
                    return await self.submit(request)
                leader = self.leader
                if leader is None or leader == self.node:
                    await self._wait_for_leader()
                    continue
                reply = None
                await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller sends nothing
                # Once sent, the op may be applied by the leader whatever becomes of us: a cancel
                # waits for the answer (io_timeout at most), so that a cancelled submit's op is
                # decided (committed, refused, or in flight at the leader, where `sync` waits for
                # it) when the cancel arrives, and a caller re-reading after `sync` knows.
                with trio.CancelScope(shield=True), trio.move_on_after(self.timing.io_timeout):
                    async with trio.open_nursery() as n:
                        async def watch():  # a new leader: ask it instead
                            while self.leader == leader:
                                await self.wait_changed()
                            n.cancel_scope.cancel()

                        async def call():
                            nonlocal reply
                            try:
                                reply = await self.net.request(leader, m.MetaSubmit(
                                    json.dumps(request, separators=(",", ":")).encode()),
                                    timeout=self.timing.io_timeout)
                            except Unavailable as exc:
                                log.debug("metadata request to %s: %s", leader, exc)
                            except GfvmError as exc:
                                reply = exc
                            n.cancel_scope.cancel()

                        n.start_soon(watch)
                        n.start_soon(call)
                if reply is None:
                    await trio.sleep(self.timing.heartbeat / 2)
                    continue
                if isinstance(reply, GfvmError):
                    if getattr(reply, "errno", 0) in (errno.EAGAIN, errno.EIO) or isinstance(reply, NotLeader):
                        await trio.sleep(self.timing.heartbeat / 2)
                        continue
                    raise MetaError(getattr(reply, "errno", errno.EIO), str(reply))
                result = json.loads(bytes(reply.result))
                await self.wait_applied((reply.term, reply.version))
                return reply.version, result
        assert cs.cancelled_caught
        raise Unavailable("no metadata leader reachable (is a majority of the nodes up?)")

    async def _wait_for_leader(self) -> None:
        with trio.move_on_after(self.timing.heartbeat):
            await self.wait_changed()

    async def wait_applied(self, version: Version) -> None:
        """Waits until this node's metadata includes `version` (term, version)."""
        while self.last[1] < version[1] or (self.last[1] == version[1] and self.last[0] < version[0]):
            await self.wait_changed()

    async def wait_idle(self) -> None:
        """Returns once no op is being applied (its listeners included)."""
        async with self._apply_lock:
            pass

    async def _apply_locked(self, op: dict, version: Version) -> dict:
        """Applies checked op `version` on this node: log, state, local effects, `last`, all of
        them or (the log append failed: raised) none. A cancel waits until it is done: a state
        holding an op that `last` does not count takes the next op under the same version and
        never gets the leader's whole state, so it would stay different for good."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.metalog.append, version[0], version[1], op)
            result = self.state.apply(op)  # after the append: a failed append changed nothing
            if self.metalog.needs_compaction():
                await trio.to_thread.run_sync(self.metalog.save_snapshot, self.state.copy(), version)
            try:
                await self.faults.hit("meta.before_effects")
                await self.on_applied(version[1], op, result)
            except Exception:  # noqa: BLE001 - the op is applied and durable; its local effects
                log.exception("metadata: local effects of op %d failed", version[1])  # are retried by maintenance
            self.last = version  # only now: whoever waits for this version sees its effects done
            self._notify()
        return result

    # -- incoming messages --

    async def handle_append(self, peer: str, msg: m.MetaAppend) -> m.MetaAck:
        if msg.term < self.term:
            return m.MetaAck(self.term, False, self.last[0], self.last[1], rid=msg.rid)
        if msg.term > self.term:
            await self._set_term(msg.term)
        if self.role != FOLLOWER:
            self._become_follower()
        self.leader = msg.leader
        self.leader_contact = self._now()
        async with self._apply_lock:  # one append at a time, checked against what is applied
            ok = False
            if len(msg.op) == 0:
                ok = self.last == (msg.prev_term, msg.prev_version)
            elif self.last == (msg.op_term, msg.op_version):
                ok = True
            elif self.last == (msg.prev_term, msg.prev_version):
                try:
                    op = json.loads(bytes(msg.op))
                    self.state.check(op)
                except (ValueError, MetaError, KeyError, TypeError) as exc:
                    # our state is not the leader's: ask for the whole of it
                    log.warning("metadata: op %d from %s does not apply here (%s)", msg.op_version, peer, exc)
                    return m.MetaAck(self.term, False, self.last[0], self.last[1], rid=msg.rid)
                await self._apply_locked(op, (msg.op_term, msg.op_version))
                ok = True
        if ok:
            c = (msg.commit_term, msg.commit_version)
            if c > self.commit and c <= self.last:
                self.commit = c
        self._notify()
        return m.MetaAck(self.term, ok, self.last[0], self.last[1], rid=msg.rid)

    async def handle_install(self, peer: str, msg: m.MetaInstall) -> m.MetaAck:
        if msg.term < self.term:
            return m.MetaAck(self.term, False, self.last[0], self.last[1], rid=msg.rid)
        if msg.term > self.term:
            await self._set_term(msg.term)
        if self.role != FOLLOWER:
            self._become_follower()
        self.leader = msg.leader
        self.leader_contact = self._now()
        state = MetaState.from_dict(json.loads(zlib.decompress(bytes(msg.state), bufsize=1 << 20)))
        version = (msg.last_term, msg.last_version)
        async with self._apply_lock:
            with trio.CancelScope(shield=True):  # all or nothing, like an op (_apply_locked)
                await trio.to_thread.run_sync(self.metalog.save_snapshot, state, version)
                self.state = state
                self.last = version
                self.commit = min((msg.commit_term, msg.commit_version), version)
                log.info("metadata: installed the leader's state at version %d", version[1])
                try:
                    await self.on_installed()
                except Exception:  # noqa: BLE001
                    log.exception("metadata: local effects of the installed state failed")
                self._notify()
        return m.MetaAck(self.term, True, self.last[0], self.last[1], rid=msg.rid)

    async def handle_vote(self, peer: str, msg: m.VoteRequest) -> m.VoteReply:
        now = self._now()
        heard_leader = self.role == LEADER or (
            self.leader is not None and now - self.leader_contact < self.timing.lease)
        if msg.term < self.term or (heard_leader and self.leader != msg.candidate):
            return m.VoteReply(self.term, False, rid=msg.rid)
        if msg.pre:  # would we vote? (nothing changes here)
            ok = (msg.last_term, msg.last_version) >= self.last and (
                msg.term > self.term or self.voted_for in (None, msg.candidate))
            return m.VoteReply(msg.term if ok else self.term, ok, rid=msg.rid)
        if msg.term > self.term:
            await self._set_term(msg.term)
        granted = False
        if self.voted_for in (None, msg.candidate) and (msg.last_term, msg.last_version) >= self.last:
            self.voted_for = msg.candidate
            await self._persist_vote()
            self.leader_contact = now  # do not stand ourselves while this election runs
            granted = True
        return m.VoteReply(self.term, granted, rid=msg.rid)

    async def handle_submit(self, peer: str, msg: m.MetaSubmit) -> m.MetaSubmitted:
        if self.role != LEADER:
            raise NotLeader(f"{self.node} is not the metadata leader")
        try:
            request = json.loads(bytes(msg.op))
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise MetaError(errno.EINVAL, f"bad metadata request: {exc}") from None
        version, result = await self.submit(request)
        await self.faults.hit("meta.before_answer")
        return m.MetaSubmitted(self.term, version, json.dumps(result).encode(), rid=msg.rid)

    # -- leases (used by the membership heartbeats) --

    def grant_lease(self, hb: m.Heartbeat) -> bool:
        """Leader: may `hb.node` act on its metadata for the next `lease`? Never blocks."""
        if self.role != LEADER or not self.lease_valid():
            return False
        return hb.term == self.term and (hb.last_term, hb.last_version) >= self.commit

    def note_heartbeat_reply(self, sent_at: float, reply: m.HeartbeatReply) -> None:
        """Follower: the leader answered our heartbeat sent at `sent_at`."""
        if reply.leader and reply.term >= self.term and reply.node == reply.leader:
            if reply.lease and reply.term == self.term:
                self.lease_until = max(self.lease_until, sent_at + self.timing.lease)
                self.leader_commit = (reply.commit_term, reply.commit_version)

    def settle_time(self) -> float:
        """How long a cluster that just started may take before its leader may act: the longest
        election timeout, then one lease (the predecessor's leases run out), then one round of
        heartbeat acks."""
        return 2 * ELECTION_LEASES * self.timing.lease + self.timing.lease + self.timing.rpc_timeout

    async def _leader_lease(self) -> bool:
        """On the leader: waits until it may act (`lease_valid`), at most `settle_time`. A new
        leader waits one lease after its election, so right after start-up (or a failover) the
        first reads wait instead of failing. False if it still may not act (or stepped down)."""
        with trio.move_on_after(self.settle_time()):
            while self.role == LEADER and not self.lease_valid():
                ready_in = self.leader_since + self.timing.lease - self._now()
                with trio.move_on_after(max(0.005, min(ready_in, self.timing.heartbeat))):
                    await self.wait_changed()
        return self.role == LEADER and self.lease_valid()

    async def sync(self) -> None:
        """Read barrier: returns once this node has applied every op the leader had applied
        when asked, each of them committed by then (an op still in flight there, e.g. one whose
        submitter was cancelled, is waited for: its fate is then known), or raises Unavailable.
        Blocks for one round trip to the leader, more while an op is in flight (on the leader:
        nothing, unless it was elected less than a lease ago, see `_leader_lease`, or an op is
        in flight)."""
        if self.role == LEADER:
            if self.lease_valid() or await self._leader_lease():
                barrier = self.last
                with trio.move_on_after(self.timing.io_timeout):
                    while self.role == LEADER and self.commit < barrier:
                        await self.wait_changed()
                if self.commit >= barrier:
                    return
                if self.role == LEADER:
                    raise Unavailable("a metadata op is not acknowledged by a majority of the nodes")
            elif self.role == LEADER:
                raise Unavailable("this node leads the metadata but cannot reach a majority")
        with trio.move_on_after(self.timing.io_timeout):
            while self.leader is None or (self.leader == self.node and self.role != LEADER):
                await self.wait_changed()  # just started, or an election is running
        leader = self.leader
        if leader is None:
            raise Unavailable("no metadata leader known")
        if leader == self.node:
            return await self.sync()

        async def ask() -> tuple[Version, Version]:
            reply = await self.net.request(leader, m.Heartbeat(
                self.node, 0, self.term, self.last[0], self.last[1], 0, 0, ()))
            return (reply.last_term, reply.last_version), (reply.commit_term, reply.commit_version)

        barrier, commit = await ask()
        with trio.move_on_after(self.timing.io_timeout) as cs:
            while commit < barrier:  # an op in flight at the leader: wait until it is decided
                with trio.move_on_after(self.timing.heartbeat / 4):
                    await self.wait_changed()
                _, commit = await ask()
            await self.wait_applied(commit)
        if cs.cancelled_caught:
            raise Unavailable("could not catch up with the metadata leader")
