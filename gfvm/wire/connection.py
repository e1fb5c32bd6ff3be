"""A sans-I/O peer connection (modelled on h11): bytes in -> events out, messages in -> bytes out.

    conn = Connection(Role.CLIENT, me, peer_identity="n2", expected_peer="n2")
    transport.write(conn.initiate())                  # HELLO
    conn.receive_data(transport.read())               # b"" means EOF
    while (event := conn.next_event()) is not NEED_DATA:
        ...  # Handshake(peer), then application messages, finally ConnectionClosed()
    transport.write(conn.send(SomeMessage(...)))

The server side: after `next_event()` returns `Handshake` (a valid HELLO), call `accept()` (or
`reject(reason)`) and write the bytes it returns. Every transition is in `state.py`, whose header
states the invariants. Nothing here blocks or does I/O; one Connection serves one task at a time.

Errors: `next_event` raises RemoteProtocolError when the peer misbehaved (the connection is then
dead: close it); `send`/`initiate`/`accept` raise LocalProtocolError when *we* misbehaved (nothing
was sent and the state is unchanged).

Buffers: `receive_data` keeps a reference to the buffer it is given (no copy): hand it a buffer
you will not modify. Bodies up to 64 KiB are copied out (so a small decoded field never pins a big
receive buffer); a larger body is assembled once into its own buffer, or viewed in place when it
lies within one received buffer. Decoded Bytes fields are read-only views of that body.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

from gfvm.wire import state as st
from gfvm.wire.errors import HandshakeRejected, LocalProtocolError, RemoteProtocolError
from gfvm.wire.fields import check_node_name
from gfvm.wire.frames import (
    DEFAULT_MAX_FRAME,
    HANDSHAKE_MAX_FRAME,
    HEADER_SIZE,
    MAX_FRAME_LIMIT,
    PROTOCOL_MAX,
    PROTOCOL_MIN,
    build_frame,
    parse_header,
)
from gfvm.wire.messages import (
    Hello,
    HelloAck,
    HelloReject,
    Kind,
    MessageSpec,
    decode_body,
    encode_body,
    lookup,
    spec_of,
)
from gfvm.wire.state import Frame, Role, State

#: default cap on requests outstanding in one direction
DEFAULT_MAX_REQUESTS = 65536
_COPY_BELOW = 64 * 1024


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: `next_event` returns this when it needs more bytes (or an EOF) before it can say more
NEED_DATA = _Sentinel("NEED_DATA")


@dataclasses.dataclass(frozen=True)
class ConnectionClosed:
    """Event: the peer closed the connection cleanly (EOF on a frame boundary)."""


@dataclasses.dataclass(frozen=True)
class LocalNode:
    """Who we are in handshakes: cluster name, our node name, and this daemon run's incarnation."""

    cluster: str
    node: str
    incarnation: int

    def __post_init__(self) -> None:
        try:
            check_node_name(self.cluster)
            check_node_name(self.node)
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from None
        if type(self.incarnation) is not int or not 0 <= self.incarnation < (1 << 64):
            raise LocalProtocolError(f"incarnation {self.incarnation!r} is not a u64")


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    """The authenticated peer: its node name (= its certificate's), incarnation, agreed version."""

    node: str
    incarnation: int
    version: int


@dataclasses.dataclass(frozen=True)
class Handshake:
    """Event: a valid handshake frame arrived (server: the HELLO, reply with accept(); client:
    the HELLO_ACK, the connection is open)."""

    peer: PeerInfo


_HANDSHAKE_FRAMES = {Hello: Frame.HELLO, HelloAck: Frame.HELLO_ACK, HelloReject: Frame.HELLO_REJECT}


class Connection:
    """One end of a peer connection, without I/O. See the module docstring."""

    def __init__(
        self,
        role: Role,
        me: LocalNode,
        *,
        peer_identity: str,
        expected_peer: str | None = None,
        versions: tuple[int, int] = (PROTOCOL_MIN, PROTOCOL_MAX),
        max_frame_size: int = DEFAULT_MAX_FRAME,
        max_requests: int = DEFAULT_MAX_REQUESTS,
    ) -> None:
        """`peer_identity`: the node name in the peer's verified TLS certificate.
        `expected_peer` (clients): the node we meant to reach. `max_frame_size` caps a frame body
        both ways; `max_requests` caps outstanding requests in each direction."""
        if not 0 < versions[0] <= versions[1] < (1 << 16):
            raise LocalProtocolError(f"bad version range {versions}")
        if not HANDSHAKE_MAX_FRAME <= max_frame_size <= MAX_FRAME_LIMIT:
            raise LocalProtocolError(
                f"max_frame_size {max_frame_size} outside {HANDSHAKE_MAX_FRAME}..{MAX_FRAME_LIMIT}"
            )
        if role is Role.SERVER and expected_peer is not None:
            raise LocalProtocolError("expected_peer is for clients")
        self.role = role
        self.me = me
        self.peer_identity = peer_identity
        self.expected_peer = expected_peer
        self.versions = versions
        self.max_frame_size = max_frame_size
        self.max_requests = max_requests
        self.state = st.INITIAL[role]
        #: set by the handshake; None before
        self.peer: PeerInfo | None = None
        self._error: RemoteProtocolError | None = None
        self._chunks: deque[memoryview] = deque()
        self._buffered = 0
        self._eof = False
        self._pending_header: tuple[MessageSpec, Frame, int, int] | None = None
        self._next_rid = 1
        self._own_requests: set[int] = set()  # rids we sent, awaiting a response
        self._peer_requests: set[int] = set()  # rids the peer sent, awaiting our response
        self._stats = {"frames_sent": 0, "bytes_sent": 0, "frames_received": 0, "bytes_received": 0}
        #: body size of the frame behind the last event (for the glue's buffer accounting)
        self.last_frame_size = 0

    # --- introspection ---------------------------------------------------------------------------

    @property
    def version(self) -> int | None:
        """The protocol version agreed in the handshake (None before)."""
        return self.peer.version if self.peer else None

    def statistics(self) -> dict[str, int]:
        """Frame and byte counters, outstanding requests each way, bytes buffered. Never blocks."""
        return {
            **self._stats,
            "own_requests": len(self._own_requests),
            "peer_requests": len(self._peer_requests),
            "buffered": self._buffered,
        }

    def new_rid(self) -> int:
        """A request id never used before on this connection (for `msg.with_rid(rid)`)."""
        rid = self._next_rid
        self._next_rid += 1
        return rid

    # --- sending ---------------------------------------------------------------------------------

    def initiate(self) -> bytes:
        """Client: the HELLO frame that opens the handshake."""
        lo, hi = self.versions
        return self._send_handshake(
            Hello(lo, hi, self.me.cluster, self.me.node, self.me.incarnation)
        )

    def accept(self) -> bytes:
        """Server, after the `Handshake` event: the HELLO_ACK frame; the connection is then OPEN.

        Raises RemoteProtocolError if the client already sent more bytes (it must wait for this
        ACK)."""
        if self.peer is None or self.state is not State.SERVER_GOT_HELLO:
            raise LocalProtocolError(f"accept() in state {self.state.value}")
        self._refuse_early_data()
        return self._send_handshake(
            HelloAck(self.peer.version, self.me.cluster, self.me.node, self.me.incarnation)
        )

    def reject(self, reason: str) -> bytes:
        """Server, after the `Handshake` event: a HELLO_REJECT frame; the connection then CLOSED."""
        return self._send_handshake(HelloReject(reason))

    def send(self, msg: Any) -> bytes:
        """The frame for application message `msg`, as one bytes object (see `send_chunks`)."""
        return b"".join(self.send_chunks(msg))

    def send_chunks(self, msg: Any) -> list[bytes | memoryview]:
        """The frame for `msg` as buffers to write in order; bulk Bytes fields are not copied.

        A REQUEST needs a fresh rid (`msg.with_rid(conn.new_rid())`); a RESPONSE must carry the
        rid of a request the peer sent and we have not answered yet. LocalProtocolError otherwise,
        with nothing changed.
        """
        spec = spec_of(msg)
        if spec.kind is Kind.HANDSHAKE:
            raise LocalProtocolError(f"{spec.cls.__name__} is sent by initiate/accept/reject only")
        next_state = self._check_send(Frame.APP)
        rid = msg.rid
        if spec.kind is Kind.REQUEST:
            if rid == 0:
                raise LocalProtocolError(
                    f"{spec.cls.__name__} is a request: give it rid=conn.new_rid()"
                )
            if rid in self._own_requests:
                raise LocalProtocolError(f"request id {rid} is already outstanding")
            if len(self._own_requests) >= self.max_requests:
                raise LocalProtocolError(f"{self.max_requests} requests already outstanding")
        elif spec.kind is Kind.RESPONSE and rid not in self._peer_requests:
            raise LocalProtocolError(
                f"{spec.cls.__name__} answers rid {rid}: not asked by the peer, or answered"
            )
        chunks = self._encode(spec, msg)
        if spec.kind is Kind.REQUEST:
            self._own_requests.add(rid)
        elif spec.kind is Kind.RESPONSE:
            self._peer_requests.discard(rid)
        self.state = next_state
        return chunks

    def _send_handshake(self, msg: Any) -> bytes:
        next_state = self._check_send(_HANDSHAKE_FRAMES[type(msg)])
        data = b"".join(self._encode(spec_of(msg), msg))
        self.state = next_state
        return data

    def _check_send(self, frame: Frame) -> State:
        try:
            return st.SEND[(self.state, frame)]
        except KeyError:
            raise LocalProtocolError(
                f"cannot send {frame.value} in state {self.state.value}"
            ) from None

    def _encode(self, spec: MessageSpec, msg: Any) -> list[bytes | memoryview]:
        _, out = encode_body(msg)
        parts = out.finish()
        cap = HANDSHAKE_MAX_FRAME if spec.kind is Kind.HANDSHAKE else self.max_frame_size
        chunks = build_frame(spec.code, msg.rid, parts, out.size, cap)
        self._stats["frames_sent"] += 1
        self._stats["bytes_sent"] += HEADER_SIZE + out.size
        return chunks

    # --- receiving -------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Adds bytes received from the peer; b"" means the peer closed (EOF). Never blocks.

        The connection keeps a reference to `data` (see the module docstring)."""
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if not data:
            self._eof = True
            return
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self._chunks.append(view)
        self._buffered += len(view)
        self._stats["bytes_received"] += len(view)

    def next_event(self) -> Any:
        """The next event: Handshake, an application message, NEED_DATA or ConnectionClosed.

        Raises RemoteProtocolError (and keeps raising it) once the peer broke the protocol."""
        if self.state is State.ERROR:
            assert self._error is not None
            raise self._error
        if self.state is State.CLOSED:
            return ConnectionClosed()
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self.state = State.ERROR
            self._error = exc
            raise

    def _next_event(self) -> Any:
        if self._pending_header is None:
            if self._buffered < HEADER_SIZE:
                return self._need_data("frame header", self._buffered, HEADER_SIZE)
            header = self._take(HEADER_SIZE)
            cap = HANDSHAKE_MAX_FRAME if self.state in st.PRE_OPEN else self.max_frame_size
            code, rid, length = parse_header(header, cap)
            spec = lookup(code)
            if spec is None:
                raise RemoteProtocolError(f"unknown message type {code:#06x}")
            frame = _HANDSHAKE_FRAMES.get(spec.cls, Frame.APP)
            if (self.state, frame) not in st.RECEIVE:
                raise RemoteProtocolError(
                    f"{spec.cls.__name__} ({frame.value}) in state {self.state.value}"
                )
            self._pending_header = (spec, frame, rid, length)
        spec, frame, rid, length = self._pending_header
        if self._buffered < length:
            return self._need_data(f"{spec.cls.__name__} frame", self._buffered, length)
        body = self._take(length)
        self._pending_header = None
        self.last_frame_size = length
        msg = decode_body(spec, rid, body)
        if frame is Frame.APP:
            self._check_received_rid(spec, rid)
        else:
            msg = self._receive_handshake(frame, msg)
        self._stats["frames_received"] += 1
        return msg

    def _need_data(self, what: str, have: int, need: int) -> Any:
        if not self._eof:
            return NEED_DATA
        if what == "frame header" and have == 0:
            self.state = st.RECEIVE[(self.state, Frame.EOF)]
            return ConnectionClosed()
        raise RemoteProtocolError(f"connection closed inside a {what} ({have} of {need} bytes)")

    def _check_received_rid(self, spec: MessageSpec, rid: int) -> None:
        name = spec.cls.__name__
        if spec.kind is Kind.REQUEST:
            if rid == 0:
                raise RemoteProtocolError(f"{name} is a request but carries rid 0")
            if rid in self._peer_requests:
                raise RemoteProtocolError(f"{name}: request id {rid} is already outstanding")
            if len(self._peer_requests) >= self.max_requests:
                raise RemoteProtocolError(
                    f"peer has more than {self.max_requests} requests outstanding"
                )
            self._peer_requests.add(rid)
        elif spec.kind is Kind.RESPONSE:
            if rid not in self._own_requests:
                raise RemoteProtocolError(
                    f"{name} answers request id {rid}, which we did not send (or was answered)"
                )
            self._own_requests.discard(rid)

    def _receive_handshake(self, frame: Frame, msg: Any) -> Any:
        if frame is Frame.HELLO_REJECT:
            raise HandshakeRejected(msg.reason)
        if frame is Frame.HELLO:
            self._refuse_early_data()
            version = self._check_hello(msg)
            self.peer = PeerInfo(msg.node, msg.incarnation, version)
        else:
            self._check_hello_ack(msg)
            self.peer = PeerInfo(msg.node, msg.incarnation, msg.version)
        self.state = st.RECEIVE[(self.state, frame)]
        return Handshake(self.peer)

    def _refuse_early_data(self) -> None:
        """A client may send nothing after its HELLO until our HELLO_ACK: bytes already here
        would otherwise be read as if they came after the handshake."""
        if self._buffered or self._pending_header is not None:
            self._error = RemoteProtocolError("data after HELLO before the HELLO_ACK")
            self.state = State.ERROR
            raise self._error

    def _check_hello(self, hello: Hello) -> int:
        def refuse(reason: str) -> RemoteProtocolError:
            reply = b"".join(self._encode(spec_of(HelloReject), HelloReject(reason)))
            return RemoteProtocolError(f"HELLO refused: {reason}", reply=reply)

        if hello.cluster != self.me.cluster:
            raise refuse(f"wrong cluster: {hello.cluster!r} is not {self.me.cluster!r}")
        if hello.node != self.peer_identity:
            raise refuse(
                f"claims node {hello.node!r} but its certificate is {self.peer_identity!r}"
            )
        if hello.node == self.me.node:
            raise refuse(f"connection from our own name {hello.node!r}")
        version = min(hello.max_version, self.versions[1])
        if version < max(hello.min_version, self.versions[0]):
            raise refuse(
                f"no common protocol version (peer {hello.min_version}-{hello.max_version}, "
                f"us {self.versions[0]}-{self.versions[1]})"
            )
        return version

    def _check_hello_ack(self, ack: HelloAck) -> None:
        if not self.versions[0] <= ack.version <= self.versions[1]:
            raise RemoteProtocolError(
                f"peer chose protocol version {ack.version}, we offered {self.versions}"
            )
        if ack.cluster != self.me.cluster:
            raise RemoteProtocolError(
                f"peer is in cluster {ack.cluster!r}, not {self.me.cluster!r}"
            )
        if ack.node != self.peer_identity:
            raise RemoteProtocolError(
                f"peer claims node {ack.node!r} but its certificate is {self.peer_identity!r}"
            )
        if self.expected_peer is not None and ack.node != self.expected_peer:
            raise RemoteProtocolError(f"reached node {ack.node!r}, expected {self.expected_peer!r}")
        if ack.node == self.me.node:
            raise RemoteProtocolError(f"connected to ourselves ({ack.node!r})")

    def _take(self, n: int) -> memoryview:
        """The next n buffered bytes as a read-only view (n <= self._buffered)."""
        if n == 0:
            return memoryview(b"")
        self._buffered -= n
        first = self._chunks[0]
        if len(first) >= n and n >= _COPY_BELOW:
            # big body inside one received buffer: view it in place
            if len(first) == n:
                self._chunks.popleft()
            else:
                self._chunks[0] = first[n:]
            return first[:n].toreadonly()
        out = bytearray(n)
        dest = memoryview(out)
        pos = 0
        while pos < n:
            chunk = self._chunks[0]
            k = min(len(chunk), n - pos)
            dest[pos : pos + k] = chunk[:k]
            pos += k
            if k == len(chunk):
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[k:]
        return dest.toreadonly()
