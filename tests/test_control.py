"""The CLI <-> daemon control protocol over a real Unix socket."""

from __future__ import annotations

import json
import os
import socket

import pytest
import trio

from gfvm import control
from gfvm.errors import DaemonNotRunning, NotFound


async def start_server(nursery, path):
    server = control.ControlServer()

    async def echo(args, progress):
        for i in range(args.get("steps", 0)):
            await progress(f"step {i}")
        return {"echo": args}

    async def missing(args, progress):
        raise NotFound("no managed process with id 42")

    async def crash(args, progress):
        raise RuntimeError("boom")

    server.register("echo", echo)
    server.register("missing", missing)
    server.register("crash", crash)
    await nursery.start(server.serve, path)
    return server


async def call(path, op, args=None, **kw):
    return await trio.to_thread.run_sync(lambda: control.call(path, op, args, **kw))


async def test_request_progress_and_result(tmp_path):
    path = tmp_path / "d.sock"
    async with trio.open_nursery() as nursery:
        await start_server(nursery, path)
        seen = []
        result = await call(path, "echo", {"steps": 3, "x": 1}, on_progress=seen.append)
        assert result == {"echo": {"steps": 3, "x": 1}}
        assert seen == ["step 0", "step 1", "step 2"]
        assert os.stat(path).st_mode & 0o777 == 0o600
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_errors_keep_their_kind(tmp_path):
    path = tmp_path / "d.sock"
    async with trio.open_nursery() as nursery:
        await start_server(nursery, path)
        with pytest.raises(control.RemoteError) as err:
            await call(path, "missing")
        assert err.value.kind == "not-found" and "id 42" in str(err.value)
        with pytest.raises(control.RemoteError, match="internal error"):
            await call(path, "crash")
        with pytest.raises(control.RemoteError, match="does not know 'nope'"):
            await call(path, "nope")
        # the daemon keeps serving after all of that
        assert (await call(path, "echo", {}))["echo"] == {}
        nursery.cancel_scope.cancel()


async def test_malformed_requests_get_an_answer_not_a_crash(tmp_path):
    path = tmp_path / "d.sock"

    def raw(payload: bytes) -> dict:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            s.sendall(payload)
            return json.loads(s.makefile().readline())

    async with trio.open_nursery() as nursery:
        await start_server(nursery, path)
        for payload in (b"not json\n", b'{"args": {}}\n', b'{"op": 5}\n', b'{"op": "echo", "args": []}\n'):
            answer = await trio.to_thread.run_sync(raw, payload)
            assert answer["ok"] is False and answer["kind"] == "usage"
        assert (await call(path, "echo", {"a": 1}))["echo"] == {"a": 1}
        nursery.cancel_scope.cancel()


def test_no_daemon_gives_a_clear_error(tmp_path):
    with pytest.raises(DaemonNotRunning, match="gfvmd is not running"):
        control.call(tmp_path / "absent.sock", "ping")


def test_duplicate_registration_is_a_bug():
    server = control.ControlServer()
    server.register("a", None)
    with pytest.raises(ValueError):
        server.register("a", None)
