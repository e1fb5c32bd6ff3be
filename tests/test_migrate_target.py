"""The target's restore stops waiting for CRIU when nobody serves its page faults any more."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import trio

from gfvm.errors import GfvmError
from gfvm.migrate import target


async def test_restore_fails_when_the_lazy_pages_server_ends(monkeypatch):
    """CRIU blocked on a fault (here: a restore that never returns) is cancelled once the
    server's thread has ended, and the server's error is the reason given."""
    monkeypatch.setattr(target, "SERVER_GONE_GRACE", 0.1)
    server = SimpleNamespace(error=OSError(5, "pread beyond the end of the paging file"))
    thread = threading.Thread(target=lambda: None)
    thread.start()
    cancelled = []

    async def criu_restore():
        try:
            await trio.sleep_forever()
        finally:
            cancelled.append(True)

    started = time.monotonic()
    with pytest.raises(GfvmError, match="lazy-pages server ended.*beyond the end"):
        await target._restore_while_served(server, thread, 60, criu_restore)
    assert cancelled and time.monotonic() - started < 30


async def test_restore_result_while_the_server_serves():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        async def criu_restore():
            await trio.sleep(0.1)
            return "restored"

        assert await target._restore_while_served(
            SimpleNamespace(error=None), thread, 60, criu_restore) == "restored"
    finally:
        stop.set()
        thread.join()


async def test_restore_timeout_cancels_criu():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with pytest.raises(GfvmError, match="did not finish within"):
            await target._restore_while_served(
                SimpleNamespace(error=None), thread, 0.3, trio.sleep_forever)
    finally:
        stop.set()
        thread.join()


async def test_criu_restore_error_is_raised_as_itself():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        async def criu_restore():
            raise GfvmError("criu restore failed: boom")

        with pytest.raises(GfvmError, match="boom"):
            await target._restore_while_served(SimpleNamespace(error=None), thread, 60, criu_restore)
    finally:
        stop.set()
        thread.join()


async def test_cancelled_restore_kills_what_it_restored(tmp_path):
    """criu's restore cancel hook kills every descendant of the CRIU process (the restored
    tree's root among them) before CRIU itself."""
    import os
    import subprocess

    from gfvm.migrate import criu

    pidfile = tmp_path / "child.pid"
    with trio.move_on_after(5):
        async with trio.open_nursery() as nursery:
            async def run():
                await trio.run_process(
                    ["sh", "-c", f"sleep 1000 & echo $! > {pidfile}; wait"],
                    stdin=subprocess.DEVNULL, check=False, deliver_cancel=criu._kill_restore)

            nursery.start_soon(run)
            while not pidfile.exists() or not pidfile.read_text().strip():
                await trio.sleep(0.02)
            child = int(pidfile.read_text())
            nursery.cancel_scope.cancel()
    for _ in range(100):
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        await trio.sleep(0.02)
    else:
        os.kill(child, 9)
        pytest.fail("the restore's descendant survived the cancel")
