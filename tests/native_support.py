"""Shared helpers for tests/test_native_*.py: a small C target process with known memory
(tests/native_target.c, built once per session into a temp dir, see native_fixtures.py) driven
over pipes, and the contents its pages hold."""

from __future__ import annotations

import array
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PAGE = 4096


def require(condition: bool, reason: str) -> None:
    """Skips the test (fails it under CI=true) when `condition` is false."""
    if condition:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"required feature missing under CI: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (userfaultfd, ptrace, pidfd_getfd)")


class Target:
    """One running native_target process."""

    def __init__(self, binary: Path, npages: int):
        self.proc = subprocess.Popen(
            [str(binary), str(npages)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        self._buf = b""
        word, addr, n, pid = self.read_line(10).split()
        assert word == "ready"
        self.addr = int(addr, 16)
        self.npages = int(n)
        self.pid = int(pid)

    @property
    def end(self) -> int:
        return self.addr + self.npages * PAGE

    def page(self, i: int) -> int:
        return self.addr + i * PAGE

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    def read_line(self, timeout: float = 10.0) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"target {self.pid} did not answer within {timeout} s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError(f"target {self.pid} closed its output")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def ready_to_read(self, timeout: float = 0.0) -> bool:
        assert self.proc.stdout is not None
        return b"\n" in self._buf or bool(
            select.select([self.proc.stdout.fileno()], [], [], timeout)[0]
        )

    def cmd(self, line: str, timeout: float = 10.0) -> str:
        self.send(line)
        return self.read_line(timeout)

    def state(self) -> str:
        with open(f"/proc/{self.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    def wait_state(self, states: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            st = self.state()
            if st in states or time.monotonic() > deadline:
                return st
            time.sleep(0.005)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with_suppress(lambda: os.kill(self.proc.pid, signal.SIGKILL))
        with_suppress(lambda: self.proc.wait(timeout=10))
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with_suppress(f.close)


def with_suppress(fn) -> None:
    try:
        fn()
    except (OSError, subprocess.TimeoutExpired):
        pass


# --------------------------------------------------------------------------- memory contents

_M = (1 << 64) - 1


def page_bytes(page: int, gen: int) -> bytes:
    """What native_target's page `page` holds at generation `gen` (0: zeros)."""
    if gen == 0:
        return bytes(PAGE)
    base = (((page + 1) * 0x9E3779B97F4A7C15) & _M) ^ ((gen * 0x100000001B3) & _M)
    return array.array("Q", [base ^ w for w in range(PAGE // 8)]).tobytes()


def inject_uffd(tracer, target: Target, features: int, *, missing: bool = True, wp: bool = False):
    """A uffd created inside `target` by injection, API'd with `features`, with the target's
    region registered (and, with wp, armed: write-protected)."""
    u = tracer.inject_userfaultfd(target.pid)
    u.api(features)
    u.register(target.addr, target.npages * PAGE, missing=missing, wp=wp)
    if wp:
        u.writeprotect(target.addr, target.npages * PAGE)
    return u
