"""Throughput of the peer protocol on loopback: 1 MiB page-data messages over the TLS glue,
against plain TCP and raw TLS in the same run.

    python3 -m gfvm.wire.bench [--mib 512] [--window 8] [--rounds 3]

The receiving side runs in a child process (as a peer node would), the sending side here; both
sides are one trio thread each, as in gfvmd. Reported per mode: the median over `rounds` of
MiB sent / seconds until the receiver confirmed it had everything, in GB/s (10^9 bytes).
Modes:
  tcp          raw trio SocketStream, 1 MiB send_all calls (the ceiling)
  tls          raw gfvm.wire.tls.TlsStream with gfvm.pki contexts (TLS 1.3, mutual auth): what
               the peer channels run on
  tls-trio     raw trio.SSLStream, same contexts (what TlsStream replaced, for comparison)
  wire-tcp     PeerChannel over plain TCP, one-way 1 MiB messages (framing cost alone)
  wire-tls     PeerChannel over TLS (open_peer/serve_peers), one-way 1 MiB messages
  wire-tls-rpc PeerChannel over TLS, 1 MiB requests each acknowledged, `window` outstanding
               (what the File Manager's replication does)
  rpc-4k       PeerChannel over TLS, 16384 requests of one 4 KiB page each, 64 outstanding
               (per-message cost; also reported in messages/s)
Blocking: runs its own trio loops; meant for a terminal, not for gfvmd.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import trio

from gfvm import pki
from gfvm.wire.connection import LocalNode
from gfvm.wire.fields import U64, Bytes
from gfvm.wire.messages import oneway, request, response
from gfvm.wire.net import ChannelOptions, open_channel, open_peer, serve_peers
from gfvm.wire.state import Role
from gfvm.wire.tls import TlsStream

MIB = 1 << 20
CLUSTER = "bench"
RECEIVE_SIZE = ChannelOptions().receive_size  # raw sinks read like a PeerChannel does


# Benchmark-only messages: codes in the range reserved for tests.
@oneway(0xF0B1)
class BenchChunk:
    data: Bytes(MIB)


@request(0xF0B2)
class BenchWrite:
    data: Bytes(MIB)


@response(0xF0B3)
class BenchAck:
    n: U64


@request(0xF0B4)
class BenchSync:
    pass


@response(0xF0B5)
class BenchCount:
    received: U64


def _me(node: str) -> LocalNode:
    return LocalNode(CLUSTER, node, os.getpid())


# --- receiving side (child process) ---------------------------------------------------------------


async def _raw_sink(stream: trio.abc.Stream) -> None:
    """Reads an 8-byte length, then that many bytes; answers b"k"."""
    header = b""
    while len(header) < 8:
        header += await stream.receive_some(8 - len(header))
    left = int.from_bytes(header, "little")
    while left:
        chunk = await stream.receive_some(min(left, RECEIVE_SIZE))
        if not chunk:
            return
        left -= len(chunk)
    await stream.send_all(b"k")


async def _tls_sink(ctx, tcp: trio.SocketStream) -> None:
    stream = TlsStream(tcp, ctx, server_side=True)
    await _raw_sink(stream)
    await stream.aclose()


async def _tls_trio_sink(ctx, tcp: trio.SocketStream) -> None:
    stream = trio.SSLStream(tcp, ctx, server_side=True)
    await _raw_sink(stream)
    await stream.aclose()


async def _wire_handler(chan) -> None:
    received = 0
    async for msg in chan:
        if isinstance(msg, BenchChunk):
            received += len(msg.data)
        elif isinstance(msg, BenchWrite):
            received += len(msg.data)
            await chan.send(BenchAck(received, rid=msg.rid))
        elif isinstance(msg, BenchSync):
            await chan.send(BenchCount(received, rid=msg.rid))
            received = 0


async def _wire_tcp_sink(tcp: trio.SocketStream) -> None:
    async with open_channel(tcp, _me("n2"), role=Role.SERVER, peer_identity="n1") as chan:
        await _wire_handler(chan)


async def _serve(tls_dir: Path) -> None:
    ctx = pki.server_context(tls_dir / "n2")
    ports = {}
    async with trio.open_nursery() as nursery:
        for name, handler in (
            ("tcp", _raw_sink),
            ("tls", partial(_tls_sink, ctx)),
            ("tls-trio", partial(_tls_trio_sink, ctx)),
            ("wire-tcp", _wire_tcp_sink),
        ):
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            ports[name] = listeners[0].socket.getsockname()[1]
        ports["wire-tls"] = await nursery.start(
            partial(serve_peers, 0, ctx, _wire_handler, me=_me("n2"), host="127.0.0.1")
        )
        print(json.dumps(ports), flush=True)


# --- sending side ---------------------------------------------------------------------------------


async def _raw_send(stream: trio.abc.Stream, mib: int, payload: bytes) -> None:
    await stream.send_all((mib * MIB).to_bytes(8, "little"))
    for _ in range(mib):
        await stream.send_all(payload)
    assert await stream.receive_some(1) == b"k"


async def _measure(mode: str, port: int, tls_dir: Path, mib: int, window: int) -> float:
    payload = os.urandom(MIB)  # bytes: travels without a copy into the frame
    count_of, size = mib, MIB
    if mode == "rpc-4k":
        count_of, size, window, payload = 16384, 4096, 64, payload[:4096]
    client_ctx = pki.client_context(tls_dir / "n1")
    if mode in ("tcp", "tls", "tls-trio"):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = tcp
        if mode == "tls":
            stream = TlsStream(tcp, client_ctx, server_side=False)
        elif mode == "tls-trio":
            stream = trio.SSLStream(tcp, client_ctx, server_side=False)
        if mode != "tcp":
            await stream.do_handshake()  # before the clock starts
        start = time.perf_counter()
        await _raw_send(stream, mib, payload)
        elapsed = time.perf_counter() - start
        await stream.aclose()
        return mib * MIB / elapsed
    if mode == "wire-tcp":
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        opened = open_channel(
            tcp, _me("n1"), role=Role.CLIENT, peer_identity="n2", expected_peer="n2"
        )
    else:
        opened = open_peer(
            "127.0.0.1", port, "n2", client_ctx, me=_me("n1"), options=ChannelOptions()
        )
    async with opened as chan:
        start = time.perf_counter()
        if mode in ("wire-tls-rpc", "rpc-4k"):
            limit = trio.Semaphore(window)

            async def one() -> None:
                try:
                    await chan.request(BenchWrite(payload))
                finally:
                    limit.release()

            async with trio.open_nursery() as nursery:
                for _ in range(count_of):
                    await limit.acquire()
                    nursery.start_soon(one)
        else:
            for _ in range(mib):
                await chan.send(BenchChunk(payload))
        count = await chan.request(BenchSync())
        elapsed = time.perf_counter() - start
    assert count.received == count_of * size, count
    return count_of * size / elapsed


MODES = ("tcp", "tls", "tls-trio", "wire-tcp", "wire-tls", "wire-tls-rpc", "rpc-4k")


def run(mib: int = 512, window: int = 8, rounds: int = 3) -> dict[str, float]:
    """Runs every mode `rounds` times; returns the median throughput per mode in bytes/s.

    Blocking (starts a child process and trio loops)."""
    with tempfile.TemporaryDirectory(prefix="gfvm-wire-bench-") as tmp:
        tls_dir = Path(tmp)
        ca = pki.create_ca(tls_dir / "ca", CLUSTER)
        for node in ("n1", "n2"):
            ca.issue(node).write(tls_dir / node)
        child = subprocess.Popen(
            [sys.executable, "-m", "gfvm.wire.bench", "--serve", str(tls_dir)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            ports = json.loads(child.stdout.readline())
            results: dict[str, list[float]] = {m: [] for m in MODES}
            for _ in range(rounds):
                for mode in MODES:
                    port = ports["wire-tls" if mode in ("wire-tls-rpc", "rpc-4k") else mode]
                    rate = trio.run(_measure, mode, port, tls_dir, mib, window)
                    results[mode].append(rate)
            return {m: statistics.median(r) for m, r in results.items()}
        finally:
            child.terminate()
            child.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="MiB sent per mode and round")
    parser.add_argument(
        "--window", type=int, default=8, help="outstanding requests in wire-tls-rpc"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.serve:
        trio.run(_serve, args.serve)
        return 0
    results = run(args.mib, args.window, args.rounds)
    if args.json:
        print(json.dumps({m: round(r / 1e9, 3) for m, r in results.items()}))
        return 0
    base = results["tcp"]
    print(f"{args.mib} MiB per mode, median of {args.rounds} rounds, 1 MiB messages, loopback")
    for mode, rate in results.items():
        extra = f", {rate / 4096:,.0f} requests/s" if mode == "rpc-4k" else ""
        print(f"  {mode:13s} {rate / 1e9:6.2f} GB/s  ({rate / base:5.1%} of raw TCP{extra})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
