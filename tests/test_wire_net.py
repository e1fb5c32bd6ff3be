"""The trio glue over real TLS 1.3 on loopback, with real certificates from gfvm.pki."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
from functools import partial

import pytest
import trio
from test_wire_samples import Blob, Note, Ping, Pong, PutDone, PutPages

from gfvm import pki
from gfvm.wire import ChannelClosed, ConnectFailed, ErrorReply, LocalNode, RemoteFailure
from gfvm.wire.net import ChannelOptions, open_channel, open_peer, serve_peers
from gfvm.wire.state import Role

LOG = "gfvm.wire.net"
PAGE = bytes(range(256)) * 16


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = pki.create_ca(d / "ca", "test")
    for node in ("n1", "n2", "n3"):
        ca.issue(node).write(d / node)
    other = pki.create_ca(d / "other-ca", "test")
    other.issue("n1").write(d / "foreign-n1")
    other.issue("n2").write(d / "foreign-n2")
    return d


def me(node: str, incarnation: int = 7) -> LocalNode:
    return LocalNode("test", node, incarnation)


class Recorder:
    """A server handler: answers requests, records what reaches it."""

    def __init__(self) -> None:
        self.channels = []
        self.received = []
        self.ended = []

    async def __call__(self, chan) -> None:
        self.channels.append(chan)
        async with trio.open_nursery() as nursery:
            async for msg in chan:
                self.received.append((chan.peer.node, msg))
                nursery.start_soon(self.answer, chan, msg)
        self.ended.append(chan.close_reason)

    async def answer(self, chan, msg) -> None:
        if isinstance(msg, PutPages):
            if msg.epoch == 0:
                await chan.send(ErrorReply(errno.ESTALE, "stale epoch", rid=msg.rid))
                return
            if msg.epoch == 99:
                await trio.sleep(0.3)  # a slow answer
            await chan.send(PutDone(msg.offset, rid=msg.rid))
        elif isinstance(msg, Ping):
            await chan.send(Pong(rid=msg.rid))
        elif isinstance(msg, Note) and msg.text == "boom":
            raise RuntimeError("handler bug")
        elif isinstance(msg, Note) and msg.text == "call me":
            reply = await chan.request(Ping())
            self.received.append(("reply", reply))


async def serve(nursery, tls, node="n2", handler=None, ctx=None, **options) -> int:
    handler = handler or Recorder()
    ctx = ctx or pki.server_context(tls / node)
    return await nursery.start(
        partial(
            serve_peers,
            0,
            ctx,
            handler,
            me=me(node),
            host="127.0.0.1",
            options=ChannelOptions(**options),
        )
    )


def peer(tls, port, expected="n2", node="n1", ctx=None, **options):
    ctx = ctx or pki.client_context(tls / node)
    return open_peer(
        "127.0.0.1", port, expected, ctx, me=me(node), options=ChannelOptions(**options)
    )


async def wait_until(predicate, limit: float = 5.0) -> None:
    """Polls `predicate` (log records and counters have no event to wait on)."""
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


def warnings_about(caplog, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOG and r.levelno >= logging.WARNING and text in r.getMessage()
    ]


def put(offset: int, epoch: int = 1) -> PutPages:
    return PutPages("procs/1/pages", epoch, offset, 1, PAGE)


# --- two nodes talk -------------------------------------------------------------------------------


async def test_two_nodes_exchange_requests_and_one_way_messages(nursery, tls):
    rec = Recorder()
    port = await serve(nursery, tls, handler=rec)
    async with peer(tls, port) as chan:
        assert chan.peer.node == "n2" and chan.peer.incarnation == 7 and chan.peer.version == 1
        done = await chan.request(put(8192))
        assert done == PutDone(8192, rid=done.rid)
        await chan.send(Note("hello"))
        await wait_until(lambda: any(m == Note("hello") for _, m in rec.received))
    assert rec.channels[0].peer.node == "n1"
    received_put = rec.received[0][1]
    assert bytes(received_put.data) == PAGE


async def test_pipelined_requests_from_many_tasks_are_matched_by_rid(nursery, tls):
    port = await serve(nursery, tls)
    async with peer(tls, port) as chan:
        results = {}

        async def one(i):
            results[i] = await chan.request(put(i * 4096))

        async with trio.open_nursery() as tasks:
            for i in range(300):
                tasks.start_soon(one, i)
        assert all(results[i].seq == i * 4096 for i in range(300))
        assert chan.statistics()["own_requests"] == 0


async def test_frames_leave_in_call_order(nursery, tls):
    rec = Recorder()
    port = await serve(nursery, tls, handler=rec)
    async with peer(tls, port) as chan:

        async def sender(tag):
            for i in range(50):
                await chan.send(Note(f"{tag}-{i}"))

        async with trio.open_nursery() as tasks:
            for tag in "abcd":
                tasks.start_soon(sender, tag)
        await chan.request(Ping())  # answered after every earlier frame was read
    texts = [m.text for _, m in rec.received if isinstance(m, Note)]
    for tag in "abcd":
        assert [t for t in texts if t.startswith(tag)] == [f"{tag}-{i}" for i in range(50)]


async def test_error_reply_raises_remote_failure(nursery, tls):
    port = await serve(nursery, tls)
    async with peer(tls, port) as chan:
        with pytest.raises(RemoteFailure, match="stale epoch") as info:
            await chan.request(put(0, epoch=0))
        assert info.value.errno == errno.ESTALE
        assert (await chan.request(Ping())) is not None  # still usable


async def test_cancelled_request_leaves_the_channel_usable(nursery, tls):
    port = await serve(nursery, tls)
    async with peer(tls, port) as chan:
        with trio.move_on_after(0.05) as scope:
            await chan.request(put(4096, epoch=99))
        assert scope.cancelled_caught
        assert isinstance(await chan.request(Ping()), Pong)
        await wait_until(lambda: chan.statistics()["own_requests"] == 0)  # late answer dropped
        assert chan.statistics()["waiting_requests"] == 0


async def test_both_sides_can_issue_requests_on_one_channel(nursery, tls):
    rec = Recorder()
    port = await serve(nursery, tls, handler=rec)
    async with peer(tls, port) as chan:

        async def answer_pings():
            async for msg in chan:
                if isinstance(msg, Ping):
                    await chan.send(Pong(rid=msg.rid))

        async with trio.open_nursery() as tasks:
            tasks.start_soon(answer_pings)
            await chan.send(Note("call me"))
            await wait_until(lambda: any(who == "reply" for who, _ in rec.received))
            tasks.cancel_scope.cancel()


async def test_close_flushes_queued_frames_and_the_peer_sees_a_clean_end(nursery, tls, caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    rec = Recorder()
    port = await serve(nursery, tls, handler=rec)
    async with peer(tls, port) as chan:
        for i in range(200):
            await chan.send(Note(f"n{i}"))
    await wait_until(lambda: rec.ended)
    assert [m.text for _, m in rec.received] == [f"n{i}" for i in range(200)]
    assert rec.ended == ["peer closed the connection"]
    assert not warnings_about(caplog, "")


async def test_a_closed_channel_refuses_further_use(nursery, tls):
    port = await serve(nursery, tls)
    async with peer(tls, port) as chan:
        pass
    assert chan.closed
    with pytest.raises(ChannelClosed):
        await chan.send(Note("late"))
    with pytest.raises(ChannelClosed):
        await chan.request(Ping())
    with pytest.raises(ChannelClosed):
        await chan.receive()


async def test_pending_requests_fail_when_the_server_goes_away(tls):
    async with trio.open_nursery() as server_nursery:
        port = await serve(server_nursery, tls)
        async with peer(tls, port) as chan:
            async with trio.open_nursery() as tasks:

                async def slow():
                    with pytest.raises(ChannelClosed):
                        await chan.request(put(4096, epoch=99))

                tasks.start_soon(slow)
                await wait_until(lambda: chan.statistics()["own_requests"] == 1)
                server_nursery.cancel_scope.cancel()  # the server node dies


async def test_traffic_is_encrypted_on_the_wire(nursery, tls):
    """A relay between the nodes records every byte: the page contents never appear in it."""
    canary = b"CANARY-process-memory-" * 186
    port = await serve(nursery, tls)
    captured = bytearray()

    async def relay(client_stream):
        upstream = await trio.open_tcp_stream("127.0.0.1", port)

        async def pump(src, dst):
            while data := await src.receive_some(65536):
                captured.extend(data)
                await dst.send_all(data)

        async with client_stream, upstream, trio.open_nursery() as pumps:
            pumps.start_soon(pump, client_stream, upstream)
            pumps.start_soon(pump, upstream, client_stream)

    listeners = await nursery.start(partial(trio.serve_tcp, relay, 0, host="127.0.0.1"))
    relay_port = listeners[0].socket.getsockname()[1]
    async with peer(tls, relay_port) as chan:
        page = canary + bytes(4096 - len(canary))
        done = await chan.request(PutPages("f", 1, 0, 1, page))
        assert done.seq == 0
    assert len(captured) > 4096
    assert b"CANARY" not in captured


# --- authentication -------------------------------------------------------------------------------


async def test_peer_without_a_certificate_is_rejected(nursery, tls, caplog):
    rec = Recorder()
    port = await serve(nursery, tls, handler=rec)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(tls / "n1" / "ca.crt")
    with pytest.raises(ConnectFailed):
        async with peer(tls, port, ctx=ctx):
            pass
    await wait_until(lambda: warnings_about(caplog, "TLS handshake failed"))
    assert len(warnings_about(caplog, "127.0.0.1")) == 1
    assert rec.channels == [] and rec.received == []


async def test_a_certificate_claiming_another_node_is_rejected(nursery, tls, caplog):
    """n2's certificate presented by a client that claims to be n3."""
    rec = Recorder()
    port = await serve(nursery, tls, node="n1", handler=rec)
    ctx = pki.client_context(tls / "n2")
    with pytest.raises(ConnectFailed, match="claims node 'n3' but its certificate is 'n2'"):
        async with open_peer("127.0.0.1", port, "n1", ctx, me=me("n3")):
            pass
    await wait_until(lambda: warnings_about(caplog, "claims node 'n3'"))
    assert rec.channels == []


async def test_a_server_that_is_not_the_node_we_meant_is_rejected(nursery, tls):
    port = await serve(nursery, tls, node="n2")
    with pytest.raises(ConnectFailed, match="certificate is for 'n2', not 'n3'"):
        async with peer(tls, port, expected="n3"):
            pass


async def test_a_client_certificate_from_another_ca_is_rejected(nursery, tls, caplog):
    rec = Recorder()
    port = await serve(nursery, tls, handler=rec)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(tls / "n1" / "ca.crt")  # trusts the real CA ...
    ctx.load_cert_chain(
        tls / "foreign-n1" / "node.crt", tls / "foreign-n1" / "node.key"
    )  # ... but is not from it
    with pytest.raises(ConnectFailed):
        async with peer(tls, port, ctx=ctx):
            pass
    await wait_until(lambda: warnings_about(caplog, "TLS handshake failed"))
    assert rec.channels == []


async def test_a_server_certificate_from_another_ca_is_rejected(nursery, tls):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(tls / "n2" / "ca.crt")
    ctx.load_cert_chain(tls / "foreign-n2" / "node.crt", tls / "foreign-n2" / "node.key")
    port = await serve(nursery, tls, ctx=ctx)
    with pytest.raises(ConnectFailed, match="certificate verify failed"):
        async with peer(tls, port):
            pass


async def test_connection_refused_is_connect_failed(tls):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(ConnectFailed, match="cannot connect"):
        async with peer(tls, port):
            pass


# --- hostile peers --------------------------------------------------------------------------------


async def test_slow_sender_before_auth_is_dropped(nursery, tls, caplog):
    port = await serve(nursery, tls, handshake_timeout=0.5)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)

    async def dribble():  # the start of a ClientHello, one byte every 0.1 s
        with contextlib.suppress(trio.BrokenResourceError):
            for byte in b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03":
                await tcp.send_all(bytes([byte]))
                await trio.sleep(0.1)

    with trio.fail_after(5):
        async with trio.open_nursery() as tasks:
            tasks.start_soon(dribble)
            try:
                assert await tcp.receive_some(100) == b""  # the server closed it
            except trio.BrokenResourceError:
                pass
            tasks.cancel_scope.cancel()
    await tcp.aclose()
    await wait_until(lambda: warnings_about(caplog, "no handshake within 0.5 s"))


async def test_pre_auth_byte_cap_drops_a_huge_client_hello(nursery, tls, caplog):
    port = await serve(nursery, tls, preauth_max_bytes=16384)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    hello = b"\x01" + (100_000).to_bytes(3, "big") + bytes(100_000)  # a 100 kB ClientHello
    sent = 0
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        for at in range(0, len(hello), 4096):
            part = hello[at : at + 4096]
            await tcp.send_all(b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part)
            sent += len(part)
            await trio.sleep(0.005)
        while await tcp.receive_some(100):
            pass
        raise trio.BrokenResourceError  # closed without reading it all: also a pass
    await tcp.aclose()
    await wait_until(lambda: warnings_about(caplog, "byte cap"))
    assert sent < len(hello)


async def test_too_many_unauthenticated_connections_are_refused(nursery, tls, caplog):
    port = await serve(nursery, tls, max_preauth_connections=2)
    idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
    await trio.sleep(0.05)  # let the server accept both
    third = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(5):
        assert await third.receive_some(10) == b""
    await wait_until(lambda: warnings_about(caplog, "already authenticating"))
    for s in idle + [third]:
        await s.aclose()
    async with peer(tls, port) as chan:  # the slots are free again
        assert isinstance(await chan.request(Ping()), Pong)


async def test_garbage_after_the_handshake_closes_only_that_connection(nursery, tls, caplog):
    rec = Recorder()
    port = await serve(nursery, tls, handler=rec)
    async with peer(tls, port, node="n1") as bad, peer(tls, port, node="n3") as good:
        await bad.request(Ping())
        before = len(rec.received)
        await bad._stream.send_all(b"\x00garbage that is not a frame" * 4)  # inside TLS
        with trio.fail_after(5), pytest.raises(ChannelClosed):
            while True:
                await bad.request(Ping())
        assert isinstance(await good.request(Ping()), Pong)
        await wait_until(lambda: warnings_about(caplog, "protocol error: bad magic"))
    assert len(warnings_about(caplog, "bad magic")) == 1
    assert [who for who, _ in rec.received[before:]] == ["n3"]


async def test_a_failing_handler_closes_its_connection_only(nursery, tls, caplog):
    port = await serve(nursery, tls)
    async with peer(tls, port) as chan:
        await chan.send(Note("boom"))
        with trio.fail_after(5), pytest.raises(ChannelClosed):
            while True:
                await chan.request(Ping())
    await wait_until(lambda: [r for r in caplog.records if "handler failed" in r.getMessage()])
    async with peer(tls, port) as chan:
        assert isinstance(await chan.request(Ping()), Pong)


async def test_send_blocks_when_the_peer_does_not_read(nursery, tls):
    stalled = trio.Event()

    async def never_reads(chan):
        await stalled.wait()

    port = await serve(nursery, tls, handler=never_reads, max_incoming_bytes=1 << 20)
    sent = 0
    async with peer(tls, port, max_outgoing_bytes=1 << 20) as chan:
        with trio.move_on_after(1.0):
            while True:
                await chan.send(Blob(bytes(1 << 20)))
                sent += 1
        # bounded by both channels' buffers plus the kernel's socket buffers, not by the loop
        assert sent < 40
        assert chan.statistics()["outgoing_bytes"] <= 2 << 20
        stalled.set()


async def test_open_channel_over_a_memory_stream():
    """The channel logic does not depend on TLS (used by benchmarks and tests)."""
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def server_side():
            async with open_channel(b, me("n2"), role=Role.SERVER, peer_identity="n1") as chan:
                async for msg in chan:
                    await chan.send(Pong(rid=msg.rid))

        nursery.start_soon(server_side)
        async with open_channel(
            a, me("n1"), role=Role.CLIENT, peer_identity="n2", expected_peer="n2"
        ) as chan:
            assert isinstance(await chan.request(Ping()), Pong)


async def test_bulk_and_small_frames_interleaved_arrive_intact(nursery, tls):
    rec = Recorder()
    port = await serve(nursery, tls, handler=rec)
    blobs = [os.urandom(1 << 20) for _ in range(6)]
    async with peer(tls, port) as chan:

        async def bulk():
            for blob in blobs:
                await chan.send(Blob(blob))

        async def small():
            for i in range(300):
                await chan.send(Note(f"s{i}"))

        async with trio.open_nursery() as tasks:
            tasks.start_soon(bulk)
            tasks.start_soon(small)
        await chan.request(Ping())
    got = [m for _, m in rec.received]
    assert [bytes(m.data) for m in got if isinstance(m, Blob)] == blobs
    assert [m.text for m in got if isinstance(m, Note)] == [f"s{i}" for i in range(300)]


async def test_concurrent_closes_all_wait_for_the_flush(nursery, tls):
    rec = Recorder()
    port = await serve(nursery, tls, handler=rec)
    async with peer(tls, port) as chan:
        for _ in range(8):
            await chan.send(Blob(bytes(1 << 20)))
        async with trio.open_nursery() as closers:
            for _ in range(3):
                closers.start_soon(chan.aclose)
        assert chan.statistics()["outgoing_bytes"] == 0
    await wait_until(lambda: rec.ended)
    assert len(rec.received) == 8
