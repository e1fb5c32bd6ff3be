"""Test harness for the File Manager: real gfvmd processes with real FUSE mounts and TLS.

Until the namespace test cluster is used here, nodes share this network namespace: each node
gets its own loopback address (127.77.X.N, X unique per cluster) and its own etc/state/run/mount
directories under the test's tmp_path (GFVM_ETC/STATE/RUN/MOUNT). Every daemon is started by
the test and killed by PID at teardown; every mount is unmounted (and its FUSE connection
aborted if a request still hangs on it).

This file holds no test itself; other tests/test_fm_*.py import it.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import struct
import threading
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import claim_loopback_block
from gfvm import control, pki
from gfvm.config import ClusterConfig, NodeSpec

ROOT = Path(__file__).resolve().parent.parent
FAST = {
    "heartbeat": 0.1,
    "lease": 0.6,
    "rpc_timeout": 1.0,
    "write_timeout": 1.0,
    "failover_after": 2.0,
    "rereplicate_after": 4.0,
    "io_timeout": 8.0,
}
_counter = itertools.count()


def need_fuse() -> None:
    problem = None
    if os.geteuid() != 0:
        problem = "needs root"
    elif not os.path.exists("/dev/fuse"):
        problem = "needs /dev/fuse"
    elif shutil.which("fusermount3") is None:
        problem = "needs fusermount3"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)


def _fuse_connection(mount: Path) -> Path | None:
    try:
        dev = os.stat(mount).st_dev
    except OSError:
        return None
    conn = Path("/sys/fs/fuse/connections") / str(os.minor(dev))
    return conn if conn.exists() else None


def _abort(conn: Path | None) -> None:
    if conn is not None and (conn / "abort").exists():
        try:
            (conn / "abort").write_text("1")
        except OSError:
            pass


def wait_for(pred, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    """Polls `pred()` until it returns a true value (returned) or `timeout` passes (fails)."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as exc:  # noqa: BLE001 - the condition may not hold yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


class Node:
    def __init__(self, cluster: "Cluster", name: str, address: str, port: int) -> None:
        self.cluster = cluster
        self.name = name
        self.address = address
        self.port = port
        base = cluster.root / name
        self.etc, self.state, self.run, self.mount = (base / d for d in ("etc", "state", "run", "mnt"))
        for d in (self.etc, self.state, self.run, self.mount):
            d.mkdir(parents=True, exist_ok=True)
        self.log = base / "gfvmd.log"
        self.proc: subprocess.Popen | None = None
        self.conn: Path | None = None

    @property
    def env(self) -> dict:
        env = dict(os.environ)
        env.update(GFVM_ETC=str(self.etc), GFVM_STATE=str(self.state), GFVM_RUN=str(self.run),
                   GFVM_MOUNT=str(self.mount), PYTHONPATH=str(ROOT))
        env.pop("GFVM_FAULT", None)
        return env

    def start(self, *, faults: str = "", wait: bool = True) -> None:
        assert self.proc is None or self.proc.poll() is not None
        env = self.env
        if faults:
            env["GFVM_FAULT"] = faults
        with open(self.log, "ab") as logf:
            logf.write(f"--- start {time.strftime('%H:%M:%S')} ---\n".encode())
            self.proc = subprocess.Popen([sys.executable, "-m", "gfvm.daemon", "--log-level", "debug"],
                                         cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name}'s gfvmd exited ({self.proc.returncode}):\n{self.tail()}")
            if not os.path.ismount(self.mount):
                return False
            self.conn = _fuse_connection(self.mount) or self.conn
            return self.call("fm.status", timeout=2)

        wait_for(ready, timeout, what=f"{self.name}'s gfvmd to be ready")

    def call(self, op: str, args: dict | None = None, timeout: float | None = 30) -> dict:
        return control.call(self.run / "gfvmd.sock", op, args or {}, timeout=timeout)

    def status(self) -> dict:
        return self.call("fm.status", timeout=5)

    def where(self, path: str) -> dict:
        return self.call("fm.where", {"path": path}, timeout=10)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kills this node's daemon by PID (SIGKILL: a crash) and cleans its mount."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            self.unmount()

    def unmount(self) -> None:
        conn = self.conn or _fuse_connection(self.mount)
        _abort(conn)
        if os.path.ismount(self.mount) or _is_stale(self.mount):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mount)], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.conn = None

    def path(self, rel: str) -> Path:
        return self.mount / rel

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def store_has(self, fid: int) -> bool:
        return (self.state / "fm" / "files" / str(fid) / "info.json").exists()

    def copy_dir(self, fid: int) -> Path:
        return self.state / "fm" / "files" / str(fid)


def _is_stale(mount: Path) -> bool:
    try:
        os.stat(mount)
        return False
    except OSError as exc:
        return exc.errno == errno.ENOTCONN


class Cluster:
    def __init__(self, root: Path, n: int = 3, *, replicas: int = 2, fm: dict | None = None,
                 start: bool = True) -> None:
        need_fuse()
        self.root = root
        k, self._claim = claim_loopback_block("127.77", os.getpid() * 7 + next(_counter))
        self.nodes = [Node(self, f"n{i + 1}", f"127.77.{k}.{i + 1}", 7077) for i in range(n)]
        section = dict(FAST)
        section.update(fm or {})
        self.config = ClusterConfig(
            name="t" + str(k), replicas=replicas,
            nodes=tuple(NodeSpec(x.name, x.address, x.port) for x in self.nodes),
            sections={"fm": section})
        ca = pki.create_ca(root / "ca", self.config.name)
        self.ca = ca
        for node in self.nodes:
            ca.issue(node.name).write(node.etc / "tls")
            (node.etc / "cluster.toml").write_text(self.config.to_toml())
            (node.etc / "node.toml").write_text(f'name = "{node.name}"\n')
        if start:
            try:
                self.start()
            except BaseException:
                print(self.logs())
                self.close()
                raise

    def __getitem__(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def start(self) -> None:
        for node in self.nodes:
            node.start(wait=False)
        for node in self.nodes:
            node.wait_ready()
        self.wait_stable()

    def wait_stable(self, nodes: list[Node] | None = None, timeout: float = 20.0) -> None:
        """Waits until the given nodes (default: all running) agree on a leader and hold leases."""
        nodes = nodes or [n for n in self.nodes if n.proc and n.proc.poll() is None]

        def stable():
            sts = [n.status() for n in nodes]
            leaders = {s["leader"] for s in sts}
            return len(leaders) == 1 and None not in leaders and all(s["lease"] for s in sts)

        wait_for(stable, timeout, what="a metadata leader and leases on every node")

    def close(self) -> None:
        for node in self.nodes:
            try:
                node.kill(signal.SIGKILL)
            except Exception:  # noqa: BLE001 - keep cleaning the others
                pass
        for node in self.nodes:
            node.unmount()
        self._claim.close()  # the addresses are free for another cluster

    def logs(self) -> str:
        return "\n".join(f"===== {n.name} =====\n{n.tail(80)}" for n in self.nodes)


def fid_of(node: Node, rel: str) -> int:
    return node.where(rel)["fid"]


def write_file(path: Path, data: bytes, *, fsync: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view[: 1 << 20])
            view = view[n:]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def dump(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)


def page(i: int, salt: int = 0) -> bytes:
    """Record i of a workload: one 4 KiB page saying who it is."""
    head = struct.pack("<QQ", i, salt)
    return (head + hashlib.sha256(head).digest() * 128)[:4096]


class Writer(threading.Thread):
    """Writes page records 0, 1, 2... through a FUSE mount, fsyncing every `every` records.

    `acked` is the number of records covered by a successful fsync: the ones that must survive
    (RELIABILITY.md #1). Stops at the first error (kept in `error`) or when `stop()` is called.
    """

    def __init__(self, path: Path, *, salt: int = 0, every: int = 8, limit: int = 1 << 30,
                 pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.path, self.salt, self.every, self.limit, self.pause = path, salt, every, limit, pause
        self.acked = 0
        self.written = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            self.error = exc
            return
        try:
            i = 0
            while not self._halt.is_set() and i < self.limit:
                os.pwrite(fd, page(i, self.salt), i * 4096)
                i += 1
                self.written = i
                if i % self.every == 0:
                    os.fsync(fd)
                    self.acked = i
                if self.pause:
                    time.sleep(self.pause)
        except OSError as exc:
            self.error = exc
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    def stop(self) -> None:
        self._halt.set()
        self.join(30)


def check_records(data: bytes, acked: int, salt: int = 0) -> list[int]:
    """Indices of acknowledged records missing or wrong in `data` (empty: nothing lost)."""
    bad = []
    for i in range(acked):
        if data[i * 4096 : (i + 1) * 4096] != page(i, salt):
            bad.append(i)
    return bad


def masters_per_epoch(cluster: "Cluster", rel_fid: int) -> dict[int, set[str]]:
    """epoch -> nodes that served file `rel_fid` as master in it, from every daemon's log
    (Jepsen-style check: at most one master per epoch)."""
    import re

    pat = re.compile(rf"file {rel_fid}: master on (\S+) at epoch (\d+)")
    out: dict[int, set[str]] = {}
    for n in cluster.nodes:
        try:
            text = n.log.read_text(errors="replace")
        except FileNotFoundError:
            continue
        for node, epoch in pat.findall(text):
            out.setdefault(int(epoch), set()).add(node)
    return out


def arm(node: Node, name: str, action: str) -> None:
    node.call("fm.fault", {"name": name, "action": action}, timeout=5)
