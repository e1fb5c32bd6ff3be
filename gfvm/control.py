"""CLI <-> gfvmd control protocol: JSON lines over the node's Unix socket.

One connection carries one request and its answer:
    client -> {"op": "migrate", "args": {...}}
    server -> zero or more {"progress": <str or object>} lines, then exactly one of
              {"ok": true, "result": {...}}  or  {"ok": false, "error": "<sentence>", "kind": "<kind>"}
Only root may talk to the daemon: the server checks the peer's uid with SO_PEERCRED.
Handlers are `async def handler(args: dict, progress: Progress) -> dict` and raise GfvmError (or
OSError) for failures the user should see; anything else is logged and reported as an internal error.
The server side runs on trio; the client side is plain blocking code for the CLI.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from gfvm.errors import DaemonNotRunning, GfvmError

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # a request larger than this is refused

Progress = Callable[[Any], Awaitable[None]]
Handler = Callable[[dict, Progress], Awaitable[dict]]


class RemoteError(GfvmError):
    """An error the daemon reported; keeps the daemon's `kind`."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


async def _read_line(stream: trio.SocketStream, buf: bytearray) -> bytes | None:
    while b"\n" not in buf:
        if len(buf) > MAX_LINE:
            raise ValueError("request too large")
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


async def _send(stream: trio.SocketStream, obj: dict) -> None:
    await stream.send_all(json.dumps(obj, separators=(",", ":")).encode() + b"\n")


class ControlServer:
    """Dispatches control requests to handlers that daemon components register by name."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, op: str, handler: Handler) -> None:
        """Adds `handler` for requests whose "op" is `op` (one handler per op)."""
        if op in self._handlers:
            raise ValueError(f"control op {op!r} registered twice")
        self._handlers[op] = handler

    @property
    def ops(self) -> list[str]:
        return sorted(self._handlers)

    async def serve(self, path: Path, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listens on `path` (mode 0600) until cancelled; reports readiness via task_status."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old_umask)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        task_status.started()
        try:
            await trio.serve_listeners(self._handle_connection, [listener])
        finally:
            with trio.CancelScope(shield=True):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                uid = _peer_uid(stream.socket)  # type: ignore[arg-type]
            except OSError:
                return
            if uid != 0:
                await _send(stream, {"ok": False, "kind": "permission", "error": "gfvm needs root"})
                return
            buf = bytearray()
            try:
                line = await _read_line(stream, buf)
                if line is None:
                    return
                request = json.loads(line)
                op, args = request["op"], request.get("args", {})
                if not isinstance(op, str) or not isinstance(args, dict):
                    raise ValueError("op must be a string and args an object")
            except (ValueError, KeyError, TypeError) as exc:
                await _send(stream, {"ok": False, "kind": "usage", "error": f"bad request: {exc}"})
                return
            handler = self._handlers.get(op)
            if handler is None:
                await _send(
                    stream,
                    {"ok": False, "kind": "usage", "error": f"this gfvmd does not know {op!r}"},
                )
                return

            async def progress(item: Any) -> None:
                try:
                    await _send(stream, {"progress": item})
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the client went away; the operation itself goes on

            try:
                result = await handler(args, progress)
                answer = {"ok": True, "result": result or {}}
            except GfvmError as exc:
                answer = {"ok": False, "kind": exc.kind, "error": str(exc)}
            except OSError as exc:
                answer = {"ok": False, "kind": "os-error", "error": str(exc)}
            except Exception as exc:  # noqa: BLE001 - one bad request must not end the daemon
                log.exception("control op %s failed", op)
                answer = {"ok": False, "kind": "internal", "error": f"internal error: {exc!r}"}
            try:
                await _send(stream, answer)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


def call(
    socket_path: Path,
    op: str,
    args: dict | None = None,
    *,
    on_progress: Callable[[Any], None] | None = None,
    timeout: float | None = None,
) -> dict:
    """Sends one request to the daemon at `socket_path` and returns its result (blocking).

    Raises DaemonNotRunning when nobody listens there and RemoteError for errors the daemon reports.
    `timeout` bounds each wait for a line (None: wait as long as the operation takes).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(
                f"gfvmd is not running on this node (no listener at {socket_path}); "
                "start it with `systemctl start gfvmd` or `gfvm daemon`"
            ) from None
        sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
        reader = sock.makefile("rb")
        for raw in reader:
            msg = json.loads(raw)
            if "progress" in msg:
                if on_progress is not None:
                    on_progress(msg["progress"])
                continue
            if msg.get("ok"):
                return msg.get("result", {})
            raise RemoteError(msg.get("error", "unknown error"), msg.get("kind", "error"))
        raise DaemonNotRunning(f"gfvmd closed the connection before answering {op!r}")
    finally:
        sock.close()
