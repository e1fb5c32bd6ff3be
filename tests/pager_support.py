"""Helpers for the pager tests: the C workload, a Pager without gfvmd, memory-vs-file checks."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from types import SimpleNamespace

from gfvm.config import NodePaths, cgroup_node_group, cgroup_roots
from gfvm.control import ControlServer

HERE = Path(__file__).resolve().parent
PAGE = 4096


def build_workload(directory: Path) -> Path:
    """Compiles gfvm/pager/workload.c into `directory` (blocking, ~0.3 s)."""
    from gfvm.pager.workload import build

    return build(directory)


class Workload:
    """The test side of one pager_workload process: a listening socket and its connections."""

    def __init__(self, binary: Path, directory: Path, npages: int) -> None:
        self.binary = binary
        self.npages = npages
        self.sock_path = directory / f"wl{os.getpid()}-{time.monotonic_ns()}.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.sock_path))
        self.listener.listen(8)
        self.listener.settimeout(30)
        self.conns: list = []

    def argv(self) -> list[str]:
        return [str(self.binary), str(self.sock_path), str(self.npages)]

    def accept(self) -> Conn:
        conn, _ = self.listener.accept()
        c = Conn(conn)
        self.conns.append(c)
        return c

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.listener.close()
        try:
            self.sock_path.unlink()
        except FileNotFoundError:
            pass


class Conn:
    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(120)
        self.sock = sock
        self.f = sock.makefile("rw")
        info = self.cmd("pid").split()
        self.pid, self.region, self.npages = int(info[1]), int(info[2], 16), int(info[3])

    def cmd(self, line: str) -> str:
        """Sends one command and returns the answer; AssertionError if it is not "ok ..."."""
        self.f.write(line + "\n")
        self.f.flush()
        answer = self.f.readline().strip()
        assert answer.startswith("ok"), f"workload answered {answer!r} to {line!r}"
        return answer

    def send(self, line: str) -> None:
        self.f.write(line + "\n")
        self.f.flush()

    def close(self) -> None:
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass


def make_pager(tmp: Path, *, node: str | None = None, settings=None):
    """A Pager over directories in `tmp` (its own run dir, keeper, local backing), opened."""
    from gfvm.pager.service import Pager

    node = node or f"t{os.getpid()}x{time.monotonic_ns() % 100000}"
    paths = NodePaths(etc=tmp / "etc", state=tmp / "state", run=tmp / "run", mount=tmp / "mnt")
    daemon = SimpleNamespace(paths=paths, node_name=node, config=None, control=ControlServer())
    pager = Pager(daemon, settings=settings)
    pager.open_blocking()
    return pager


def close_pager(pager, *, kill_trees: bool = True) -> None:
    """Kills the trees the pager manages (when asked), closes it, ends its keeper, removes
    its cgroups."""
    trees = list(pager.trees.values())
    if kill_trees:
        for tree in trees:
            pager.kill_tree(tree.rec)
    keeper_pid = None
    try:
        keeper_pid = pager._keeper_call("ping")["pid"]
    except Exception:  # noqa: BLE001 - best effort
        pass
    pager.close_blocking()
    for popen in pager._launched.values():
        popen.kill()
        popen.wait()
    if keeper_pid:
        try:
            os.kill(keeper_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    remove_node_cgroups(pager.cluster, pager.node)


def remove_node_cgroups(cluster: str, node: str) -> None:
    for root in cgroup_roots():
        group = root / "gfvm" / cgroup_node_group(cluster, node)
        if not group.is_dir():
            continue
        for d in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _rmdir_killing(d)
        _rmdir_killing(group)


def _rmdir_killing(d: Path) -> None:
    deadline = time.monotonic() + 5
    while True:
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            kill = d / "cgroup.kill"
            if kill.exists():
                kill.write_text("1")
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def check_file_matches_memory(tree, *, stopped: bool = True) -> int:
    """For every tracked process of the tree: every present page of its tracked VMAs is either in
    the paging file with exactly the bytes in memory, or not in the file and all zeros; and every
    page in the file that is present equals memory. Call with the tree frozen. Returns the number
    of pages checked."""
    from gfvm import native
    from gfvm.pager.pagefile import page_crc

    def work():
        checked = 0
        zero = bytes(PAGE)
        for space in list(tree.spaces.values()):
            if not space.resolved:
                continue
            present = set()
            for r in native.scan_present(space.pagemap_fd, 0, 0x7FFFFFFFF000):
                present.update(range(r.start >> 12, r.end >> 12))
            tracked = sorted(space.registered)
            pages = sorted(v for v in present if any(b >> 12 <= v < e >> 12 for b, e in tracked))
            buf = bytearray(PAGE * max(1, len(pages)))
            got = native.read_pages(space.host_pid, [v << 12 for v in pages], buf)
            assert got == len(pages) * PAGE, f"could read only {got} bytes of {len(pages)} pages"
            entries = tree.pf.index.entries(space.asid)
            for i, v in enumerate(pages):
                mem = bytes(buf[i * PAGE : (i + 1) * PAGE])
                if v in entries:
                    filed = tree.pf.read_page(space.asid, v)
                    assert filed == mem, (
                        f"asid {space.asid} page {v << 12:#x}: file and memory "
                        f"differ (crc {page_crc(filed):#x} vs {page_crc(mem):#x})"
                    )
                else:
                    assert (
                        mem == zero
                    ), f"asid {space.asid} page {v << 12:#x}: written but not in the file"
                checked += 1
        return checked

    return tree.call(work)
