"""The keeper: a tiny process that holds a duplicate of every userfaultfd the pager serves.

Why: when the last holder of a uffd closes it, the kernel drops its registrations and the process
silently reads zero pages where its data was paged out (PLATFORM.md). With the keeper holding a
copy,
a dying gfvmd leaves the managed processes blocked on their next missing page instead, and the next
gfvmd takes every uffd back (`KeeperClient.take_all`), wakes all ranges and serves again.

The keeper is started by gfvmd (`python -m gfvm.pager.keeper SOCKET`) in its own session so that it
outlives gfvmd; it does nothing but hold file descriptors, so it has almost no way to die.

Protocol: SOCK_SEQPACKET at SOCKET (mode 0600, root peers only); each message is one JSON object,
file descriptors travel with it as SCM_RIGHTS.
    {"op": "put", "key": K, "meta": {...}} + 1 fd  -> {"ok": true}   (replaces an older K)
    {"op": "drop", "key": K}                       -> {"ok": true}
    {"op": "drop_prefix", "prefix": P}             -> {"ok": true, "dropped": n}
    {"op": "list"}                                 -> one {"key": K, "meta": {...}} + fd per entry,
                                                      then {"ok": true, "count": n}
    {"op": "ping"}                                 -> {"ok": true, "pid": ..., "count": n}
    {"op": "exit"}                                 -> {"ok": true}, then the keeper exits
                                                      (refused while it holds anything)
Keys are "<gfvm id>/<asid>"; meta is whatever gfvmd needs to reattach (host pid, start time...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

log = logging.getLogger("gfvm-keeper")

MAX_MSG = 65536
IDLE_EXIT = 60.0  # seconds without a client and without a uffd before the keeper exits


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _send(sock: socket.socket, obj: dict, fds: list[int] = ()) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def _recv(sock: socket.socket) -> tuple[dict | None, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MSG, 16)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds


class Keeper:
    """The keeper's state: key -> (meta, fd)."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[dict, int]] = {}

    def handle(self, conn: socket.socket, msg: dict, fds: list[int]) -> bool:
        """Serves one request; returns False when the keeper should exit."""
        op = msg.get("op")
        if op == "put":
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                _send(conn, {"ok": False, "error": "put needs exactly one fd"})
                return True
            old = self.held.pop(msg["key"], None)
            if old:
                os.close(old[1])
            self.held[msg["key"]] = (msg.get("meta", {}), fds[0])
            _send(conn, {"ok": True})
            return True
        for fd in fds:  # no other op carries fds
            os.close(fd)
        if op == "drop":
            old = self.held.pop(msg.get("key"), None)
            if old:
                os.close(old[1])
            _send(conn, {"ok": True})
        elif op == "drop_prefix":
            prefix = msg.get("prefix", "")
            keys = [k for k in self.held if prefix and k.startswith(prefix)]
            for k in keys:
                os.close(self.held.pop(k)[1])
            _send(conn, {"ok": True, "dropped": len(keys)})
        elif op == "list":
            for key, (meta, fd) in sorted(self.held.items()):
                _send(conn, {"key": key, "meta": meta}, [fd])
            _send(conn, {"ok": True, "count": len(self.held)})
        elif op == "ping":
            _send(conn, {"ok": True, "pid": os.getpid(), "count": len(self.held)})
        elif op == "exit":
            if self.held:
                _send(conn, {"ok": False, "error": f"still holding {len(self.held)} uffds"})
            else:
                _send(conn, {"ok": True})
                return False
        else:
            _send(conn, {"ok": False, "error": f"unknown op {op!r}"})
        return True

    def serve(self, path: Path) -> None:
        """Accepts connections on `path` until told to exit (blocking, single-threaded)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Bind under a temporary name and rename once listening: whoever sees the path can connect.
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            listener.bind(str(tmp))
        finally:
            os.umask(old)
        listener.listen(16)
        os.replace(tmp, path)
        conns: list[socket.socket] = []
        running = True
        idle_since = time.monotonic()
        while running:
            ready, _, _ = select.select([listener, *conns], [], [], IDLE_EXIT / 4)
            if self.held or conns:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > IDLE_EXIT:
                # Holding nothing and nobody connected (its gfvmd died with no managed process,
                # e.g. in a test): nothing to keep. A gfvmd that needs one starts a new keeper.
                log.info("keeper: idle, exiting")
                break
            for s in ready:
                if s is listener:
                    conn, _ = listener.accept()
                    if _peer_uid(conn) != 0:
                        conn.close()
                        continue
                    conns.append(conn)
                    continue
                try:
                    msg, fds = _recv(s)
                    if msg is None:
                        raise ConnectionResetError
                    running = self.handle(s, msg, fds) and running
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    if not isinstance(exc, ConnectionResetError):
                        log.warning("keeper: dropping a client: %r", exc)
                    conns.remove(s)
                    s.close()
        try:
            path.unlink()
        except FileNotFoundError:
            pass


class KeeperClient:
    """gfvmd's side of the keeper protocol (blocking; one request at a time per client)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        self.sock.connect(str(self.path))

    def close(self) -> None:
        self.sock.close()

    def _call(self, obj: dict, fds: list[int] = ()) -> dict:
        _send(self.sock, obj, fds)
        reply, extra = _recv(self.sock)
        for fd in extra:
            os.close(fd)
        if reply is None:
            raise ConnectionError("the keeper closed the connection")
        if not reply.get("ok"):
            raise OSError(f"keeper: {reply.get('error')}")
        return reply

    def put(self, key: str, fd: int, meta: dict) -> None:
        """Gives the keeper a duplicate of `fd` under `key` (our fd stays ours)."""
        self._call({"op": "put", "key": key, "meta": meta}, [fd])

    def drop(self, key: str) -> None:
        self._call({"op": "drop", "key": key})

    def drop_prefix(self, prefix: str) -> int:
        return self._call({"op": "drop_prefix", "prefix": prefix})["dropped"]

    def ping(self) -> dict:
        return self._call({"op": "ping"})

    def take_all(self) -> list[tuple[str, dict, int]]:
        """(key, meta, fd) for every uffd held; the fds are new duplicates owned by the caller."""
        _send(self.sock, {"op": "list"})
        out = []
        while True:
            msg, fds = _recv(self.sock)
            if msg is None:
                raise ConnectionError("the keeper closed the connection")
            if "key" in msg:
                out.append((msg["key"], msg.get("meta", {}), fds[0]))
                continue
            return out

    def exit(self) -> None:
        self._call({"op": "exit"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gfvm-keeper")
    parser.add_argument("socket", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s keeper %(levelname)s %(message)s"
    )
    # The keeper must outlive gfvmd and its terminal; only SIGKILL (or "exit") ends it.
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    Keeper().serve(args.socket)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
