"""Packet delay, jitter and loss for a namespace node, without netem.

Our kernels lack the netem qdisc (CONFIG_NET_SCH_NETEM is off), so a node's outgoing packets to
the cluster subnet are diverted with nftables to an NFQUEUE, and this small program, running
inside the node's network namespace, holds each packet for `delay ± jitter` ms before accepting
it, or drops it with probability `loss`. Random jitter also reorders packets. Packet duplication
is not offered (an NFQUEUE verdict cannot clone a packet).

Run as `python -m gfvm.cluster.impair --queue N --delay MS --jitter MS --loss PCT` inside the
node (Cluster.impair does that and installs the iptables rule). Blocking, single-threaded.

Netlink layout follows include/uapi/linux/netfilter/nfnetlink_queue.h; only packet metadata is
copied to user space (COPY_META), never payloads.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NF_DROP = 0
NF_ACCEPT = 1



def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(msg_type: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    nfgen = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue))
    body = nfgen + attrs
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg_type
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def _parse_attrs(data: bytes, offset: int) -> dict[int, bytes]:
    attrs = {}
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        attrs[kind & 0x7FFF] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return attrs


class Impairer:
    """Holds and releases the packets of one NFQUEUE."""

    def __init__(self, queue: int, delay_ms: float, jitter_ms: float, loss_pct: float, seed: int | None):
        self.queue = queue
        self.delay = delay_ms / 1000
        self.jitter = jitter_ms / 1000
        self.loss = loss_pct / 100
        self.rng = random.Random(seed)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((0, 0))
        self.pending: list[tuple[float, int]] = []  # (release time, packet id)
        self.seq = 0

    def _config(self, attrs: bytes) -> None:
        self.seq += 1
        self.sock.send(_message(NFQNL_MSG_CONFIG, self.queue, attrs, NLM_F_REQUEST | NLM_F_ACK, self.seq))
        reply = self.sock.recv(65536)
        _len, kind = struct.unpack_from("=IH", reply)
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", reply, 16)
            if err:
                raise OSError(-err, f"NFQUEUE config: {os.strerror(-err)}")

    def bind(self) -> None:
        self._config(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)))
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)))
        self._config(_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 65536)))
        self._config(
            _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
            + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN))
        )

    def _verdict(self, packet_id: int, verdict: int) -> None:
        attrs = _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))
        self.sock.send(_message(NFQNL_MSG_VERDICT, self.queue, attrs))

    def _on_packet(self, packet_id: int, now: float) -> None:
        if self.loss and self.rng.random() < self.loss:
            self._verdict(packet_id, NF_DROP)
            return
        hold = self.delay + (self.rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0)
        if hold <= 0:
            self._verdict(packet_id, NF_ACCEPT)
        else:
            heapq.heappush(self.pending, (now + hold, packet_id))

    def _receive(self) -> None:
        data = self.sock.recv(1 << 20)
        offset = 0
        now = time.monotonic()
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if length < 16:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                attrs = _parse_attrs(data[offset : offset + length], 20)
                hdr = attrs.get(NFQA_PACKET_HDR)
                if hdr:
                    (packet_id,) = struct.unpack_from("!I", hdr)
                    self._on_packet(packet_id, now)
            offset += (length + 3) & ~3

    def run(self) -> None:
        while True:
            timeout = max(0.0, self.pending[0][0] - time.monotonic()) if self.pending else None
            readable, _, _ = select.select([self.sock], [], [], timeout)
            if readable:
                self._receive()
            now = time.monotonic()
            while self.pending and self.pending[0][0] <= now:
                _, packet_id = heapq.heappop(self.pending)
                self._verdict(packet_id, NF_ACCEPT)


def divert_rule(queue: int, subnet: str) -> list[str]:
    """iptables rule arguments that send the node's packets to `subnet` through NFQUEUE `queue`
    (`--queue-bypass`: packets flow normally whenever no impairer listens). nftables' own
    `queue` statement needs CONFIG_NFT_QUEUE, which our kernels lack; the xtables NFQUEUE target
    is there."""
    return ["OUTPUT", "-d", subnet, "-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="ms")
    parser.add_argument("--jitter", type=float, default=0.0, help="ms, uniform +-")
    parser.add_argument("--loss", type=float, default=0.0, help="percent of packets dropped")
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    impairer = Impairer(args.queue, args.delay, args.jitter, args.loss, args.seed)
    impairer.bind()
    print("ready", flush=True)
    impairer.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
