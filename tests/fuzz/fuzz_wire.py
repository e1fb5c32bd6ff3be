"""Coverage-guided fuzzing of the peer-protocol decoder (atheris / libFuzzer).

Run standalone, e.g. for 10 minutes with a corpus directory that grows between runs:

    python3 tests/fuzz/fuzz_wire.py -max_total_time=600 /tmp/wire-corpus

With no corpus directory given, a fresh one is seeded with valid streams. libFuzzer writes any
crashing input to ./crash-<sha1>; replay it with `python3 tests/fuzz/fuzz_wire.py crash-<sha1>`.

Input layout: byte 0 picks the connection end and state, byte 1 the chunk size used to feed the
rest, the rest is what the peer sends. Oracle:
- the only exception the decoder may raise is RemoteProtocolError, and it must stick (ERROR state);
- every message it accepts re-encodes to exactly the bytes it was decoded from, and those decode
  to an equal message (the encoding is canonical: we accept only what we could have sent).
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/ (sample messages)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository

with atheris.instrument_imports():
    import test_wire_samples as samples

    from gfvm.wire.connection import NEED_DATA, Connection, ConnectionClosed, Handshake, LocalNode
    from gfvm.wire.errors import RemoteProtocolError
    from gfvm.wire.messages import decode_body, encode_body, spec_of
    from gfvm.wire.state import Role, State
    from gfvm.wire.testing import ConnectionPair

CLIENT, SERVER = LocalNode("test", "n1", 1), LocalNode("test", "n2", 2)
MODES = ("server-before-hello", "server-open", "client-after-hello", "client-open")


def make_connection(mode: int) -> Connection:
    name = MODES[mode % len(MODES)]
    if name == "server-before-hello":
        return Connection(Role.SERVER, SERVER, peer_identity="n1")
    if name == "client-after-hello":
        conn = Connection(Role.CLIENT, CLIENT, peer_identity="n2", expected_peer="n2")
        conn.initiate()
        return conn
    pair = ConnectionPair(CLIENT, SERVER)
    pair.handshake()
    if name == "server-open":
        # the client has requests outstanding so that responses from the server side parse
        return pair.server
    for rid in (1, 2, 3):
        pair.client.send(samples.Ping(rid=rid))
    return pair.client


def check_event(conn: Connection, event, stream: bytes, fed: int) -> None:
    """`stream[:fed]` was fed to `conn`; `event` came from the frame that ends where the
    connection's buffer begins."""
    if isinstance(event, (Handshake, ConnectionClosed)):
        return
    spec = spec_of(event)
    _, out = encode_body(event)
    body = b"".join(out.finish())
    end = fed - conn.statistics()["buffered"]
    original = stream[end - conn.last_frame_size : end]
    if body != original:
        raise AssertionError(f"{event!r}: accepted body {original!r} re-encodes as {body!r}")
    again = decode_body(spec, event.rid, memoryview(body).toreadonly())
    if again != event:
        raise AssertionError(f"{event!r} does not survive a round trip: {again!r}")


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    if len(data) < 2:
        return
    conn = make_connection(data[0])
    chunk = data[1] + 1
    stream = data[2:]
    try:
        for at in range(0, len(stream), chunk):
            conn.receive_data(stream[at : at + chunk])
            fed = min(at + chunk, len(stream))
            while (event := conn.next_event()) is not NEED_DATA:
                check_event(conn, event, stream, fed)
                if isinstance(event, ConnectionClosed):
                    return
                if isinstance(event, Handshake) and conn.role is Role.SERVER:
                    conn.accept()
        conn.receive_data(b"")
        while not isinstance(event := conn.next_event(), ConnectionClosed):
            check_event(conn, event, stream, len(stream))
            if isinstance(event, Handshake) and conn.role is Role.SERVER:
                conn.accept()
    except RemoteProtocolError as exc:
        if conn.state is not State.ERROR:
            raise AssertionError(f"RemoteProtocolError left state {conn.state}") from exc
        try:
            conn.next_event()
        except RemoteProtocolError:
            return
        raise AssertionError("a RemoteProtocolError did not stick") from exc


def seeds() -> list[bytes]:
    """Small valid streams (one message each) for every mode, so that fuzzing starts past the
    magic and the handshake and mutations land in message bodies."""
    pair = ConnectionPair(CLIENT, SERVER)
    hello = pair.client.initiate()
    pair.deliver(pair.server, hello)
    ack = pair.server.accept()
    pair.deliver(pair.client, ack)
    refusing = Connection(Role.SERVER, SERVER, peer_identity="n1")
    refusing.receive_data(hello)
    refusing.next_event()
    reject = refusing.reject("busy")
    to_server = [samples.PutPages("a/b", 1, 4096, 0, b"", rid=21)] + [
        m for m in samples.sample_messages() if not isinstance(m, samples.PutPages)
    ]
    for_server = [pair.client.send(m) for m in to_server]
    for rid in (1, 2, 3):  # what make_connection("client-open") has outstanding
        pair.send(pair.client, samples.Ping(rid=rid))
    for_client = [
        pair.server.send(m)
        for m in (samples.Note("x"), samples.Pong(rid=1), samples.PutDone(5, rid=2))
    ]
    out = [bytes([0, 255]) + hello, bytes([2, 255]) + ack, bytes([2, 255]) + reject]
    out += [bytes([1, 255]) + frame for frame in for_server]
    out += [bytes([3, 255]) + frame for frame in for_client]
    out += [bytes([2, 255]) + ack + frame for frame in for_client[:1]]
    return out


def main() -> None:
    args = sys.argv[1:]
    corpus = [a for a in args if not a.startswith("-")]
    if not corpus:
        corpus_dir = tempfile.mkdtemp(prefix="gfvm-wire-corpus-")
        args.append(corpus_dir)
        corpus = [corpus_dir]
    if os.path.isdir(corpus[0]) and not os.listdir(corpus[0]):
        for i, seed in enumerate(seeds()):
            with open(os.path.join(corpus[0], f"seed-{i}"), "wb") as f:
                f.write(seed)
    atheris.Setup([sys.argv[0], *args], TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
