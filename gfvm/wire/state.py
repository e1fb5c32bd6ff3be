"""The state machine of one peer connection: every allowed transition is in the two tables below.

Invariants (what the tables and `connection.py` together guarantee):
1. Before OPEN only handshake frames cross the connection. The client sends exactly one HELLO and
   nothing else until it has received HELLO_ACK; the server answers that HELLO with exactly one
   HELLO_ACK (-> OPEN) or HELLO_REJECT (-> CLOSED). Any other frame before OPEN, in either
   direction, is a protocol error, and so is any byte that reaches the server after the HELLO and
   before it sent HELLO_ACK. Frames before OPEN are capped at HANDSHAKE_MAX_FRAME bytes.
2. A handshake succeeds only if: the cluster names are equal; the peer's claimed node name equals
   the identity of its TLS certificate (given by the glue) and is not our own name; on the client
   it is also the node we meant to reach; the version ranges overlap (the server picks the highest
   common version and the client checks it is within what it offered).
3. Application frames (ONEWAY / REQUEST / RESPONSE) flow only in OPEN, both ways.
4. Request ids: a REQUEST carries a rid != 0 not already outstanding in its direction; a RESPONSE
   carries the rid of an outstanding request of the other direction and retires it; a ONEWAY
   frame carries rid 0. Each direction has its own rid space and its own cap on outstanding ids.
5. ERROR and CLOSED are terminal. A RemoteProtocolError moves to ERROR before it is raised, and
   every later `next_event` raises it again; nothing of the offending frame is applied. The one
   exception to "nothing is sent after ERROR": a server that refuses a HELLO gets a HELLO_REJECT
   frame in `RemoteProtocolError.reply`, to send before closing.
6. EOF on a frame boundary -> CLOSED (a clean close); EOF inside a frame -> ERROR (truncated).
"""

from __future__ import annotations

import enum


class Role(enum.Enum):
    CLIENT = "client"  # opened the connection, sends HELLO
    SERVER = "server"  # accepted it, answers HELLO


class State(enum.Enum):
    CLIENT_IDLE = "client-idle"  # nothing sent yet
    CLIENT_SENT_HELLO = "client-sent-hello"  # waiting for HELLO_ACK / HELLO_REJECT
    SERVER_AWAIT_HELLO = "server-await-hello"
    SERVER_GOT_HELLO = "server-got-hello"  # valid HELLO received; must accept() or reject()
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"


class Frame(enum.Enum):
    HELLO = "HELLO"
    HELLO_ACK = "HELLO_ACK"
    HELLO_REJECT = "HELLO_REJECT"
    APP = "application frame"
    EOF = "EOF"


INITIAL = {Role.CLIENT: State.CLIENT_IDLE, Role.SERVER: State.SERVER_AWAIT_HELLO}

#: (state, frame we send) -> next state
SEND: dict[tuple[State, Frame], State] = {
    (State.CLIENT_IDLE, Frame.HELLO): State.CLIENT_SENT_HELLO,
    (State.SERVER_GOT_HELLO, Frame.HELLO_ACK): State.OPEN,
    (State.SERVER_GOT_HELLO, Frame.HELLO_REJECT): State.CLOSED,
    (State.OPEN, Frame.APP): State.OPEN,
}

#: (state, frame we receive) -> next state
RECEIVE: dict[tuple[State, Frame], State] = {
    (State.SERVER_AWAIT_HELLO, Frame.HELLO): State.SERVER_GOT_HELLO,
    (State.CLIENT_SENT_HELLO, Frame.HELLO_ACK): State.OPEN,
    (State.CLIENT_SENT_HELLO, Frame.HELLO_REJECT): State.ERROR,  # raised as HandshakeRejected
    (State.OPEN, Frame.APP): State.OPEN,
    # a clean EOF (on a frame boundary) closes from any live state
    **{(s, Frame.EOF): State.CLOSED for s in State if s not in (State.CLOSED, State.ERROR)},
}

#: states in which frames are still limited to the handshake cap
PRE_OPEN = frozenset(
    {State.CLIENT_IDLE, State.CLIENT_SENT_HELLO, State.SERVER_AWAIT_HELLO, State.SERVER_GOT_HELLO}
)
