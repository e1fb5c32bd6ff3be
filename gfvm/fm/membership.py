"""Who is alive: every node sends a Heartbeat to every other node each `heartbeat` seconds.

A heartbeat carries the sender's incarnation (bumped at each daemon start), its metadata
position and its disk usage; the reply carries the same about the replier, and, when the replier
leads the metadata, a lease grant (see gfvm.fm.consensus). A node is *alive* to us while we heard
from it (its heartbeat, or its reply to ours) within 3 heartbeat intervals; `silent_for(node)`
says for how long we have not. An incarnation change (the peer's daemon restarted) is reported
to the File Manager, which then re-checks the copies that peer holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from gfvm.fm import messages as m

log = logging.getLogger(__name__)


@dataclass
class PeerState:
    name: str
    heard: float = -1e9  # trio clock
    incarnation: int = 0
    used: int = 0
    free: int = 0
    term: int = 0
    last_version: int = 0
    hears: tuple[str, ...] = ()


class Membership:
    def __init__(self, node: str, nodes: list[str], consensus, net, timing, incarnation: int,
                 usage: Callable[[], dict], on_restart: Callable[[str, int], None]) -> None:
        self.node = node
        self.peers = {n: PeerState(n) for n in nodes if n != node}
        self.consensus = consensus
        self.net = net
        self.timing = timing
        self.incarnation = incarnation
        self.usage = usage
        self.on_restart = on_restart
        self.started = trio.current_time()

    def alive(self, node: str) -> bool:
        """Heard from `node` within 3 heartbeat intervals (we are always alive). Never blocks."""
        return node == self.node or self.silent_for(node) < 3 * self.timing.heartbeat

    def silent_for(self, node: str) -> float:
        """Seconds since we last heard from `node` (0 for ourselves). Never blocks."""
        if node == self.node:
            return 0.0
        p = self.peers.get(node)
        if p is None:
            return float("inf")
        # a node we never heard from has been silent for as long as we have been running
        return trio.current_time() - max(p.heard, self.started)

    def hears(self) -> list[str]:
        """The nodes we heard from lately, ourselves included (never blocks)."""
        return sorted([self.node] + [n for n in self.peers if self.alive(n)])

    def hears_of(self, node: str) -> tuple[str, ...]:
        """What `node` said it hears, if we heard from it lately; () otherwise."""
        p = self.peers.get(node)
        return p.hears if p is not None and self.alive(node) else ()

    def someone_hears(self, node: str) -> str | None:
        """A live node (other than `node`) that reports hearing `node` lately, or None."""
        for name, p in self.peers.items():
            if name != node and self.alive(name) and node in p.hears:
                return name
        return None

    def _heard(self, name: str, incarnation: int, used: int, free: int, term: int, version: int,
               hears: tuple[str, ...] = ()) -> None:
        p = self.peers.get(name)
        if p is None:
            return
        p.heard = trio.current_time()
        p.hears = tuple(hears)
        if incarnation and p.incarnation and incarnation != p.incarnation:
            log.info("%s restarted (incarnation %d -> %d)", name, p.incarnation, incarnation)
            self.on_restart(name, incarnation)
        if incarnation:
            p.incarnation = incarnation
        p.used, p.free, p.term, p.last_version = used, free, term, version

    def _mine(self) -> m.Heartbeat:
        u = self.usage()
        c = self.consensus
        return m.Heartbeat(self.node, self.incarnation, c.term, c.last[0], c.last[1],
                           u.get("used", 0), u.get("free", 0), self.hears())

    async def handle(self, peer: str, hb: m.Heartbeat) -> m.HeartbeatReply:
        """Answers a peer's heartbeat (never blocks)."""
        if hb.incarnation:
            self._heard(peer, hb.incarnation, hb.used, hb.free, hb.term, hb.last_version, hb.hears)
        c = self.consensus
        u = self.usage()
        return m.HeartbeatReply(
            self.node, self.incarnation, c.term, c.leader or "", c.last[0], c.last[1],
            c.commit[0], c.commit[1], u.get("used", 0), u.get("free", 0), c.grant_lease(hb),
            self.hears(), rid=m.PENDING)

    async def run(self) -> None:
        """Sends heartbeats forever."""
        async with trio.open_nursery() as n:
            for name in self.peers:
                n.start_soon(self._beat, name)

    async def _beat(self, name: str) -> None:
        while True:
            sent = trio.current_time()
            try:
                with trio.move_on_after(self.timing.heartbeat * 2):
                    reply = await self.net.request(name, self._mine(), timeout=self.timing.heartbeat * 2)
                    self._heard(name, reply.incarnation, reply.used, reply.free, reply.term,
                                reply.last_version, reply.hears)
                    self.consensus.note_heartbeat_reply(sent, reply)
            except Exception as exc:  # noqa: BLE001 - a silent peer is what we measure
                log.debug("heartbeat to %s: %s", name, exc)
            await trio.sleep_until(sent + self.timing.heartbeat)

    def usage_of(self, node: str) -> tuple[int, int]:
        if node == self.node:
            u = self.usage()
            return u.get("used", 0), u.get("free", 0)
        p = self.peers[node]
        return p.used, p.free
