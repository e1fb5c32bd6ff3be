"""The keeper process: holds fd duplicates across the death of its client, hands them back."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from gfvm.pager.keeper import KeeperClient


@pytest.fixture
def keeper(tmp_path):
    sock = tmp_path / "keeper.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gfvm.pager.keeper", str(sock)], stdin=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None, "keeper exited at start"
        assert time.monotonic() < deadline, "keeper did not start"
        time.sleep(0.01)
    yield sock
    proc.kill()
    proc.wait()


def _same_file(fd1: int, fd2: int) -> bool:
    a, b = os.fstat(fd1), os.fstat(fd2)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def test_fd_survives_client_and_comes_back(keeper):
    r, w = os.pipe()
    client = KeeperClient(keeper)
    client.put("p1/2", w, {"host_pid": 123})
    client.close()
    os.close(w)  # the keeper now holds the only write end
    client = KeeperClient(keeper)
    ((key, meta, fd),) = client.take_all()
    assert key == "p1/2" and meta == {"host_pid": 123}
    os.write(fd, b"still open")
    assert os.read(r, 100) == b"still open"
    os.close(fd)
    client.drop("p1/2")
    assert client.ping()["count"] == 0
    # with no holder left, the pipe's write end is closed: the reader sees EOF
    assert os.read(r, 100) == b""
    os.close(r)
    client.close()


def test_put_replaces_and_drop_prefix(keeper):
    r, w = os.pipe()
    client = KeeperClient(keeper)
    client.put("a/1", r, {"n": 1})
    client.put("a/1", w, {"n": 2})
    client.put("a/2", w, {})
    client.put("b/1", w, {})
    entries = client.take_all()
    assert [(k, m) for k, m, _ in entries] == [("a/1", {"n": 2}), ("a/2", {}), ("b/1", {})]
    assert _same_file(entries[0][2], w)
    for _, _, fd in entries:
        os.close(fd)
    assert client.drop_prefix("a/") == 2
    assert [k for k, _, fd in client.take_all() if not os.close(fd)] == ["b/1"]
    with pytest.raises(OSError, match="still holding"):
        client.exit()
    client.drop("b/1")
    client.exit()
    client.close()
    os.close(r)
    os.close(w)


def test_put_without_fd_is_refused(keeper):
    client = KeeperClient(keeper)
    with pytest.raises(OSError, match="exactly one fd"):
        client._call({"op": "put", "key": "x", "meta": {}})
    assert client.ping()["count"] == 0
    client.close()
