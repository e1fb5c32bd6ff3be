"""Test helpers for gfvm.wire users: an in-memory pair of connections and hypothesis strategies.

    pair = ConnectionPair()          # client n1 <-> server n2, cluster "test"
    pair.handshake()
    [msg] = pair.send(pair.client, WritePages(..., rid=pair.client.new_rid()))
    [ack] = pair.send(pair.server, WriteDone(1, rid=msg.rid))

    @given(message_strategy(WritePages, data=st.just(bytes(4096)), npages=st.just(1)))
    def test_roundtrip(msg): ...

Not used by production code; `hypothesis` is imported only when a strategy is asked for.
"""

from __future__ import annotations

from typing import Any

from gfvm.config import NODE_NAME_RE
from gfvm.wire.connection import NEED_DATA, Connection, ConnectionClosed, Handshake, LocalNode
from gfvm.wire.errors import LocalProtocolError
from gfvm.wire.fields import (
    BoolType,
    BytesType,
    ListType,
    OptionalType,
    SInt64,
    StrType,
    UInt,
    WireType,
    check_name,
    check_node_name,
    check_relpath,
    check_text,
)
from gfvm.wire.messages import _RecordType, spec_of
from gfvm.wire.state import Role


class ConnectionPair:
    """Two Connections wired back to back in memory (bytes pass only when you say so)."""

    def __init__(
        self,
        client: LocalNode | None = None,
        server: LocalNode | None = None,
        **conn_options: Any,
    ) -> None:
        self.client_node = client or LocalNode("test", "n1", 1)
        self.server_node = server or LocalNode("test", "n2", 2)
        self.client = Connection(
            Role.CLIENT,
            self.client_node,
            peer_identity=self.server_node.node,
            expected_peer=self.server_node.node,
            **conn_options,
        )
        self.server = Connection(
            Role.SERVER, self.server_node, peer_identity=self.client_node.node, **conn_options
        )

    def other(self, conn: Connection) -> Connection:
        return self.server if conn is self.client else self.client

    def deliver(self, to: Connection, data: bytes) -> list[Any]:
        """Feeds `data` to `to` and returns every event it yields, up to NEED_DATA."""
        to.receive_data(data)
        return drain(to)

    def send(self, sender: Connection, msg: Any) -> list[Any]:
        """Sends `msg` from `sender`; returns the events the other end sees."""
        return self.deliver(self.other(sender), sender.send(msg))

    def handshake(self) -> None:
        """Runs HELLO / HELLO_ACK; both ends are OPEN afterwards."""
        [ev] = self.deliver(self.server, self.client.initiate())
        assert isinstance(ev, Handshake), ev
        [ev] = self.deliver(self.client, self.server.accept())
        assert isinstance(ev, Handshake), ev


def drain(conn: Connection) -> list[Any]:
    """Every event `conn` can produce now (stops at NEED_DATA, after ConnectionClosed)."""
    events = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return events
        events.append(ev)
        if isinstance(ev, ConnectionClosed):
            return events


# --- hypothesis strategies ------------------------------------------------------------------------


def value_strategy(wt: WireType, *, max_bytes: int = 64, max_items: int = 4) -> Any:
    """A hypothesis strategy for values of one field type (sizes kept small by default)."""
    from hypothesis import strategies as st

    if isinstance(wt, UInt):
        return st.integers(0, wt.max)
    if isinstance(wt, SInt64):
        return st.integers(-(1 << 63), (1 << 63) - 1)
    if isinstance(wt, BoolType):
        return st.booleans()
    if isinstance(wt, BytesType):
        return st.binary(max_size=min(wt.max_len, max_bytes))
    if isinstance(wt, StrType):
        return _str_strategy(wt)
    if isinstance(wt, ListType):
        item = value_strategy(wt.item, max_bytes=max_bytes, max_items=max_items)
        return st.lists(item, max_size=min(wt.max_items, max_items)).map(tuple)
    if isinstance(wt, OptionalType):
        return st.none() | value_strategy(wt.item, max_bytes=max_bytes, max_items=max_items)
    if isinstance(wt, _RecordType):
        return _build(wt.cls, wt.names, wt.types, {}, max_bytes, max_items)
    raise TypeError(f"no strategy for {wt.describe()}")


def _str_strategy(wt: StrType) -> Any:
    from hypothesis import strategies as st

    name_chars = st.characters(
        blacklist_categories=("Cc", "Cs"), blacklist_characters="/\u2028\u2029"
    )
    name = st.text(name_chars, min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
    check = wt.check_fn
    if check is check_node_name:
        base = st.from_regex(NODE_NAME_RE, fullmatch=True)
    elif check is check_name:
        base = name
    elif check is check_relpath:
        base = st.lists(name, min_size=1, max_size=4).map("/".join)
    elif check is check_text or check is None:
        base = st.text(name_chars, max_size=40)
    else:
        base = st.text(max_size=40)
    return base.filter(lambda s: len(s.encode()) <= wt.max_len and _passes(check, s))


def _passes(check: Any, value: str) -> bool:
    if check is None:
        return True
    try:
        check(value)
    except ValueError:
        return False
    return True


def message_strategy(cls: type, *, max_bytes: int = 64, max_items: int = 4, **fields: Any) -> Any:
    """A strategy for valid instances of message class `cls` (rid left at 0 unless given).

    Pass strategies for some fields as keywords when `validate()` ties fields together (e.g.
    `data=st.just(bytes(4096)), npages=st.just(1)`); generated values that fail validation are
    rejected, not returned."""
    spec = spec_of(cls)
    return _build(cls, spec.names, spec.types, fields, max_bytes, max_items)


def _build(cls, names, types, overrides, max_bytes, max_items) -> Any:
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        kwargs = {}
        for name, wt in zip(names, types, strict=True):
            strategy = overrides.get(name)
            if strategy is None:
                strategy = value_strategy(wt, max_bytes=max_bytes, max_items=max_items)
            kwargs[name] = draw(strategy)
        if "rid" in overrides:
            kwargs["rid"] = draw(overrides["rid"])
        try:
            return cls(**kwargs)
        except LocalProtocolError:
            from hypothesis import reject

            reject()

    return build()
