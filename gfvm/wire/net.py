"""The thin trio glue: authenticated peer channels over mutual TLS 1.3.

    client:  async with open_peer(addr, port, "n2", client_ctx, me=me) as chan:
                 resp = await chan.request(WritePages(...))     # pipelined: many tasks at once
    server:  await nursery.start(partial(serve_peers, port, server_ctx, handler, me=me))
             async def handler(chan):                             # one call per connection
                 async for msg in chan:                           # requests and one-way messages
                     await chan.send(WriteDone(..., rid=msg.rid)) # a response echoes the rid

Connection life:
1. Pre-authentication (capped in time by `handshake_timeout` and in bytes by `preauth_max_bytes`,
   and, on a server, in number by `max_preauth_connections`): TCP, then the TLS 1.3 handshake
   (gfvm.wire.tls.TlsStream) with certificates required both ways, then the peer's identity is read from its certificate
   (gfvm.pki.peer_identity); a client checks it is the node it meant to reach before sending
   anything; then HELLO / HELLO_ACK (gfvm.wire.connection checks the claimed name equals the
   certificate's). Nothing is parsed before TLS has authenticated the peer; nothing reaches a
   handler before the whole handshake succeeded.
2. Open: a reader task turns received bytes into messages (responses wake the `request` that
   waits for their rid; requests and one-way messages queue for `receive`); a writer task writes
   queued frames in the order `send`/`request` were called (frames queued together, and a
   frame's header and payload, in one socket write).
3. Close: `aclose()` (or leaving `open_peer`'s block, or the handler returning) flushes queued
   frames (at most `close_timeout`), sends TLS close_notify and closes. Invalid input from the peer
   closes the connection with one log line; pending requests and later calls raise ChannelClosed.
   A listener keeps serving other connections whatever one connection does.

Backpressure: `send`/`request` block while `max_outgoing_bytes` are queued; the reader stops
reading the socket while `max_incoming_bytes` / `max_incoming_messages` wait for `receive`, which
also delays responses to our own requests on that channel: keep receiving (hand long work to
other tasks instead of holding up the receive loop).
Timeouts are the caller's: wrap calls in `trio.fail_after` / `move_on_after`. A cancelled
`request` leaves the channel usable; its late response is dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio

from gfvm import pki
from gfvm.wire.connection import (
    DEFAULT_MAX_REQUESTS,
    NEED_DATA,
    Connection,
    ConnectionClosed,
    Handshake,
    LocalNode,
    PeerInfo,
)
from gfvm.wire.errors import (
    ChannelClosed,
    ConnectFailed,
    HandshakeRejected,
    LocalProtocolError,
    RemoteFailure,
    RemoteProtocolError,
)
from gfvm.wire.frames import DEFAULT_MAX_FRAME
from gfvm.wire.messages import ErrorReply, Kind, spec_of
from gfvm.wire.state import Role, State
from gfvm.wire.tls import TlsStream

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ChannelOptions:
    """Limits of one peer connection (defaults suit 1 MiB page writes on a LAN)."""

    max_frame_size: int = DEFAULT_MAX_FRAME
    max_requests: int = DEFAULT_MAX_REQUESTS  # outstanding requests, each direction
    max_outgoing_bytes: int = 8 << 20  # frames queued for the writer
    max_incoming_bytes: int = 16 << 20  # received messages waiting for receive()
    max_incoming_messages: int = 4096
    handshake_timeout: float = 10.0  # TCP connect + TLS + HELLO, each side
    preauth_max_bytes: int = 64 * 1024  # bytes accepted from a peer before it is authenticated
    max_preauth_connections: int = 64  # server: connections still in their handshake
    close_timeout: float = 5.0  # flushing queued frames when closing
    receive_size: int = 256 * 1024


class _Closed(Exception):
    """Internal: a _ByteQueue is closed and empty."""


class _ByteQueue:
    """A FIFO bounded by total size: an item is admitted while the total is below the cap (so one
    item larger than the cap still passes, alone). Closing keeps queued items readable."""

    def __init__(self, max_bytes: int, max_items: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.items: deque[tuple[Any, int]] = deque()
        self.size = 0
        self.closed = False
        self._room = trio.lowlevel.ParkingLot()
        self._data = trio.lowlevel.ParkingLot()

    def full(self) -> bool:
        return self.size >= self.max_bytes or (
            self.max_items is not None and len(self.items) >= self.max_items
        )

    async def wait_room(self) -> None:
        """Blocks until an item may be put; raises _Closed if the queue is closed."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while self.full() and not self.closed:
            await self._room.park()
        if self.closed:
            raise _Closed
        await trio.lowlevel.cancel_shielded_checkpoint()

    def put_nowait(self, item: Any, size: int) -> None:
        self.items.append((item, size))
        self.size += size
        self._data.unpark()

    def get_nowait(self) -> Any:
        """The oldest item (the queue must not be empty)."""
        item, size = self.items.popleft()
        self.size -= size
        self._room.unpark_all()
        return item

    async def get(self) -> Any:
        """The oldest item; blocks while empty; raises _Closed once closed and empty."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.items:
            if self.closed:
                raise _Closed
            await self._data.park()
        item, size = self.items.popleft()
        self.size -= size
        self._room.unpark_all()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return item

    def close(self, *, drop: bool = False) -> None:
        self.closed = True
        if drop:
            self.items.clear()
            self.size = 0
        self._room.unpark_all()
        self._data.unpark_all()


class _Waiter:
    __slots__ = ("event", "value", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: Any = None
        self.error: str | None = None


class PeerChannel:
    """An open, authenticated connection to one peer node. Create it with `open_peer` or receive
    it in a `serve_peers` handler; several tasks may use it at once."""

    def __init__(
        self, stream: trio.abc.Stream, conn: Connection, address: str, options: ChannelOptions
    ) -> None:
        assert conn.peer is not None
        #: who is on the other end (node name = its certificate's, incarnation, protocol version)
        self.peer: PeerInfo = conn.peer
        #: "host:port" of the other end, for logs
        self.address = address
        self._stream = stream
        self._conn = conn
        self._options = options
        self._out = _ByteQueue(options.max_outgoing_bytes)
        self._in = _ByteQueue(options.max_incoming_bytes, options.max_incoming_messages)
        self._send_lock = trio.Lock()  # FIFO: order on the wire = order of the calls
        self._waiters: dict[int, _Waiter] = {}
        self._close_reason: str | None = None
        self._failed = False
        self._writer_done = trio.Event()
        self._tasks_done = trio.Event()
        self._tasks: trio.CancelScope | None = None
        self._aclose_started = False
        self._aclose_done = trio.Event()

    def __repr__(self) -> str:
        return f"<PeerChannel {self.peer.node} at {self.address}>"

    # --- public API ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the channel is closed (by us, by the peer, or because it broke)."""
        return self._close_reason is not None

    @property
    def close_reason(self) -> str | None:
        """Why the channel closed (None while open)."""
        return self._close_reason

    async def send(self, msg: Any) -> None:
        """Queues a one-way message or a response (`rid=` the request's) for sending.

        Blocks while the outgoing buffer is full. Frames leave in the order of the calls.
        Raises LocalProtocolError for an invalid send (nothing queued), ChannelClosed if closed.
        A request must go through `request`."""
        if spec_of(msg).kind is Kind.REQUEST:
            raise LocalProtocolError(f"{type(msg).__name__} is a request: use request()")
        await self._enqueue(msg)

    async def request(self, msg: Any) -> Any:
        """Sends request `msg` with a fresh rid and waits for its response, which it returns.

        Many requests may be outstanding at once (from many tasks). Raises RemoteFailure if the
        peer answered with an ErrorReply, ChannelClosed if the channel closes first. Cancelling
        it (e.g. with trio.fail_after at the call site) leaves the channel usable."""
        if spec_of(msg).kind is not Kind.REQUEST:
            raise LocalProtocolError(f"{type(msg).__name__} is not a request: use send()")
        rid = self._conn.new_rid()
        waiter = _Waiter()
        self._waiters[rid] = waiter
        try:
            await self._enqueue(msg.with_rid(rid))
            await waiter.event.wait()
        finally:
            del self._waiters[rid]
        if waiter.error is not None:
            raise ChannelClosed(f"{self.peer.node}: {waiter.error}")
        if isinstance(waiter.value, ErrorReply):
            raise RemoteFailure(waiter.value.errno, f"{self.peer.node}: {waiter.value.message}")
        return waiter.value

    async def receive(self) -> Any:
        """The next request or one-way message from the peer; blocks until one arrives.

        Raises ChannelClosed once the channel is closed and everything received was returned."""
        try:
            return await self._in.get()
        except _Closed:
            raise ChannelClosed(f"{self.peer.node}: {self._close_reason}") from None

    def __aiter__(self) -> PeerChannel:
        return self

    async def __anext__(self) -> Any:
        """`async for msg in chan`: requests and one-way messages until the channel closes (for
        any reason: `close_reason` says which)."""
        try:
            return await self.receive()
        except ChannelClosed:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        """Flushes queued frames (at most close_timeout), sends TLS close_notify and closes.

        Idempotent: a second caller waits for the first to finish. Blocks; if cancelled, closes
        at once without flushing."""
        if self._aclose_started:
            await self._aclose_done.wait()
            return
        self._aclose_started = True
        try:
            if self._close_reason is None:
                self._close_reason = "closed by this node"
                self._out.close()  # no new frames; the writer still writes the queued ones
                try:
                    with trio.move_on_after(self._options.close_timeout):
                        await self._writer_done.wait()
                    flushed = self._writer_done.is_set()
                finally:
                    self._finish()
                    if self._tasks is not None:
                        self._tasks.cancel()
                if flushed:
                    with trio.move_on_after(self._options.close_timeout):
                        await self._tasks_done.wait()
                        await self._stream.aclose()  # sends close_notify
        finally:
            await trio.aclose_forcefully(self._stream)
            self._aclose_done.set()

    def statistics(self) -> dict[str, int]:
        """Counters of the connection plus queue sizes. Never blocks."""
        return {
            **self._conn.statistics(),
            "outgoing_bytes": self._out.size,
            "incoming_messages": len(self._in.items),
            "incoming_bytes": self._in.size,
            "waiting_requests": len(self._waiters),
        }

    # --- internals -------------------------------------------------------------------------------

    async def _enqueue(self, msg: Any) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._send_lock.locked() or self._out.full() or self._out.closed:
            # Slow path: wait for our turn (trio.Lock is FIFO, so call order is kept) and room.
            async with self._send_lock:
                try:
                    await self._out.wait_room()
                except _Closed:
                    raise ChannelClosed(f"{self.peer.node}: {self._close_reason}") from None
                self._put(msg)
        else:
            # Fast path: nobody is queued before us and there is room.
            self._put(msg)
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _put(self, msg: Any) -> None:
        # Nothing awaits here: the frame is encoded (and the connection's request bookkeeping
        # updated) only if it is also queued.
        chunks = self._conn.send_chunks(msg)
        self._out.put_nowait(chunks, sum(len(c) for c in chunks))

    def _fail(self, reason: str, *, level: int = logging.WARNING) -> None:
        """Closes the channel at once because of `reason` (logged once)."""
        if self._close_reason is not None:
            return
        self._close_reason = reason
        self._failed = True
        log.log(level, "peer %s (%s): %s; connection closed", self.peer.node, self.address, reason)
        self._out.close(drop=True)
        self._finish()
        if self._tasks is not None:
            self._tasks.cancel()

    def _finish(self) -> None:
        self._in.close()  # what was received stays readable
        for waiter in self._waiters.values():
            if not waiter.event.is_set():
                waiter.error = self._close_reason
                waiter.event.set()

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._tasks = nursery.cancel_scope
                if self._close_reason is not None:
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                task_status.started()
        finally:
            self._tasks_done.set()
            if self._failed:  # a graceful close is aclose()'s job
                await trio.aclose_forcefully(self._stream)

    async def _reader(self) -> None:
        conn = self._conn
        try:
            while True:
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA:
                        break
                    if isinstance(event, ConnectionClosed):
                        self._fail("peer closed the connection", level=logging.INFO)
                        return
                    if spec_of(event).kind is Kind.RESPONSE:
                        waiter = self._waiters.get(event.rid)
                        if waiter is not None:  # None: its request was cancelled
                            waiter.value = event
                            waiter.event.set()
                        continue
                    if self._in.full():  # backpressure: stop reading until receive() makes room
                        await self._in.wait_room()
                    self._in.put_nowait(event, conn.last_frame_size)
                data = await self._stream.receive_some(self._options.receive_size)
                conn.receive_data(data)
        except RemoteProtocolError as exc:
            self._fail(f"protocol error: {exc}")
        except _Closed:
            pass  # closing
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail(f"connection lost: {_cause(exc)}")

    async def _writer(self) -> None:
        send_chunks = getattr(self._stream, "send_chunks", None)  # TlsStream: one transport write
        try:
            while True:
                chunks = await self._out.get()
                # Frames queued meanwhile go out in the same write: one TLS record and one
                # syscall for many small frames (acks) instead of one each.
                while self._out.items and len(chunks) < 64:
                    chunks = chunks + self._out.get_nowait()
                if send_chunks is not None:
                    await send_chunks(_coalesce(chunks))
                    continue
                for data in _coalesce(chunks):
                    await self._stream.send_all(data)
        except _Closed:
            pass  # closed and flushed
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail(f"connection lost while sending: {_cause(exc)}")
        finally:
            self._writer_done.set()


_COALESCE_BELOW = 64 * 1024


def _coalesce(chunks: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """Joins runs of small buffers; large ones (page data) are passed through uncopied."""
    out: list[bytes | memoryview] = []
    run: list[bytes | memoryview] = []
    for chunk in chunks:
        if len(chunk) >= _COALESCE_BELOW:
            if run:
                out.append(b"".join(run))
                run = []
            out.append(chunk)
        else:
            run.append(chunk)
    if run:
        out.append(b"".join(run) if len(run) > 1 else run[0])
    return out


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = str(cause or exc) or type(cause or exc).__name__
    return text


@asynccontextmanager
async def _channel_scope(
    stream: trio.abc.Stream, conn: Connection, address: str, options: ChannelOptions
) -> AsyncIterator[PeerChannel]:
    chan = PeerChannel(stream, conn, address, options)
    async with trio.open_nursery() as nursery:
        await nursery.start(chan._run)
        try:
            yield chan
        finally:
            await chan.aclose()


# --- handshakes ---------------------------------------------------------------------------------


class _HandshakeFailed(Exception):
    pass


class _PreauthCap(trio.abc.Stream):
    """Passes a transport through, failing once more than `limit` bytes were received before
    `lift()` (i.e. before the peer authenticated)."""

    def __init__(self, inner: trio.abc.Stream, limit: int) -> None:
        self.inner = inner
        self._left: int | None = limit

    def lift(self) -> None:
        self._left = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._left is None:
            return await self.inner.receive_some(max_bytes)
        if self._left <= 0:
            raise trio.BrokenResourceError("pre-authentication byte cap reached")
        data = await self.inner.receive_some(min(max_bytes or self._left, self._left))
        self._left -= len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _wire_handshake(stream: trio.abc.Stream, conn: Connection, receive_size: int) -> None:
    """Runs HELLO / HELLO_ACK over an authenticated stream; _HandshakeFailed with a reason."""
    try:
        if conn.role is Role.CLIENT:
            await stream.send_all(conn.initiate())
        while True:
            event = conn.next_event()
            if isinstance(event, Handshake):
                break
            if isinstance(event, ConnectionClosed):
                raise _HandshakeFailed("peer closed the connection during the handshake")
            data = await stream.receive_some(receive_size)
            conn.receive_data(data)
        if conn.role is Role.SERVER:
            await stream.send_all(conn.accept())
    except HandshakeRejected as exc:
        raise _HandshakeFailed(str(exc)) from None
    except RemoteProtocolError as exc:
        if exc.reply is not None:
            with trio.move_on_after(1), _suppress_transport_errors():
                await stream.send_all(exc.reply)
        raise _HandshakeFailed(f"handshake: {exc}") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise _HandshakeFailed(f"connection lost during the handshake: {_cause(exc)}") from None


class _suppress_transport_errors:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        return kind is not None and issubclass(
            kind, (trio.BrokenResourceError, trio.ClosedResourceError)
        )


async def _tls_handshake(stream: TlsStream) -> str:
    try:
        await stream.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise _HandshakeFailed(f"TLS handshake failed: {_cause(exc)}") from None
    try:
        return pki.peer_identity(stream)
    except pki.IdentityError as exc:
        raise _HandshakeFailed(str(exc)) from None


@asynccontextmanager
async def open_channel(
    stream: trio.abc.Stream,
    me: LocalNode,
    *,
    role: Role,
    peer_identity: str,
    expected_peer: str | None = None,
    address: str = "?",
    options: ChannelOptions | None = None,
) -> AsyncIterator[PeerChannel]:
    """Runs the gfvm handshake over an already-authenticated `stream` and yields the channel.

    For tests and benchmarks (e.g. over plain TCP or memory streams); production code uses
    `open_peer` / `serve_peers`, which authenticate with TLS first. Raises ConnectFailed."""
    options = options or ChannelOptions()
    conn = Connection(
        role,
        me,
        peer_identity=peer_identity,
        expected_peer=expected_peer,
        max_frame_size=options.max_frame_size,
        max_requests=options.max_requests,
    )
    try:
        with trio.fail_after(options.handshake_timeout):
            await _wire_handshake(stream, conn, options.receive_size)
    except (_HandshakeFailed, trio.TooSlowError) as exc:
        await trio.aclose_forcefully(stream)
        raise ConnectFailed(
            f"{expected_peer or peer_identity} at {address}: {exc or 'handshake timed out'}"
        ) from None
    async with _channel_scope(stream, conn, address, options) as chan:
        yield chan


@asynccontextmanager
async def open_peer(
    address: str,
    port: int,
    expected_node: str,
    ssl_ctx: ssl.SSLContext,
    *,
    me: LocalNode,
    options: ChannelOptions | None = None,
) -> AsyncIterator[PeerChannel]:
    """Connects to node `expected_node` at address:port and yields an authenticated channel.

    `ssl_ctx` comes from `gfvm.pki.client_context`. The peer must present a certificate of our
    cluster CA naming `expected_node`, and claim that name in its HELLO_ACK. Raises
    ConnectFailed (an Unavailable) saying why otherwise. Leaving the block closes the channel.
    Blocks for at most options.handshake_timeout before the block starts."""
    options = options or ChannelOptions()
    where = f"{expected_node} at {address}:{port}"
    tcp: trio.SocketStream | None = None
    try:
        with trio.fail_after(options.handshake_timeout):
            tcp = await trio.open_tcp_stream(address, port)
            capped = _PreauthCap(tcp, options.preauth_max_bytes)
            stream = TlsStream(capped, ssl_ctx, server_side=False)
            identity = await _tls_handshake(stream)
            if identity != expected_node:
                raise _HandshakeFailed(
                    f"its certificate is for {identity!r}, not {expected_node!r}"
                )
            conn = Connection(
                Role.CLIENT,
                me,
                peer_identity=identity,
                expected_peer=expected_node,
                max_frame_size=options.max_frame_size,
                max_requests=options.max_requests,
            )
            await _wire_handshake(stream, conn, options.receive_size)
            capped.lift()
    except trio.TooSlowError:
        await _close_quietly(tcp)
        raise ConnectFailed(f"{where}: no handshake within {options.handshake_timeout} s") from None
    except OSError as exc:
        await _close_quietly(tcp)
        raise ConnectFailed(f"cannot connect to {where}: {exc.strerror or exc}") from None
    except _HandshakeFailed as exc:
        await _close_quietly(tcp)
        raise ConnectFailed(f"{where}: {exc}") from None
    async with _channel_scope(stream, conn, f"{address}:{port}", options) as chan:
        yield chan


async def _close_quietly(stream: trio.abc.AsyncResource | None) -> None:
    if stream is not None:
        await trio.aclose_forcefully(stream)


PeerHandler = Callable[[PeerChannel], Awaitable[None]]


async def serve_peers(
    port: int,
    ssl_ctx: ssl.SSLContext,
    handler: PeerHandler,
    *,
    me: LocalNode,
    host: str | None = None,
    options: ChannelOptions | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accepts peer connections on `port` forever; runs `await handler(chan)` for each one that
    completes the TLS and gfvm handshakes. Reports the bound port via task_status (useful with
    port 0; then pass a single `host`).

    `ssl_ctx` comes from `gfvm.pki.server_context`. A connection that fails its handshake, sends
    invalid data or whose handler raises is closed with one log line; the others continue. The
    channel closes when `handler` returns."""
    options = options or ChannelOptions()
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    preauth = trio.CapacityLimiter(options.max_preauth_connections)
    serve_one = partial(
        _serve_one, ssl_ctx=ssl_ctx, handler=handler, me=me, options=options, preauth=preauth
    )
    log.info("serving peers on port %d as %s/%s", bound, me.cluster, me.node)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, serve_one, listeners)
        task_status.started(bound)


async def _serve_one(
    tcp: trio.SocketStream,
    *,
    ssl_ctx: ssl.SSLContext,
    handler: PeerHandler,
    me: LocalNode,
    options: ChannelOptions,
    preauth: trio.CapacityLimiter,
) -> None:
    try:
        host, port = tcp.socket.getpeername()[:2]
        address = f"{host}:{port}"
    except OSError:
        address = "?"
    try:
        preauth.acquire_on_behalf_of_nowait(tcp)
    except trio.WouldBlock:
        log.warning(
            "peer %s: %d connections already authenticating; refused",
            address,
            options.max_preauth_connections,
        )
        await trio.aclose_forcefully(tcp)
        return
    try:
        await _serve_authenticated(tcp, address, ssl_ctx, handler, me, options, preauth)
    except Exception:  # never let one connection take the listener down
        log.exception("peer %s: unexpected error; connection closed", address)
        await trio.aclose_forcefully(tcp)


async def _serve_authenticated(
    tcp: trio.SocketStream,
    address: str,
    ssl_ctx: ssl.SSLContext,
    handler: PeerHandler,
    me: LocalNode,
    options: ChannelOptions,
    preauth: trio.CapacityLimiter,
) -> None:
    try:
        conn = None
        with trio.move_on_after(options.handshake_timeout):
            capped = _PreauthCap(tcp, options.preauth_max_bytes)
            stream = TlsStream(capped, ssl_ctx, server_side=True)
            identity = await _tls_handshake(stream)
            conn = Connection(
                Role.SERVER,
                me,
                peer_identity=identity,
                max_frame_size=options.max_frame_size,
                max_requests=options.max_requests,
            )
            await _wire_handshake(stream, conn, options.receive_size)
            capped.lift()
        if conn is None or conn.state is not State.OPEN:
            log.warning(
                "peer %s: no handshake within %s s; dropped", address, options.handshake_timeout
            )
            await trio.aclose_forcefully(tcp)
            return
    except _HandshakeFailed as exc:
        log.warning("peer %s: %s; connection closed", address, exc)
        await trio.aclose_forcefully(tcp)
        return
    finally:
        preauth.release_on_behalf_of(tcp)
    log.info(
        "peer %s (%s) connected, incarnation %d", conn.peer.node, address, conn.peer.incarnation
    )
    async with _channel_scope(stream, conn, address, options) as chan:
        try:
            await handler(chan)
        except Exception:
            log.exception(
                "peer %s (%s): handler failed; connection closed", chan.peer.node, address
            )
