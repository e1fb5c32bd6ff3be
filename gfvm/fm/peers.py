"""The File Manager's connections to the other nodes (over gfvm.wire's mutual-TLS channels).

Each node keeps one outgoing channel to every other node (`Link`, reconnected when it breaks)
and accepts their channels. On an outgoing channel we send:
- requests (`request`): answered concurrently by the peer, many outstanding at once;
- replication frames (`send_stream`): one-way frames the peer applies strictly in the order we
  sent them, answering each with a one-way `ReplAck` that names the frame's token.
  (Ordered pipelining: frames leave in the order `send_stream` was called, which is a plain
  synchronous call, so a caller holding a per-file lock fixes the order of that file's frames.)

On an incoming channel, requests are each handled in a task of their own (a slow one never holds
up heartbeats), replication frames by one task per channel, in order: it hands the File Manager
every frame that has arrived meanwhile at once (`stream(peer, frames)`, up to STREAM_BATCH), so
frames that queued up behind a slow one are applied together, and acks each frame by its result.

Invariant: when a channel breaks, every replication frame queued or sent on it and not yet
acknowledged fails (`ChannelClosed`); nothing is retransmitted on a new channel. The File Manager
treats such a failure as "the member may lack this frame" (it stops counting it as in sync).
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from gfvm import pki
from gfvm.config import ClusterConfig, NodeSpec
from gfvm.errors import GfvmError, Unavailable
from gfvm.fm import messages as m
from gfvm.wire import ErrorReply, RemoteFailure, spec_of
from gfvm.wire.connection import LocalNode
from gfvm.wire.errors import ChannelClosed
from gfvm.wire.messages import Kind
from gfvm.wire.net import ChannelOptions, PeerChannel, open_peer, serve_peers

log = logging.getLogger(__name__)

#: frames applied in order by one task per incoming channel, each answered with a ReplAck
STREAM_TYPES = (m.ReplWrite, m.ReplPages, m.ReplTruncate, m.ReplFlush, m.ReplChunk, m.ResyncStart)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

Dispatch = Callable[[str, object], Awaitable[object]]
#: stream(peer, frames) applies frames in order; returns, per frame, None or why it failed
Stream = Callable[[str, list], Awaitable[list]]
#: replication frames handed to the File Manager at once (those already received)
STREAM_BATCH = 16


def safe_text(text: str) -> str:
    """An error message as a wire Text allows it (no control characters, <= 1 KiB)."""
    return _CONTROL.sub("?", text)[:900]


class StreamWaiter:
    """The acknowledgement of one replication frame."""

    __slots__ = ("event", "error", "errno", "sent_at")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.error: str | None = None
        self.errno = 0
        self.sent_at = trio.current_time()

    def done(self, err: int = 0, reason: str = "") -> None:
        if not self.event.is_set():
            self.errno = err
            self.error = reason if err else None
            self.event.set()

    async def wait(self) -> None:
        """Waits for the ack; raises ChannelClosed / GfvmError(errno) if the frame failed."""
        await self.event.wait()
        if self.errno:
            if self.errno == errno.ECONNRESET:
                raise ChannelClosed(self.error or "channel closed")
            e = GfvmError(self.error or "replication frame refused")
            e.errno = self.errno
            raise e


class Link:
    """Our outgoing channel to one peer: connect, reconnect, requests, ordered frames."""

    def __init__(self, net: "PeerNet", spec: NodeSpec) -> None:
        self.net = net
        self.spec = spec
        self.chan: PeerChannel | None = None
        self.connected = trio.Event()
        self.peer_incarnation = 0
        self._queue: deque[tuple[object, StreamWaiter]] = deque()
        self._queue_bytes = 0
        self._more = trio.Event()
        self._pending: dict[int, StreamWaiter] = {}
        self._tokens = itertools.count(1)
        self.last_error = ""
        #: when the peer last acknowledged a replication frame on this link (trio time)
        self.last_ack_at = 0.0

    @property
    def name(self) -> str:
        return self.spec.name

    def next_token(self) -> int:
        return next(self._tokens)

    def send_stream(self, msg: object, token: int) -> StreamWaiter:
        """Queues a replication frame (never blocks); the waiter resolves on the peer's ack."""
        w = StreamWaiter()
        if self.chan is None or self.chan.closed:
            w.done(errno.ECONNRESET, f"no channel to {self.name}: {self.last_error or 'not connected'}")
            return w
        self._pending[token] = w
        self._queue.append((msg, w))
        self._queue_bytes += len(getattr(msg, "data", b""))
        self._more.set()
        return w

    def queued_bytes(self) -> int:
        return self._queue_bytes

    def acking(self, within: float) -> bool:
        """The channel is up and the peer acknowledged a frame in the last `within` seconds:
        it is working through our frames (a frame queued behind many others on a slow link
        waits long for its ack without the peer failing). Never blocks."""
        return (self.chan is not None and not self.chan.closed
                and trio.current_time() - self.last_ack_at <= within)

    async def run(self) -> None:
        """Keeps a channel to the peer open for as long as the daemon runs."""
        backoff = self.net.reconnect_delay
        while True:
            try:
                async with open_peer(self.spec.address, self.spec.port, self.name, self.net.client_ctx,
                                     me=self.net.me, options=self.net.options) as chan:
                    self.chan = chan
                    self.peer_incarnation = chan.peer.incarnation
                    self.last_error = ""
                    self.connected.set()
                    log.debug("link to %s up (incarnation %d)", self.name, chan.peer.incarnation)
                    self.net.on_link(self.name, True, chan.peer.incarnation)
                    async with trio.open_nursery() as n:
                        n.start_soon(self._sender, chan, n.cancel_scope)
                        n.start_soon(self._acks, chan, n.cancel_scope)
                    self.last_error = chan.close_reason or "closed"
            except Unavailable as exc:
                self.last_error = str(exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.last_error = str(exc) or type(exc).__name__
            finally:
                was_up = self.chan is not None
                self.chan = None
                self.connected = trio.Event()
                self._fail_all(self.last_error or "channel closed")
                if was_up:
                    self.net.on_link(self.name, False, 0)
            await trio.sleep(backoff)

    def _fail_all(self, reason: str) -> None:
        for _, w in self._queue:
            w.done(errno.ECONNRESET, f"channel to {self.name} closed: {reason}")
        self._queue.clear()
        self._queue_bytes = 0
        for w in self._pending.values():
            w.done(errno.ECONNRESET, f"channel to {self.name} closed: {reason}")
        self._pending.clear()

    async def _sender(self, chan: PeerChannel, scope: trio.CancelScope) -> None:
        try:
            while True:
                while not self._queue:
                    self._more = trio.Event()
                    await self._more.wait()
                msg, w = self._queue.popleft()
                self._queue_bytes -= len(getattr(msg, "data", b""))
                if w.event.is_set():
                    continue
                await chan.send(msg)
        except ChannelClosed:
            pass
        finally:
            scope.cancel()

    async def _acks(self, chan: PeerChannel, scope: trio.CancelScope) -> None:
        try:
            async for msg in chan:
                if isinstance(msg, m.ReplAck):
                    self.last_ack_at = trio.current_time()
                    w = self._pending.pop(msg.token, None)
                    if w is not None:
                        w.done(msg.errno, msg.reason)
                else:
                    log.warning("peer %s sent an unexpected %s on our channel", self.name,
                                type(msg).__name__)
        finally:
            scope.cancel()

    async def request(self, msg: object, timeout: float) -> object:
        with trio.move_on_after(timeout) as cs:
            while True:
                chan = self.chan
                if chan is None or chan.closed:
                    await self.connected.wait()
                    continue
                try:
                    return await chan.request(msg)
                except RemoteFailure as exc:
                    raise PeerError(exc.errno, str(exc)) from None
        assert cs.cancelled_caught
        raise Unavailable(f"{self.name} did not answer {type(msg).__name__} within {timeout:g} s"
                          + (f" ({self.last_error})" if self.last_error else ""))


class PeerError(GfvmError):
    """A peer refused a request with an errno (ESTALE: our epoch or metadata is stale...)."""

    kind = "peer"

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


class PeerNet:
    """All of this node's links plus the listener for the others' (see the module header)."""

    def __init__(self, node: str, config: ClusterConfig, tls_dir, incarnation: int, *,
                 dispatch: Dispatch, stream: Stream, rpc_timeout: float,
                 on_link: Callable[[str, bool, int], None] = lambda *a: None,
                 reconnect_delay: float = 0.5) -> None:
        self.node = node
        self.config = config
        self.tls_dir = tls_dir
        self.me = LocalNode(config.name, node, incarnation)
        self.dispatch = dispatch
        self.stream = stream
        self.rpc_timeout = rpc_timeout
        self.on_link = on_link
        self.reconnect_delay = reconnect_delay
        self.options = ChannelOptions(max_outgoing_bytes=32 << 20, max_incoming_bytes=32 << 20,
                                      handshake_timeout=max(2.0, rpc_timeout * 2))
        self.links = {n.name: Link(self, n) for n in config.nodes if n.name != node}
        self.client_ctx = None
        self.server_ctx = None
        self.port = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listens on our node's address and keeps links to every peer (blocks until cancelled)."""
        self.server_ctx = await trio.to_thread.run_sync(pki.server_context, self.tls_dir)
        self.client_ctx = await trio.to_thread.run_sync(pki.client_context, self.tls_dir)
        spec = self.config.node(self.node)
        async with trio.open_nursery() as n:
            self.port = await n.start(functools.partial(
                serve_peers, spec.port, self.server_ctx, self._serve_channel, me=self.me,
                host=spec.address, options=self.options))
            for link in self.links.values():
                n.start_soon(link.run)
            task_status.started()

    async def request(self, node: str, msg: object, timeout: float | None = None) -> object:
        """Sends a request to `node` and returns its response (blocks for up to `timeout`).

        Raises Unavailable (no channel, no answer in time) or PeerError (the peer refused)."""
        link = self.links.get(node)
        if link is None:
            raise Unavailable(f"{node} is not a peer of {self.node}")
        return await link.request(msg, timeout or self.rpc_timeout)

    def link(self, node: str) -> Link:
        return self.links[node]

    async def _serve_channel(self, chan: PeerChannel) -> None:
        peer = chan.peer.node
        if peer not in self.links:
            log.warning("peer %s is not in this cluster's configuration; closing", peer)
            return
        send_ordered, receive_ordered = trio.open_memory_channel(64)
        async with trio.open_nursery() as n:
            n.start_soon(self._ordered, chan, receive_ordered)
            try:
                async for msg in chan:
                    kind = spec_of(msg).kind
                    if isinstance(msg, STREAM_TYPES):
                        await send_ordered.send(msg)
                    elif kind is Kind.REQUEST:
                        n.start_soon(self._answer, chan, peer, msg)
                    else:
                        log.warning("peer %s sent an unexpected one-way %s; closing", peer,
                                    type(msg).__name__)
                        break
            finally:
                await send_ordered.aclose()
                n.cancel_scope.deadline = trio.current_time() + 1.0

    async def _answer(self, chan: PeerChannel, peer: str, msg) -> None:
        try:
            reply = await self.dispatch(peer, msg)
            reply = reply.with_rid(msg.rid)
        except (GfvmError, OSError) as exc:
            err = getattr(exc, "errno", None) or errno.EIO
            reply = ErrorReply(err, safe_text(str(exc) or type(exc).__name__), rid=msg.rid)
        except Exception as exc:  # noqa: BLE001 - a bug answering one request must not kill the link
            log.exception("answering %s from %s failed", type(msg).__name__, peer)
            reply = ErrorReply(errno.EIO, safe_text(f"internal error: {exc!r}"), rid=msg.rid)
        try:
            await chan.send(reply)
        except ChannelClosed:
            pass

    async def _ordered(self, chan: PeerChannel, frames) -> None:
        peer = chan.peer.node
        while True:
            try:
                batch = [await frames.receive()]
            except trio.EndOfChannel:
                return
            while len(batch) < STREAM_BATCH:
                try:
                    batch.append(frames.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                outcomes = await self.stream(peer, batch)
            except Exception as exc:  # noqa: BLE001 - a bug applying frames must not kill the link
                log.exception("applying %d frame(s) from %s failed", len(batch), peer)
                outcomes = [exc] * len(batch)
            for msg, exc in zip(batch, outcomes, strict=True):
                err, reason = 0, ""
                if isinstance(exc, (GfvmError, OSError)):
                    err = getattr(exc, "errno", None) or errno.EIO
                    reason = str(exc) or type(exc).__name__
                elif exc is not None:
                    err, reason = errno.EIO, f"internal error: {exc!r}"
                try:
                    await chan.send(m.ReplAck(msg.fid, msg.token, err, safe_text(reason)))
                except ChannelClosed:
                    return
