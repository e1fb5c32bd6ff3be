"""The sans-I/O connection: handshake, framing, request ids, and every hostile input of
RELIABILITY.md "Hostile and bad input - Wire" that belongs to the framing/handshake layer."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_wire_samples import (
    AllTypes,
    Empty,
    Note,
    Ping,
    Pong,
    PutDone,
    PutPages,
    all_types,
    lp,
    raw_frame,
)

from gfvm.wire import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    Handshake,
    HandshakeRejected,
    LocalNode,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    State,
)
from gfvm.wire.frames import HANDSHAKE_MAX_FRAME, HEADER_SIZE
from gfvm.wire.messages import ErrorReply, Hello, HelloAck, spec_of
from gfvm.wire.testing import ConnectionPair, drain

HELLO = spec_of(Hello).code
HELLO_ACK = spec_of(HelloAck).code
NOTE = spec_of(Note).code
PUT = spec_of(PutPages).code
PUT_DONE = spec_of(PutDone).code
EMPTY = spec_of(Empty).code
ALL = spec_of(AllTypes).code


def open_pair(**options) -> ConnectionPair:
    pair = ConnectionPair(**options)
    pair.handshake()
    return pair


def client_stream() -> tuple[bytes, list]:
    """Bytes a client sends after the handshake (several frames) and the messages they carry."""
    pair = open_pair()
    msgs = [
        Note("one"),
        PutPages("procs/1/pages", 3, 0, 1, bytes(range(256)) * 16, rid=pair.client.new_rid()),
        all_types(),
        Empty(),
        PutPages("p", 3, 4096, 0, b"", rid=pair.client.new_rid()),
    ]
    return b"".join(pair.client.send(m) for m in msgs), msgs


def hello_bytes(**fields) -> bytes:
    values = dict(min_version=1, max_version=1, cluster="test", node="n1", incarnation=1)
    values.update(fields)
    conn = Connection(Role.CLIENT, LocalNode("test", "n9", 1), peer_identity="n2")
    return conn._send_handshake(Hello(**values))


def server(**options) -> Connection:
    return Connection(Role.SERVER, LocalNode("test", "n2", 2), peer_identity="n1", **options)


def open_server() -> Connection:
    conn = server()
    conn.receive_data(hello_bytes())
    assert isinstance(conn.next_event(), Handshake)
    conn.accept()
    assert conn.state is State.OPEN
    return conn


def feed(conn: Connection, data: bytes) -> list:
    """Feeds data (b"" means nothing here, not EOF) and returns the events."""
    if data:
        conn.receive_data(data)
    return drain(conn)


def feed_error(conn: Connection, data: bytes, match: str) -> RemoteProtocolError:
    """Feeds data, expects RemoteProtocolError matching `match`, checks the error sticks."""
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match) as info:
        drain(conn)
    assert conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError) as again:
        conn.next_event()
    assert again.value is info.value  # every later call raises the same error
    return info.value


# --- handshake ------------------------------------------------------------------------------------


def test_handshake_opens_both_ends_with_peer_info():
    pair = open_pair()
    assert pair.client.state is State.OPEN and pair.server.state is State.OPEN
    assert pair.client.peer.node == "n2" and pair.client.peer.incarnation == 2
    assert pair.server.peer.node == "n1" and pair.server.peer.incarnation == 1
    assert pair.client.version == pair.server.version == 1


def test_highest_common_version_is_chosen():
    pair = ConnectionPair()
    pair.client = Connection(Role.CLIENT, pair.client_node, peer_identity="n2", versions=(1, 5))
    pair.server = Connection(Role.SERVER, pair.server_node, peer_identity="n1", versions=(2, 3))
    pair.handshake()
    assert pair.client.version == pair.server.version == 3


@pytest.mark.parametrize(
    "fields,reason",
    [
        (dict(cluster="other"), "wrong cluster"),
        (dict(node="n3"), "certificate is 'n1'"),
        (dict(min_version=2, max_version=4), "no common protocol version"),
    ],
)
def test_server_refuses_bad_hello_with_a_reject_frame(fields, reason):
    conn = server()
    error = feed_error(conn, hello_bytes(**fields), reason)
    # the reply tells a (misconfigured) client why; the client raises HandshakeRejected
    client = Connection(Role.CLIENT, LocalNode("test", "n1", 1), peer_identity="n2")
    client.initiate()
    client.receive_data(error.reply)
    with pytest.raises(HandshakeRejected, match=reason):
        client.next_event()


def test_server_refuses_a_connection_from_its_own_name():
    conn = Connection(Role.SERVER, LocalNode("test", "n1", 2), peer_identity="n1")
    feed_error(conn, hello_bytes(), "our own name")


def test_client_refuses_ack_from_an_unexpected_node():
    client = Connection(
        Role.CLIENT, LocalNode("test", "n1", 1), peer_identity="n3", expected_peer="n2"
    )
    client.initiate()
    srv = Connection(Role.SERVER, LocalNode("test", "n3", 3), peer_identity="n1")
    srv.receive_data(hello_bytes())
    srv.next_event()
    feed_error(client, srv.accept(), "expected 'n2'")


def test_client_refuses_ack_whose_claim_differs_from_the_certificate():
    client = Connection(Role.CLIENT, LocalNode("test", "n1", 1), peer_identity="n2")
    client.initiate()
    ack = Connection(Role.CLIENT, LocalNode("test", "n1", 1), peer_identity="x")
    ack.state = State.SERVER_GOT_HELLO  # forge a server end that claims n3
    frame = ack._send_handshake(HelloAck(1, "test", "n3", 3))
    feed_error(client, frame, "certificate is 'n2'")


def test_client_refuses_a_version_it_did_not_offer():
    client = Connection(Role.CLIENT, LocalNode("test", "n1", 1), peer_identity="n2")
    client.initiate()
    forge = Connection(Role.CLIENT, LocalNode("test", "n1", 1), peer_identity="x")
    forge.state = State.SERVER_GOT_HELLO
    feed_error(client, forge._send_handshake(HelloAck(7, "test", "n2", 3)), "version 7")


def test_server_may_reject_after_a_valid_hello():
    conn = server()
    conn.receive_data(hello_bytes())
    assert isinstance(conn.next_event(), Handshake)
    frame = conn.reject("too many connections from n1")
    assert conn.state is State.CLOSED
    client = Connection(Role.CLIENT, LocalNode("test", "n1", 1), peer_identity="n2")
    client.initiate()
    client.receive_data(frame)
    with pytest.raises(HandshakeRejected, match="too many"):
        client.next_event()


def test_nothing_but_hello_can_be_sent_before_the_handshake():
    pair = ConnectionPair()
    with pytest.raises(LocalProtocolError):
        pair.client.send(Note("early"))
    with pytest.raises(LocalProtocolError):
        pair.server.accept()  # no HELLO yet
    pair.client.initiate()
    with pytest.raises(LocalProtocolError):
        pair.client.initiate()  # only one HELLO
    with pytest.raises(LocalProtocolError):
        pair.client.send(Note("still early"))


# --- request ids ----------------------------------------------------------------------------------


def test_request_and_response_are_matched_by_rid():
    pair = open_pair()
    rids = [pair.client.new_rid() for _ in range(3)]
    reqs = [pair.send(pair.client, Ping(rid=r))[0] for r in rids]
    assert [r.rid for r in reqs] == rids
    assert pair.client.statistics()["own_requests"] == 3
    for req in reversed(reqs):  # answered out of order
        [resp] = pair.send(pair.server, Pong(rid=req.rid))
        assert resp.rid == req.rid
    assert pair.client.statistics()["own_requests"] == 0
    assert pair.server.statistics()["peer_requests"] == 0


def test_both_directions_have_their_own_rid_space():
    pair = open_pair()
    [a] = pair.send(pair.client, Ping(rid=1))
    [b] = pair.send(pair.server, Ping(rid=1))
    assert pair.send(pair.server, Pong(rid=a.rid)) == [Pong(rid=1)]
    assert pair.send(pair.client, ErrorReply(5, "no", rid=b.rid)) == [ErrorReply(5, "no", rid=1)]


def test_local_rid_misuse_is_refused_without_sending():
    pair = open_pair()
    with pytest.raises(LocalProtocolError, match="new_rid"):
        pair.client.send(Ping())
    with pytest.raises(LocalProtocolError, match="not asked by the peer"):
        pair.client.send(Pong(rid=5))
    pair.client.send(Ping(rid=3))
    with pytest.raises(LocalProtocolError, match="already outstanding"):
        pair.client.send(Ping(rid=3))
    assert pair.client.statistics()["own_requests"] == 1
    assert pair.client.state is State.OPEN  # a local error changes nothing


def test_request_cap_is_enforced_both_ways():
    pair = open_pair(max_requests=2)
    pair.send(pair.client, Ping(rid=1))
    pair.send(pair.client, Ping(rid=2))
    with pytest.raises(LocalProtocolError, match="2 requests"):
        pair.client.send(Ping(rid=3))
    srv = pair.server
    feed_error(srv, raw_frame(spec_of(Ping).code, rid=3), "more than 2 requests")


@pytest.mark.parametrize(
    "frame,match",
    [
        (lambda: raw_frame(spec_of(Ping).code, rid=0), "rid 0"),
        (lambda: raw_frame(NOTE, lp(b"x"), rid=4), "rid must be 0"),
        (lambda: raw_frame(PUT_DONE, struct.pack("<Q", 1), rid=77), "did not send"),
        (lambda: raw_frame(PUT_DONE, struct.pack("<Q", 1), rid=0), "rid"),
    ],
    ids=["request-rid-0", "oneway-with-rid", "ack-for-unsent-request", "response-rid-0"],
)
def test_peer_rid_violations(frame, match):
    feed_error(open_server(), frame(), match)


def test_duplicate_outstanding_request_from_peer():
    conn = open_server()
    conn.receive_data(raw_frame(spec_of(Ping).code, rid=9))
    assert isinstance(conn.next_event(), Ping)
    feed_error(conn, raw_frame(spec_of(Ping).code, rid=9), "already outstanding")


# --- framing: split at every byte, truncation at every byte ---------------------------------------


def test_every_split_point_gives_the_same_events():
    data, msgs = client_stream()
    for cut in range(len(data) + 1):
        conn = open_server()
        events = feed(conn, data[:cut]) + feed(conn, data[cut:])
        assert events == msgs, cut


def test_byte_by_byte_feeding_gives_the_same_events():
    data, msgs = client_stream()
    conn = open_server()
    events = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        events += drain(conn)
    assert events == msgs


def test_handshake_split_at_every_byte():
    hello = hello_bytes()
    for cut in range(len(hello) + 1):
        conn = server()
        events = feed(conn, hello[:cut]) + feed(conn, hello[cut:])
        assert [type(e) for e in events] == [Handshake], cut


@settings(max_examples=200)
@given(st.lists(st.integers(1, 4000), max_size=30))
def test_random_chunking_gives_the_same_events(sizes):
    data, msgs = client_stream()
    conn = open_server()
    events, pos = [], 0
    for n in sizes:
        events += feed(conn, data[pos : pos + n])
        pos += n
    events += feed(conn, data[pos:])
    assert events == msgs


def test_eof_at_every_byte_is_a_clean_close_or_a_truncation_error():
    data, msgs = client_stream()
    boundaries, pair = {0}, open_pair()
    pos = 0
    for m in msgs:
        pos += len(pair.client.send(m.with_rid(pair.client.new_rid()) if m.rid else m))
        boundaries.add(pos)
    for cut in range(len(data) + 1):
        conn = open_server()
        feed(conn, data[:cut])
        conn.receive_data(b"")
        if cut in boundaries:
            events = drain(conn)
            assert isinstance(events[-1], ConnectionClosed), cut
            assert conn.state is State.CLOSED
        else:
            with pytest.raises(RemoteProtocolError, match="closed inside"):
                drain(conn)
            assert conn.state is State.ERROR


def test_eof_inside_the_hello_is_a_truncation_error():
    hello = hello_bytes()
    for cut in range(1, len(hello)):
        conn = server()
        conn.receive_data(hello[:cut])
        conn.receive_data(b"")
        with pytest.raises(RemoteProtocolError, match="closed inside"):
            drain(conn)


def test_clean_eof_before_anything_is_connection_closed():
    conn = server()
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ConnectionClosed)
    assert isinstance(conn.next_event(), ConnectionClosed)
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"more")


# --- hostile frames -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame,match",
    [
        (lambda: raw_frame(NOTE, lp(b"x"), magic=b"HTTP"), "bad magic"),
        (lambda: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad magic"),
        (lambda: raw_frame(NOTE, lp(b"x"), version=2), "frame version 2"),
        (lambda: raw_frame(NOTE, lp(b"x"), version=0), "frame version 0"),
        (lambda: raw_frame(NOTE, lp(b"x"), flags=1), "flags"),
        (lambda: raw_frame(0xF0FF, b""), "unknown message type"),
        (lambda: raw_frame(0, b""), "unknown message type"),
        (lambda: raw_frame(NOTE, b""), "malformed Note"),  # length 0 for a type with fields
        (lambda: raw_frame(NOTE, length=(4 << 20) + 1), "exceeds the cap"),
        (lambda: raw_frame(NOTE, length=1 << 31), "exceeds the cap"),
        (lambda: raw_frame(NOTE, length=0xFFFFFFFF), "exceeds the cap"),
        (lambda: raw_frame(NOTE, lp(b"x") + b"\x00"), "1 trailing bytes"),
        (lambda: raw_frame(EMPTY, b"\x00"), "trailing"),
        (lambda: raw_frame(NOTE, struct.pack("<I", 1)), "needs 1 bytes"),
        (lambda: raw_frame(NOTE, struct.pack("<I", 2000) + b"x" * 2000), "maximum 1024"),
        (lambda: raw_frame(NOTE, struct.pack("<I", 100) + b"x"), "needs 100 bytes"),
        (lambda: raw_frame(NOTE, lp(b"\xff\xfe")), "not valid UTF-8"),
        (lambda: raw_frame(NOTE, lp(b"a\nb")), "control character"),
        (lambda: raw_frame(HELLO, hello_bytes()[HEADER_SIZE:]), r"Hello \(HELLO\) in state open"),
        (lambda: raw_frame(HELLO_ACK, b""), "HELLO_ACK"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_hostile_frames_after_the_handshake(frame, match):
    feed_error(open_server(), frame(), match)


def put_body(file: bytes, epoch: int, offset: int, npages: int, data: bytes) -> bytes:
    return lp(file) + struct.pack("<QQI", epoch, offset, npages) + lp(data)


@pytest.mark.parametrize(
    "file,offset,npages,data,match",
    [
        (b"a/b", (1 << 63) - 4096, 2, b"", "end past"),  # pages x 4096 overflows off_t
        (b"a/b", (1 << 64) - 4096, 1, bytes(4096), "end past"),  # offset + length wraps u64
        (b"a/b", 4095, 0, b"", "multiple of 4096"),  # unaligned offset
        (b"a/b", 0, 2, bytes(4096), "not 2 pages"),  # length not matching the page count
        (b"../x", 0, 0, b"", "not allowed"),
        (b"/etc/passwd", 0, 0, b"", "absolute"),
        (b"a\x00b", 0, 0, b"", "control character"),
        (b"a\x1bb", 0, 0, b"", "control character"),
        (b"x" * 256, 0, 0, b"", "longer than 255"),
        (b"x" * 4097, 0, 0, b"", "maximum 4096"),
        (b"a/./b", 0, 0, b"", "not allowed"),
    ],
)
def test_hostile_field_values(file, offset, npages, data, match):
    body = put_body(file, 1, offset, npages, data)
    feed_error(open_server(), raw_frame(PUT, body, rid=1), match)


def test_bad_bool_byte():
    body = open_pair().client.send(all_types())[HEADER_SIZE:]
    bool_at = 1 + 2 + 4 + 8 + 8
    bad_bool = body[:bool_at] + b"\x02" + body[bool_at + 1 :]
    feed_error(open_server(), raw_frame(ALL, bad_bool), "bool byte is 2")


def test_list_count_above_its_maximum():
    pair = open_pair()
    body = pair.client.send(all_types(j=(7,)))[HEADER_SIZE:]
    marker = struct.pack("<I", 1) + struct.pack("<Q", 7)
    at = body.index(marker)
    bad = body[:at] + struct.pack("<I", 101) + body[at + 4 :]
    feed_error(open_server(), raw_frame(ALL, bad), "list length 101 exceeds its maximum 100")


@pytest.mark.parametrize(
    "frame,match",
    [
        (
            lambda: raw_frame(NOTE, lp(b"data before hello")),
            r"Note \(application frame\) in state server-await-hello",
        ),
        (lambda: raw_frame(HELLO_ACK, b""), "HELLO_ACK"),
        (lambda: raw_frame(HELLO, length=HANDSHAKE_MAX_FRAME + 1), "exceeds the cap of 1024"),
        (lambda: raw_frame(HELLO, length=2000), "exceeds the cap of 1024"),
        (lambda: raw_frame(HELLO, b"\x00" * 10), "malformed Hello"),
        (
            lambda: raw_frame(
                HELLO, struct.pack("<HH", 3, 2) + lp(b"test") + lp(b"n1") + struct.pack("<Q", 1)
            ),
            "bad version range",
        ),
        (
            lambda: raw_frame(
                HELLO,
                struct.pack("<HH", 1, 1) + lp(b"test") + lp(b"n1/../n2") + struct.pack("<Q", 1),
            ),
            "node name",
        ),
        (
            lambda: raw_frame(
                HELLO, struct.pack("<HH", 1, 1) + lp(b"test") + lp(b"n1\x00") + struct.pack("<Q", 1)
            ),
            "node name",
        ),
        (
            lambda: raw_frame(
                HELLO, struct.pack("<HH", 1, 1) + lp(b"test") + lp(b"n" * 40) + struct.pack("<Q", 1)
            ),
            "maximum 31",
        ),
    ],
    ids=[
        "data-before-hello",
        "ack-to-server",
        "hello-over-cap",
        "hello-2000",
        "hello-garbage",
        "hello-version-range",
        "hello-name-path",
        "hello-name-nul",
        "hello-name-too-long",
    ],
)
def test_hostile_input_before_the_handshake(frame, match):
    feed_error(server(), frame(), match)


def test_frame_after_hello_before_accept_is_refused():
    conn = server()
    conn.receive_data(hello_bytes())
    assert isinstance(conn.next_event(), Handshake)
    conn.receive_data(raw_frame(NOTE, lp(b"eager")))
    with pytest.raises(RemoteProtocolError, match="server-got-hello"):
        conn.next_event()


@pytest.mark.parametrize("early", [raw_frame(NOTE, lp(b"eager")), b"G"])
def test_bytes_sent_with_the_hello_are_refused(early):
    conn = server()
    conn.receive_data(hello_bytes() + early)
    with pytest.raises(RemoteProtocolError, match="before the HELLO_ACK"):
        conn.next_event()


def test_bytes_fed_between_hello_and_accept_are_refused():
    conn = server()
    conn.receive_data(hello_bytes())
    assert isinstance(conn.next_event(), Handshake)
    conn.receive_data(b"GF")  # not yet a whole header, so next_event would say NEED_DATA
    with pytest.raises(RemoteProtocolError, match="before the HELLO_ACK"):
        conn.accept()
    assert conn.state is State.ERROR


def test_client_refuses_application_data_before_the_ack():
    client = Connection(Role.CLIENT, LocalNode("test", "n1", 1), peer_identity="n2")
    client.initiate()
    feed_error(client, raw_frame(NOTE, lp(b"x")), "client-sent-hello")


def test_oversized_frame_is_refused_from_its_header_alone():
    conn = open_server()
    conn.receive_data(raw_frame(NOTE, length=(4 << 20) + 1)[:HEADER_SIZE])
    with pytest.raises(RemoteProtocolError, match="exceeds the cap"):
        conn.next_event()


def test_configurable_frame_cap():
    pair = open_pair(max_frame_size=8192)
    with pytest.raises(LocalProtocolError, match="exceeds the frame cap"):
        pair.client.send(PutPages("f", 1, 0, 2, bytes(8192), rid=1))
    assert pair.client.statistics()["own_requests"] == 0
    pair.send(pair.client, PutPages("f", 1, 0, 1, bytes(4096), rid=1))


def test_error_does_not_corrupt_state_or_apply_the_bad_frame():
    pair = open_pair()
    [req] = pair.send(pair.client, Ping(rid=1))
    before = pair.server.statistics()
    with pytest.raises(RemoteProtocolError):
        pair.deliver(pair.server, raw_frame(PUT_DONE, struct.pack("<Q", 1), rid=99))
    after = pair.server.statistics()
    assert after["peer_requests"] == before["peer_requests"] == 1
    assert after["frames_received"] == before["frames_received"]
    # nothing that arrives after the bad frame is ever delivered
    pair.server.receive_data(raw_frame(NOTE, lp(b"later")))
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()


def test_valid_frames_before_a_bad_one_are_delivered():
    conn = open_server()
    conn.receive_data(raw_frame(NOTE, lp(b"fine")) + raw_frame(0xF0FF))
    assert conn.next_event() == Note("fine")
    with pytest.raises(RemoteProtocolError, match="unknown"):
        conn.next_event()


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_remote_errors(data):
    conn = open_server()
    if data:
        conn.receive_data(data)
    conn.receive_data(b"")
    try:
        events = drain(conn)
    except RemoteProtocolError:
        assert conn.state is State.ERROR
    else:
        assert isinstance(events[-1], ConnectionClosed)


@settings(max_examples=300)
@given(st.binary(max_size=100), st.integers(0, 120))
def test_random_mutation_of_a_valid_stream(junk, at):
    data, _ = client_stream()
    mutated = data[:at] + junk + data[at + len(junk) :]
    conn = open_server()
    conn.receive_data(mutated)
    conn.receive_data(b"")
    try:
        drain(conn)
    except RemoteProtocolError:
        pass


def test_need_data_until_a_frame_is_complete():
    conn = open_server()
    frame = raw_frame(NOTE, lp(b"abc"))
    conn.receive_data(frame[:-1])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(frame[-1:])
    assert conn.next_event() == Note("abc")
    assert conn.next_event() is NEED_DATA
