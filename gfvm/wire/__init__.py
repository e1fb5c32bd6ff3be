"""gfvm.wire: the node-to-node peer protocol, generic over message types.

Layers (each its own module):
- `fields`, `messages`: how a message is declared, checked, encoded (this page's example);
- `frames`, `state`, `connection`: the sans-I/O connection (h11-style: bytes in, events out,
  messages in, bytes out; no sockets);
- `net`: the thin trio glue (mutual TLS 1.3, `open_peer`, `serve_peers`, `PeerChannel`);
- `testing`: `ConnectionPair` and hypothesis strategies for your own messages.

Defining messages (at module level; codes 0x0100-0xFFFF are yours):

    from gfvm import wire
    from gfvm.wire import U32, U64, Bytes, RelPath, check_page_span, PAGE_SIZE

    @wire.request(0x1001)
    class WritePages:
        file: RelPath            # relative path, every component checked (no '..', '/', NUL...)
        epoch: U64
        offset: U64
        npages: U32
        data: Bytes(1 << 20)     # bulk bytes: bytes or read-only memoryview travel without a copy

        def validate(self):      # optional; raise ValueError
            check_page_span(self.offset, self.npages)
            if len(self.data) != self.npages * PAGE_SIZE:
                raise ValueError("data is not npages pages long")

    @wire.response(0x1002)
    class WriteDone:
        applied_seq: U64

    @wire.oneway(0x1003)
    class Heartbeat:
        now_ns: U64

    msg = WritePages("procs/7/pages", 3, 0, 1, bytes(4096))   # rid=0: the channel assigns it
    ack = WriteDone(42, rid=some_request.rid)                 # a response echoes the request's rid

Field types: U8 U16 U32 U64 I64 Bool, Bytes(max_len), Str(max_len, check=fn), List(item, max_items),
Optional(item), a @wire.record class, and the ready-made Name, RelPath, NodeName, Text.
Invalid values raise LocalProtocolError at construction. Decoded Bytes are read-only memoryviews.
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
    MAX_FILE_OFFSET,
    NAME_MAX,
    PAGE_SIZE,
    PATH_MAX,
    U8,
    U16,
    U32,
    U64,
    I64,
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
from gfvm.wire.state import Role, State
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

__all__ = [
    "Bool", "Bytes", "ChannelClosed", "ConnectFailed", "ErrorReply", "HandshakeRejected", "I64",
    "Kind", "List", "LocalProtocolError", "MAX_FILE_OFFSET", "NAME_MAX", "Name", "NodeName",
    "Optional", "PAGE_SIZE", "PATH_MAX", "ProtocolError", "RelPath", "RemoteFailure",
    "RemoteProtocolError", "Str", "Text", "U16", "U32", "U64", "U8", "check_name",
    "check_node_name", "check_page_span", "check_relpath", "check_text", "lookup", "oneway",
    "record", "registered_codes", "request", "response", "spec_of",
    "NEED_DATA", "Connection", "ConnectionClosed", "Handshake", "LocalNode", "PeerInfo", "Role",
    "State", "DEFAULT_MAX_FRAME", "PROTOCOL_MAX", "PROTOCOL_MIN",
]
