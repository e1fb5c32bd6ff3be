"""The uffd keeper: a small separate process that holds a duplicate of every userfaultfd the
lazy-pages server serves, plus the journal needed to serve them again.

Why: when the only holder of a uffd dies, the kernel releases it and the restored process then
silently reads zero pages (PLATFORM.md, "Migration hand-off"). With the keeper holding a second
reference, a crashed server leaves the process blocked in its page fault instead, and a successor
can fetch the uffds and the journal from the keeper (`handover`), wake every blocked thread
(UFFDIO_WAKE: faults the dead server had read are never re-sent) and carry on.

Journal records (JSON objects, one SEQPACKET message each, a uffd attached with SCM_RIGHTS where
noted), appended in the order the server learned them:
  {"op": "hold", "ctx": N, "inner_pid": P}            + uffd   a task's uffd from CRIU
  {"op": "fork", "ctx": N, "parent": M}               + uffd   a child's uffd from a FORK event
  {"op": "event", "ctx": N, "kind": "remove"|"unmap", "start": a, "end": b}
  {"op": "event", "ctx": N, "kind": "remap", "src": a, "dst": b, "len": n}
  {"op": "host", "ctx": N, "pid": H}                           the task's host pid
  {"op": "drop", "ctx": N}                                     the task exited: keeper closes its copy
  {"op": "root", "pid": H}                                     the restored tree's root host pid
  {"op": "finished"}                                           CRIU's restore completed
Requests: {"op": "handover"} -> every record again (with a fresh duplicate of each live uffd),
then {"op": "end"}; {"op": "release"} -> the keeper closes everything and exits.

The keeper exits on "release", when the tree's root exits (everything in its PID namespace is
then gone), or when nobody is connected and no root is known for `orphan_timeout` seconds (a
restore that never got going). Only clients with our own uid may connect (SO_PEERCRED).

The window it cannot cover: an event the server had read but not yet journaled when it died.
Run as `python -m gfvm.migrate.uffd_keeper --socket PATH`; it prints "ready" once listening.
Everything here blocks; the client is used from the lazy-pages server's own thread.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from gfvm.errors import GfvmError

MAX_RECORD = 65536
_FD_SPACE = socket.CMSG_SPACE(struct.calcsize("i"))


class KeeperGone(GfvmError):
    """The keeper process is unreachable (dead or never started)."""


def _send(sock: socket.socket, record: dict, fd: int | None = None) -> None:
    data = json.dumps(record, separators=(",", ":")).encode()
    if len(data) > MAX_RECORD:
        raise ValueError("keeper record too large")
    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
    sock.sendmsg([data], ancdata)


def _recv(sock: socket.socket) -> tuple[dict | None, int | None]:
    """(record, fd or None); (None, None) at EOF. Raises ValueError on a malformed message."""
    data, ancdata, flags, _ = sock.recvmsg(MAX_RECORD, _FD_SPACE)
    fds = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if not data and not fds:
        return None, None
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) > 1:
        for fd in fds:
            os.close(fd)
        raise ValueError("truncated keeper message")
    record = json.loads(data)
    if not isinstance(record, dict) or not isinstance(record.get("op"), str):
        for fd in fds:
            os.close(fd)
        raise ValueError("keeper record is not an object with an op")
    return record, (fds[0] if fds else None)


# --- client -----------------------------------------------------------------------------------


class KeeperClient:
    """A connection to a keeper (blocking calls)."""

    def __init__(self, sock: socket.socket, path: Path, proc: subprocess.Popen | None = None) -> None:
        self._sock = sock
        self.path = path
        self.proc = proc  # set when we spawned it

    @classmethod
    def spawn(cls, path: str | os.PathLike, *, orphan_timeout: float = 300.0) -> "KeeperClient":
        """Starts a keeper listening on `path` (in its own session, so it outlives its parent's
        process group) and connects to it (blocking, ~0.2 s for the interpreter to start)."""
        path = Path(path)
        proc = subprocess.Popen(
            [sys.executable, "-m", "gfvm.migrate.uffd_keeper", "--socket", str(path),
             "--orphan-timeout", str(orphan_timeout)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))},
        )
        line = proc.stdout.readline()  # type: ignore[union-attr]
        proc.stdout.close()  # type: ignore[union-attr]
        if line.strip() != b"ready":
            proc.kill()
            proc.wait()
            raise KeeperGone(f"the uffd keeper did not start (exit {proc.returncode})")
        client = cls.connect(path)
        client.proc = proc
        return client

    @classmethod
    def connect(cls, path: str | os.PathLike) -> "KeeperClient":
        """Connects to the keeper at `path`; KeeperGone when nobody listens there."""
        path = Path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise KeeperGone(f"no uffd keeper at {path}: {exc.strerror}") from None
        return cls(sock, path)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def send(self, record: dict, fd: int | None = None) -> None:
        """Appends a journal record (with a uffd duplicate when `fd` is given)."""
        try:
            _send(self._sock, record, fd)
        except OSError as exc:
            raise KeeperGone(f"uffd keeper at {self.path} is gone: {exc.strerror}") from None

    def handover(self) -> list[tuple[dict, int | None]]:
        """Every journal record in order, each live uffd duplicated into this process."""
        self.send({"op": "handover"})
        records = []
        while True:
            try:
                record, fd = _recv(self._sock)
            except (OSError, ValueError) as exc:
                raise KeeperGone(f"handover from {self.path} failed: {exc}") from None
            if record is None:
                raise KeeperGone(f"the uffd keeper at {self.path} hung up during the handover")
            if record["op"] == "end":
                return records
            records.append((record, fd))

    def release(self, timeout: float = 5.0) -> None:
        """Tells the keeper to close every uffd and exit; waits for it when we spawned it."""
        try:
            self.send({"op": "release"})
        except KeeperGone:
            pass
        self.close()
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self._sock.close()


# --- the keeper process -------------------------------------------------------------------------


class Keeper:
    def __init__(self, path: Path, orphan_timeout: float) -> None:
        self.path = path
        self.orphan_timeout = orphan_timeout
        self.records: list[dict] = []
        self.fds: dict[int, int] = {}  # ctx -> our duplicate
        self.root_pidfd: int | None = None
        self.clients: dict[int, socket.socket] = {}
        self.released = False

    def run(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o077)
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old_umask)
        listener.listen(8)
        print("ready", flush=True)
        os.close(1)
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        idle_since = time.monotonic()
        root_registered = False
        try:
            while not self.released:
                for fd, _ in poller.poll(1000):
                    if fd == listener.fileno():
                        conn, _ = listener.accept()
                        if not self._peer_ok(conn):
                            conn.close()
                            continue
                        self.clients[conn.fileno()] = conn
                        poller.register(conn, select.POLLIN)
                    elif fd == self.root_pidfd:
                        return 0  # the tree is gone, and with it every task we hold a uffd of
                    elif fd in self.clients and not self._handle(self.clients[fd]):
                        poller.unregister(fd)
                        self.clients.pop(fd).close()
                if self.root_pidfd is not None and not root_registered:
                    poller.register(self.root_pidfd, select.POLLIN)
                    root_registered = True
                if self.clients or self.root_pidfd is not None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > self.orphan_timeout:
                    return 0
            return 0
        finally:
            listener.close()
            self.path.unlink(missing_ok=True)
            for fd in self.fds.values():
                os.close(fd)

    def _peer_ok(self, conn: socket.socket) -> bool:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid == os.geteuid()

    def _handle(self, conn: socket.socket) -> bool:
        """Handles one message; False when the client is gone or misbehaved."""
        try:
            record, fd = _recv(conn)
        except (OSError, ValueError):
            return False
        if record is None:
            return False
        op = record["op"]
        if op == "release":
            self.released = True
            return True
        if op == "handover":
            try:
                for rec in self.records:
                    ctx = rec.get("ctx")
                    attach = self.fds.get(ctx) if rec["op"] in ("hold", "fork") else None
                    _send(conn, rec, attach)
                _send(conn, {"op": "end"})
            except OSError:
                return False
            return True
        if op in ("hold", "fork"):
            if fd is None or not isinstance(record.get("ctx"), int) or record["ctx"] in self.fds:
                if fd is not None:
                    os.close(fd)
                return False
            self.fds[record["ctx"]] = fd
        elif fd is not None:
            os.close(fd)
        if op == "drop":
            dup = self.fds.pop(record.get("ctx"), None)
            if dup is not None:
                os.close(dup)
        if op == "root" and self.root_pidfd is None and isinstance(record.get("pid"), int):
            try:
                self.root_pidfd = os.pidfd_open(record["pid"])
            except OSError:
                return True  # already gone: exit at the next loop via the orphan rule
        self.records.append(record)
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gfvm-uffd-keeper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--orphan-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    return Keeper(args.socket, args.orphan_timeout).run()


if __name__ == "__main__":
    sys.exit(main())
