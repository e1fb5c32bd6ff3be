"""gfvm.wire.tls.TlsStream over real TCP on loopback with real certificates from gfvm.pki."""

from __future__ import annotations

import os
import ssl
from functools import partial

import pytest
import trio

from gfvm import pki
from gfvm.wire.tls import TlsStream


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = pki.create_ca(d / "ca", "test")
    for node in ("n1", "n2"):
        ca.issue(node).write(d / node)
    return d


async def pair(nursery, tls, *, server_ctx=None):
    """(client TlsStream, server TlsStream), both handshaken, over a real TCP connection."""
    server_ready = trio.Event()
    got: list[TlsStream] = []

    async def accept(tcp):
        s = TlsStream(tcp, server_ctx or pki.server_context(tls / "n2"), server_side=True)
        got.append(s)
        server_ready.set()
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, accept, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    client = TlsStream(tcp, pki.client_context(tls / "n1"), server_side=False)
    await server_ready.wait()
    failures: list[BaseException] = []

    async def handshake(stream):
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            failures.append(exc)
            await client.aclose()
            await got[0].aclose()

    async with trio.open_nursery() as hs:
        hs.start_soon(handshake, client)
        hs.start_soon(handshake, got[0])
    if failures:
        raise next((f for f in failures if isinstance(f, trio.BrokenResourceError)), failures[0])
    return client, got[0]


async def read_exactly(stream: TlsStream, n: int, max_bytes: int) -> tuple[bytes, int]:
    """n bytes from `stream`, and how many receive_some calls it took."""
    out = bytearray()
    calls = 0
    while len(out) < n:
        chunk = await stream.receive_some(max_bytes)
        assert chunk, "unexpected end of stream"
        out += chunk
        calls += 1
    return bytes(out), calls


async def test_handshake_verifies_the_peer_certificate(nursery, tls):
    client, server = await pair(nursery, tls)
    assert pki.peer_identity(client) == "n2"
    assert pki.peer_identity(server) == "n1"
    assert client.version() == "TLSv1.3"


async def test_one_receive_returns_many_records(nursery, tls):
    client, server = await pair(nursery, tls)
    data = os.urandom(4 << 20)
    async with trio.open_nursery() as n:
        n.start_soon(client.send_all, data)
        got, calls = await read_exactly(server, len(data), 1 << 20)
    assert got == data
    # a TLS record carries at most 16 KiB: 256 records, read in far fewer calls
    assert calls < 128


async def test_receive_respects_max_bytes(nursery, tls):
    client, server = await pair(nursery, tls)
    await client.send_all(b"x" * 100_000)
    first = await server.receive_some(1000)
    assert len(first) == 1000
    rest, _ = await read_exactly(server, 99_000, 1 << 20)
    assert bytes(first) + rest == b"x" * 100_000


async def test_both_directions_at_once(nursery, tls):
    client, server = await pair(nursery, tls)
    a, b = os.urandom(3 << 20), os.urandom(3 << 20)
    results = {}

    async def recv(name, stream, n):
        results[name], _ = await read_exactly(stream, n, 256 * 1024)

    async with trio.open_nursery() as n:
        n.start_soon(client.send_all, a)
        n.start_soon(server.send_all, b)
        n.start_soon(recv, "server", server, len(a))
        n.start_soon(recv, "client", client, len(b))
    assert results == {"server": a, "client": b}


async def test_close_notify_reads_as_a_clean_end(nursery, tls):
    client, server = await pair(nursery, tls)
    await client.send_all(b"last words")
    await client.aclose()
    got, _ = await read_exactly(server, 10, 1024)
    assert got == b"last words"
    assert await server.receive_some(1024) == b""
    assert await server.receive_some(1024) == b""


async def test_transport_eof_after_whole_records_delivers_them_then_ends(nursery, tls):
    client, server = await pair(nursery, tls)
    await client.send_all(b"complete record")
    await client.transport.aclose()  # TCP FIN without close_notify
    got, _ = await read_exactly(server, 15, 1024)
    assert got == b"complete record"
    assert await server.receive_some(1024) == b""


async def test_a_record_cut_by_eof_delivers_none_of_its_bytes(nursery, tls):
    client, server = await pair(nursery, tls)
    client._obj.write(b"a record cut in the middle")
    record = client._out.read()
    await client.transport.send_all(record[: len(record) // 2])
    await client.transport.aclose()
    assert await server.receive_some(1024) == b""


async def test_a_modified_record_breaks_the_stream(nursery, tls):
    client, server = await pair(nursery, tls)
    client._obj.write(b"payload that will be tampered with")
    record = bytearray(client._out.read())
    record[-1] ^= 0x01  # flip a bit of the authentication tag
    await client.transport.send_all(bytes(record))
    with pytest.raises(trio.BrokenResourceError) as info:
        await server.receive_some(1024)
    assert isinstance(info.value.__cause__, ssl.SSLError)


async def test_handshake_with_a_foreign_ca_fails(nursery, tls, tmp_path):
    other = pki.create_ca(tmp_path / "ca", "test")
    other.issue("n2").write(tmp_path / "n2")
    with pytest.raises(trio.BrokenResourceError):
        with trio.fail_after(10):
            await pair(nursery, tls, server_ctx=pki.server_context(tmp_path / "n2"))


async def test_closed_stream_refuses_use(nursery, tls):
    client, _ = await pair(nursery, tls)
    await client.aclose()
    await client.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await client.receive_some(10)


async def test_send_chunks_arrive_as_their_concatenation(nursery, tls):
    client, server = await pair(nursery, tls)
    chunks = [b"head", os.urandom(300_000), b"", memoryview(os.urandom(70_000)), b"tail"]
    want = b"".join(bytes(c) for c in chunks)
    async with trio.open_nursery() as n:
        n.start_soon(client.send_chunks, chunks)
        got, _ = await read_exactly(server, len(want), 1 << 20)
    assert got == want


async def test_large_send_chunks_both_ways_at_once_go_out_in_pieces_intact(nursery, tls):
    # Each side sends several SEND_PIECE-sized frames (written to the socket piece by piece)
    # while the other does the same: more than the socket buffers hold, so each sender waits
    # for the other's reader; nothing may deadlock, reorder or be lost.
    from gfvm.wire.tls import SEND_PIECE

    client, server = await pair(nursery, tls)
    out_c = [b"hdr1", os.urandom(SEND_PIECE), b"hdr2", os.urandom(3 * SEND_PIECE + 5), b"end"]
    out_s = [os.urandom(2 * SEND_PIECE - 1), b"x", os.urandom(SEND_PIECE + 1)]
    want_s, want_c = b"".join(out_c), b"".join(out_s)
    got = {}

    async def read(name, stream, n):
        got[name], _ = await read_exactly(stream, n, 1 << 20)

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(client.send_chunks, out_c)
            n.start_soon(server.send_chunks, out_s)
            n.start_soon(read, "server", server, len(want_s))
            n.start_soon(read, "client", client, len(want_c))
    assert got["server"] == want_s
    assert got["client"] == want_c
