"""The migration workload (workload.c next to this file): build it, start it under gfvm, talk to it.

The workload's memory is a pure function of its step counter (see the header of workload.c), so
it verifies itself; it listens on a TCP port (all addresses) in the network namespace of the node
it runs on and answers `status`, `verify` and `exit`. A client reaches it either at 127.0.0.1
inside that node's network namespace (the namespace cluster, from the host) or at the node's
address over the network (a configured cluster, from one of its nodes). `gfvm demo`, `gfvm bench migrate` and the migration tests
use it. Needs a C compiler (gcc). Everything here blocks.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gfvm.errors import FeatureMissing, GfvmError

SOURCE = Path(__file__).resolve().parent / "workload.c"
CLONE_NEWNET = 0x40000000


def build(directory: Path) -> Path:
    """Compiles the workload into `directory` and returns the binary's path (~0.3 s)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise FeatureMissing("a C compiler (gcc) is needed to build the migration workload "
                             "(apt-get install build-essential; deploy/install installs it)")
    out = Path(directory) / "gfvm-migrate-workload"
    subprocess.run([cc, "-O2", "-Wall", "-pthread", "-o", str(out), str(SOURCE)], check=True,
                   capture_output=True)
    return out


def argv(binary: Path, statedir: Path, *, mib: int, hot_mib: int, rate: int = 0, steps: int = 0,
         check_s: float = 0) -> list[str]:
    """The command line (see workload.c): `rate` hot pages per second (0: flat out), finish after
    `steps` steps (0: never), a full self-check every `check_s` seconds (0: on request only)."""
    return [str(binary), str(statedir), str(mib), str(hot_mib), str(rate), str(steps), str(check_s)]


def connect_in_netns(netns: Path | None, port: int, timeout: float,
                     host: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to host:port made inside the network namespace `netns` (a path such as
    /run/netns/NAME or /proc/PID/ns/net; None: ours). The socket is made by a helper thread that
    entered the namespace; a socket stays in the namespace it was created in. Blocks."""
    result: dict = {}

    def work() -> None:
        try:
            if netns is not None:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(netns, os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns({netns})")
                finally:
                    os.close(fd)
            result["sock"] = socket.create_connection((host, port), timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result["error"] = exc

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["sock"]


@dataclass
class Status:
    steps: int
    checks: int
    bad: int
    pid: int


class WorkloadClient:
    """Talks to one workload at `host` (default 127.0.0.1) from inside the network namespace
    `netns` (None: ours). Both say where it runs now: update them after a migration (the netns
    of the new node on a namespace cluster, the new node's address on a configured one)."""

    def __init__(self, statedir: Path, netns: Path | None = None, host: str = "127.0.0.1") -> None:
        self.statedir = Path(statedir)
        self.netns = netns
        self.host = host

    def wait_ready(self, timeout: float = 120.0, alive=lambda: True) -> int:
        """Waits for the port file (the region is filled); returns the port."""
        port_file = self.statedir / "port"
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if not alive():
                raise GfvmError("the workload exited during start-up")
            if time.monotonic() > deadline:
                raise GfvmError(f"the workload did not become ready within {timeout:.0f} s")
            time.sleep(0.05)
        return int(port_file.read_text())

    @property
    def port(self) -> int:
        return int((self.statedir / "port").read_text())

    def command(self, text: str, timeout: float = 120.0) -> str:
        """Sends one command and returns the answer line."""
        with connect_in_netns(self.netns, self.port, timeout, self.host) as s:
            s.settimeout(timeout)
            s.sendall(text.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return data.decode().strip()

    def status(self, timeout: float = 120.0) -> Status:
        answer = self.command("status", timeout)
        m = re.fullmatch(r"ok steps=(\d+) checks=(\d+) bad=(\d+) pid=(\d+)", answer)
        if not m:
            raise GfvmError(f"workload answered {answer!r} to status")
        return Status(*(int(x) for x in m.groups()))

    def verify(self, timeout: float = 300.0) -> int:
        """Makes the workload check its whole memory; returns its step count. GfvmError if bad."""
        answer = self.command("verify", timeout)
        m = re.fullmatch(r"ok steps=(\d+)", answer)
        if not m:
            raise GfvmError(f"the workload's memory check failed: {answer}")
        return int(m.group(1))

    def finish(self, more_steps: int) -> int:
        """Tells the workload to finish (verify, write its result, exit) after `more_steps`
        more steps; returns the step count it will stop at."""
        answer = self.command(f"finish {more_steps}")
        m = re.fullmatch(r"ok goal=(\d+)", answer)
        if not m:
            raise GfvmError(f"workload answered {answer!r} to finish")
        return int(m.group(1))

    def wait_result(self, timeout: float = 120.0) -> str:
        """Waits for the result line the workload writes when it finishes."""
        deadline = time.monotonic() + timeout
        while (line := self.result()) is None:
            if time.monotonic() > deadline:
                raise GfvmError(f"the workload did not finish within {timeout:.0f} s")
            time.sleep(0.1)
        return line

    def result(self) -> str | None:
        """The line the workload wrote when it finished (STEPS reached), or None."""
        try:
            return (self.statedir / "result").read_text().strip()
        except FileNotFoundError:
            return None
