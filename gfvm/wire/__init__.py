"""gfvm.wire: the node-to-node peer protocol, generic over message types.

Layers (each its own module):
- `fields`, `messages`: how a message is declared, checked and encoded (example below);
- `frames`, `state`, `connection`: the sans-I/O connection (h11-style: bytes in, events out,
  messages in, bytes out; no sockets); `state.py` holds the one transition table and its invariants;
- `net`: the thin trio glue: mutual TLS 1.3, `open_peer`, `serve_peers`, `PeerChannel`
  (import it as `gfvm.wire.net`; it is not re-exported here so that the pure layers stay light);
- `testing`: `ConnectionPair` and hypothesis strategies for your own messages;
- `bench`: `python3 -m gfvm.wire.bench`, throughput over TLS vs plain TCP.
Certificates and TLS contexts come from `gfvm.pki`.

Defining messages (at module level; codes 0x0100-0xEFFF are for applications):

    from gfvm import wire
    from gfvm.wire import U32, U64, Bytes, RelPath, check_page_span, PAGE_SIZE

    @wire.request(0x1001)
    class WritePages:
        file: RelPath            # relative path, every component checked (no '..', '/', NUL...)
        epoch: U64
        offset: U64
        npages: U32
        data: Bytes(1 << 20)     # bulk bytes: bytes or read-only memoryview travel without a copy

        def validate(self):      # optional cross-field checks; raise ValueError
            check_page_span(self.offset, self.npages)
            if len(self.data) != self.npages * PAGE_SIZE:
                raise ValueError("data is not npages pages long")

    @wire.response(0x1002)
    class WriteDone:
        applied_seq: U64

    @wire.oneway(0x1003)
    class Heartbeat:
        now_ns: U64

Field types: U8 U16 U32 U64 I64 Bool, Bytes(max_len), Str(max_len, check=fn), List(item, max_items),
Optional(item), a @wire.record class, and the ready-made Name, RelPath, NodeName, Text.
Invalid values raise LocalProtocolError at construction. Decoded Bytes are read-only memoryviews.

Talking to a peer (trio):

    from gfvm import pki
    from gfvm.wire.net import open_peer, serve_peers

    me = wire.LocalNode(cluster="prod", node="n1", incarnation=boot_id)
    async with open_peer("10.77.0.2", 7077, "n2", pki.client_context(tls_dir), me=me) as chan:
        done = await chan.request(WritePages("procs/7/pages", 3, 0, 1, page))  # -> WriteDone
        await chan.send(Heartbeat(now))                                        # one-way

    async def handler(chan):                 # one call per authenticated connection
        async for msg in chan:               # requests and one-way messages, in arrival order
            if isinstance(msg, WritePages):
                await chan.send(WriteDone(seq, rid=msg.rid))          # a response echoes the rid
                # or: await chan.send(wire.ErrorReply(errno.ESTALE, "stale epoch", rid=msg.rid))
    await nursery.start(partial(serve_peers, 7077, pki.server_context(tls_dir), handler, me=me))

`request` raises RemoteFailure for an ErrorReply and ChannelClosed when the connection goes away;
use `trio.fail_after` around it for timeouts.
"""

from gfvm.wire.connection import (
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
    ProtocolError,
    RemoteFailure,
    RemoteProtocolError,
)
from gfvm.wire.fields import (
    I64,
    MAX_FILE_OFFSET,
    NAME_MAX,
    PAGE_SIZE,
    PATH_MAX,
    U8,
    U16,
    U32,
    U64,
    Bool,
    Bytes,
    List,
    Name,
    NodeName,
    Optional,
    RelPath,
    Str,
    Text,
    check_name,
    check_node_name,
    check_page_span,
    check_relpath,
    check_text,
)
from gfvm.wire.frames import DEFAULT_MAX_FRAME, PROTOCOL_MAX, PROTOCOL_MIN
from gfvm.wire.messages import (
    ErrorReply,
    Kind,
    lookup,
    oneway,
    record,
    registered_codes,
    request,
    response,
    spec_of,
)
from gfvm.wire.state import Role, State

__all__ = [
    # defining messages
    "oneway",
    "request",
    "response",
    "record",
    "ErrorReply",
    "Kind",
    "spec_of",
    "lookup",
    "registered_codes",
    # field types and validators
    "U8",
    "U16",
    "U32",
    "U64",
    "I64",
    "Bool",
    "Bytes",
    "Str",
    "List",
    "Optional",
    "Name",
    "RelPath",
    "NodeName",
    "Text",
    "check_name",
    "check_relpath",
    "check_node_name",
    "check_text",
    "check_page_span",
    "PAGE_SIZE",
    "NAME_MAX",
    "PATH_MAX",
    "MAX_FILE_OFFSET",
    # the sans-I/O connection
    "Connection",
    "LocalNode",
    "PeerInfo",
    "Handshake",
    "ConnectionClosed",
    "NEED_DATA",
    "Role",
    "State",
    "DEFAULT_MAX_FRAME",
    "PROTOCOL_MIN",
    "PROTOCOL_MAX",
    # errors
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "HandshakeRejected",
    "ChannelClosed",
    "ConnectFailed",
    "RemoteFailure",
]
