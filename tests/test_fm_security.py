"""Peers must prove who they are (mutual TLS with the cluster CA, certificate = claimed node);
anyone else is turned away and changes nothing. Peer traffic never shows file contents."""

from __future__ import annotations

import os
import socket
import ssl
import threading

import pytest
import trio

from gfvm import pki
from gfvm.errors import Unavailable
from gfvm.fm import messages as m
from gfvm.wire.connection import LocalNode
from gfvm.wire.net import open_peer
from test_fm_api import trio_cluster
from test_fm_harness import Cluster, write_file


async def _state(files):
    fm = files.fm
    f = await files.open("keep")
    return fm.consensus.last, await f.read(0, 100)


async def _try_submit(address, port, expect, ctx, me):
    """Connects as `me` and, if that ever succeeded, tries to delete a file."""
    async with open_peer(address, port, expect, ctx, me=me) as chan:
        await chan.request(m.MetaSubmit(b'{"op":"unlink","parent":1,"name":"keep"}'))


async def test_peer_without_a_certificate_is_rejected(tmp_path):
    async with trio_cluster(tmp_path) as nodes:
        f = await nodes["n1"].open("keep", create=True)
        await f.write(0, b"precious")
        before = await _state(nodes["n1"])
        spec = nodes["n1"].fm.config.node("n1")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.load_verify_locations(cafile=str(nodes["n2"].fm.paths.tls_dir / "ca.crt"))  # trusts the CA, has no cert
        me = LocalNode(nodes["n1"].fm.config.name, "n2", 1)
        with pytest.raises(Unavailable):
            await _try_submit(spec.address, spec.port, "n1", ctx, me)
        assert await _state(nodes["n1"]) == before


async def test_another_nodes_certificate_is_rejected(tmp_path):
    async with trio_cluster(tmp_path) as nodes:
        f = await nodes["n1"].open("keep", create=True)
        await f.write(0, b"precious")
        before = await _state(nodes["n1"])
        spec = nodes["n1"].fm.config.node("n1")
        n2_ctx = await trio.to_thread.run_sync(pki.client_context, nodes["n2"].fm.paths.tls_dir)
        as_n3 = LocalNode(nodes["n1"].fm.config.name, "n3", 1)  # n2's certificate, claiming n3
        with pytest.raises(Unavailable):
            await _try_submit(spec.address, spec.port, "n1", n2_ctx, as_n3)
        assert await _state(nodes["n1"]) == before
        assert nodes["n1"].fm.alive("n3")  # the real n3 is still fine


async def test_certificate_of_another_cluster_ca_is_rejected(tmp_path):
    async with trio_cluster(tmp_path) as nodes:
        f = await nodes["n1"].open("keep", create=True)
        await f.write(0, b"precious")
        before = await _state(nodes["n1"])
        rogue = pki.create_ca(tmp_path / "rogue", nodes["n1"].fm.config.name)
        rogue.issue("n3").write(tmp_path / "rogue-tls")
        ctx = await trio.to_thread.run_sync(pki.client_context, tmp_path / "rogue-tls")
        spec = nodes["n1"].fm.config.node("n1")
        with pytest.raises(Unavailable):
            await _try_submit(spec.address, spec.port, "n1", ctx,
                              LocalNode(nodes["n1"].fm.config.name, "n3", 1))
        assert await _state(nodes["n1"]) == before


class RecordingProxy:
    def __init__(self, listen, target):
        self.seen = bytearray()
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(listen)
        self.sock.listen(8)
        self.target = target
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                a, _ = self.sock.accept()
                b = socket.create_connection(self.target)
            except OSError:
                try:
                    a.close()
                except (OSError, UnboundLocalError):
                    pass
                if self.sock.fileno() < 0:
                    return
                continue
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass

    def close(self):
        self.sock.close()


def test_peer_traffic_never_shows_file_contents(tmp_path):
    c = Cluster(tmp_path, 2, replicas=2, start=False)
    n1, n2 = c["n1"], c["n2"]
    proxy_addr = n2.address.rsplit(".", 1)[0] + ".12"
    toml = n1.etc / "cluster.toml"
    toml.write_text(toml.read_text().replace(f'address = "{n2.address}"', f'address = "{proxy_addr}"'))
    proxy = RecordingProxy((proxy_addr, n2.port), (n2.address, n2.port))
    try:
        c.start()
        canary = b"CANARY-" + os.urandom(8).hex().encode()
        write_file(n1.mount / "secret", canary * 1000)
        assert (n2.mount / "secret").read_bytes() == canary * 1000  # it did travel to n2
        with proxy.lock:
            assert len(proxy.seen) > len(canary) * 1000
            assert canary not in bytes(proxy.seen)
    finally:
        proxy.close()
        c.close()
