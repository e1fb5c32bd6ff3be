"""`criu restore --lazy-pages` served by gfvm's lazy-pages server (gfvm.migrate.lazypages), with
real CRIU on a namespace cluster: pages from CRIU's images, from a page source (released memory),
userfaultfd events after the restart, prefetch, and the keeper/successor hand-over when the
serving process dies."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from criu_support import (  # noqa: F401 (fixtures)
    cluster2,
    criu_env,
    make_workload,
    recv_line,
    servers,
    workload_bin,
)
from gfvm.migrate import criu
from gfvm.errors import Unavailable
from gfvm.migrate.images import PAGE_SIZE, PE_LAZY, PE_PRESENT
from gfvm.migrate.lazypages import LazyPagesServer, LazyRestoreFailed
from gfvm.migrate.pagesource import RegionFileSource
from gfvm.migrate.uffd_keeper import KeeperClient

MIB = 32
ENGINES = pytest.mark.parametrize("engine", ["native", "python"])


def on(cluster, node):
    return lambda argv: cluster.exec_argv(node, argv)


class InProcessServer:
    """A LazyPagesServer on a thread of this process, with a keeper; always cleaned up."""

    def __init__(self, images, work, **kwargs) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.keeper = KeeperClient.spawn(work / "keeper.socket")
        self.server = LazyPagesServer(images, work, keeper=self.keeper, **kwargs)
        self.server.listen()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException:
            pass  # kept in self.server.error

    def close(self) -> None:
        self.server.stop()
        self.thread.join(30)
        self.keeper.release()


@pytest.fixture
def inproc():
    made = []

    def factory(images, work, **kwargs) -> InProcessServer:
        s = InProcessServer(images, work, **kwargs)
        made.append(s)
        return s

    yield factory
    for s in made:
        s.close()


def lazy_restore(cluster, node, images, work, server: LazyPagesServer, w):
    restored = criu.restore_blocking(images, work_dir=work, require_manifest=False, lazy_pages=True,
                                     wrap=on(cluster, node))
    server.attach_root(restored.root_pid)
    w.moved_to(node, restored.root_pid)
    return restored


@ENGINES
def test_lazy_restore_served_from_images(cluster2, make_workload, inproc, tmp_path, engine):
    w = make_workload("n1", mib=MIB)
    images, work = tmp_path / "img", tmp_path / "work"
    criu.dump_blocking(w.root, images, wrap=on(cluster2, "n1"))
    s = inproc(images, work, engine=engine)
    lazy_restore(cluster2, "n2", images, work, s.server, w)
    assert w.cmd("verify") == f"ok {MIB * 256}"
    for command in ("child", "threads", "hot", "files", "pipe", "signal"):
        assert "ok" in w.cmd(command), command
    stats = s.server.statistics()
    assert stats["restore_finished"] and stats["engine"] == engine
    assert stats["pages_copied"] >= MIB * 256  # the whole region came through us
    # Once the tree is gone, the server and the keeper end by themselves.
    w.kill()
    s.thread.join(20)
    assert not s.thread.is_alive() and s.server.error is None
    assert s.keeper.proc.wait(20) == 0


@ENGINES
def test_released_region_served_from_page_source(cluster2, make_workload, inproc, tmp_path, engine):
    w = make_workload("n1", mib=MIB, child=False)
    addr, length = w.region()
    # The pager's job, simulated: copy the region to a "paging file", then release it.
    paging = tmp_path / "region.pages"
    paging.write_bytes(w.read_memory(2, addr, length))
    assert w.cmd("release") == "released"
    images, work = tmp_path / "img", tmp_path / "work"
    dumped = criu.dump_blocking(w.root, images, wrap=on(cluster2, "n1"))
    assert dumped.images_bytes < length // 8
    source = RegionFileSource(2, addr, paging)
    try:
        s = inproc(images, work, page_source=source, engine=engine)
        lazy_restore(cluster2, "n2", images, work, s.server, w)
        assert w.cmd("verify") == f"ok {MIB * 256}"
        stats = s.server.statistics()
        assert stats["pages_copied"] >= MIB * 256
        assert stats["pages_from_source"] == MIB * 256  # native: the loop's per-source counters
    finally:
        w.kill()
        source.close()


@ENGINES
def test_events_after_restart_never_give_stale_data(cluster2, make_workload, inproc, tmp_path, engine):
    w = make_workload("n1", mib=MIB, child=False)
    images, work = tmp_path / "img", tmp_path / "work"
    criu.dump_blocking(w.root, images, wrap=on(cluster2, "n1"))
    s = inproc(images, work, engine=engine)
    lazy_restore(cluster2, "n2", images, work, s.server, w)
    # fork: the child's faults come on a new uffd and must see the dumped contents.
    assert w.cmd("forkcheck") == "ok"
    # mremap of still-missing pages: their contents must follow them to the new address.
    assert w.cmd("remap").startswith("ok ")
    # MADV_DONTNEED of half the region: that half reads zeros from now on, never old data.
    assert w.cmd("discard") == "ok"
    assert w.cmd("verify") == f"ok {MIB * 256}"
    events = s.server.statistics()["events"]
    assert events.get("fork", 0) >= 1 and events.get("remap", 0) >= 1 and events.get("remove", 0) >= 1


@ENGINES
def test_prefetch_pushes_the_dumped_pages(cluster2, make_workload, inproc, tmp_path, engine):
    w = make_workload("n1", mib=MIB, child=False)
    images, work = tmp_path / "img", tmp_path / "work"
    criu.dump_blocking(w.root, images, wrap=on(cluster2, "n1"))
    s = inproc(images, work, engine=engine)
    lazy_restore(cluster2, "n2", images, work, s.server, w)
    time.sleep(0.2)  # let attach_root find the host pids
    s.server.prefetch()
    assert s.server.prefetched.wait(60)
    faults_before = s.server.statistics()["faults"]
    assert s.server.statistics()["pages_prefetched"] >= MIB * 256
    assert w.cmd("verify") == f"ok {MIB * 256}"
    # The region was already there: verifying it needed (almost) no faults.
    assert s.server.statistics()["faults"] - faults_before < 16


def test_restore_failure_is_reported_by_the_server(cluster2, make_workload, inproc, tmp_path):
    w = make_workload("n1", child=False)
    images, work = tmp_path / "img", tmp_path / "work"
    criu.dump_blocking(w.root, images, wrap=on(cluster2, "n1"), leave_running=True)
    s = inproc(images, work)
    with pytest.raises(criu.CriuError):  # the port is still taken by the original on n1
        criu.restore_blocking(images, work_dir=work, require_manifest=False, lazy_pages=True,
                              wrap=on(cluster2, "n1"))
    s.thread.join(20)
    assert isinstance(s.server.error, LazyRestoreFailed)
    assert w.cmd("verify").startswith("ok")


def _blocked(sock: socket.socket, seconds: float) -> bool:
    """True when no answer arrives within `seconds` (the workload is stuck in a page fault)."""
    sock.settimeout(seconds)
    try:
        sock.recv(1)
    except socket.timeout:
        return True
    return False  # an answer (or a hang-up) came: not blocked


@ENGINES
def test_killed_server_blocks_process_until_successor(cluster2, make_workload, servers, tmp_path, engine):
    w = make_workload("n1", mib=MIB, child=False)
    images, work = tmp_path / "img", tmp_path / "work"
    criu.dump_blocking(w.root, images, wrap=on(cluster2, "n1"))
    pidfile = work / "root.pid"
    first = servers(["serve", "--engine", engine, "--images", str(images), "--work-dir", str(work),
                     "--keeper-socket", str(work / "keeper.socket"), "--root-pidfile", str(pidfile)],
                    tmp_path / "server1.log")
    restored = criu.restore_blocking(images, work_dir=work, pidfile=pidfile, require_manifest=False,
                                     lazy_pages=True, wrap=on(cluster2, "n2"))
    w.moved_to("n2", restored.root_pid)
    assert w.cmd("ping") == "pong 2"
    os.kill(first.proc.pid, signal.SIGKILL)
    first.wait(10)
    with w.connect() as sock:
        sock.sendall(b"verify\n")
        # Nobody serves faults now: the workload must wait, not read zeros ("bad 0").
        assert _blocked(sock, 2.0)
        assert os.path.exists(f"/proc/{w.host_pid(2)}")
        successor = servers(["take-over", "--engine", engine, "--images", str(images), "--work-dir", str(work),
                             "--keeper-socket", str(work / "keeper.socket")], tmp_path / "server2.log")
        sock.settimeout(60)
        assert recv_line(sock) == f"ok {MIB * 256}"
    assert w.cmd("threads") == "ok 3"
    w.kill()
    assert successor.wait(30) == 0


def test_server_dying_with_a_fault_in_hand_successor_wakes_it(cluster2, make_workload, servers, tmp_path):
    w = make_workload("n1", mib=MIB, child=False)
    addr, length = w.region()
    images, work = tmp_path / "img", tmp_path / "work"
    criu.dump_blocking(w.root, images, wrap=on(cluster2, "n1"))
    pidfile = work / "root.pid"
    first = servers(["serve", "--images", str(images), "--work-dir", str(work),
                     "--keeper-socket", str(work / "keeper.socket"), "--root-pidfile", str(pidfile),
                     "--exit-on-fault-in", f"{addr}:{addr + length}"], tmp_path / "server1.log")
    restored = criu.restore_blocking(images, work_dir=work, pidfile=pidfile, require_manifest=False,
                                     lazy_pages=True, wrap=on(cluster2, "n2"))
    w.moved_to("n2", restored.root_pid)
    with w.connect() as sock:
        sock.sendall(b"verify\n")
        assert first.wait(30) == 70  # it read the region's first fault and died without serving it
        assert _blocked(sock, 1.0)
        servers(["take-over", "--images", str(images), "--work-dir", str(work),
                 "--keeper-socket", str(work / "keeper.socket")], tmp_path / "server2.log")
        sock.settimeout(60)
        assert recv_line(sock) == f"ok {MIB * 256}"


def test_lazily_dumped_pages_nobody_holds_are_refused(tmp_path):
    """Pages listed by the images without their bytes (a `dump --lazy-pages`) must come from the
    page source; without one that holds them, the task is refused before it can read zeros."""
    from test_criu_images import make_task_dir

    base = 0x7F0000000000
    make_task_dir(tmp_path / "img", [(base, 4, PE_LAZY), (base + 8 * PAGE_SIZE, 1, PE_LAZY | PE_PRESENT)],
                  [(base, base + 16 * PAGE_SIZE)], b"p" * PAGE_SIZE)
    server = LazyPagesServer(tmp_path / "img", tmp_path / "work", engine="python")
    with pytest.raises(Unavailable, match="not in the images"):
        server._check_available(1)
    partial = tmp_path / "partial.pages"
    partial.write_bytes(b"s" * 2 * PAGE_SIZE)
    source = RegionFileSource(1, base, partial)
    server = LazyPagesServer(tmp_path / "img", tmp_path / "work", page_source=source)
    with pytest.raises(Unavailable, match=f"page {base + 2 * PAGE_SIZE:#x}"):
        server._check_available(1)
    source.close()
    full = tmp_path / "full.pages"
    full.write_bytes(b"s" * 4 * PAGE_SIZE)
    source = RegionFileSource(1, base, full)
    LazyPagesServer(tmp_path / "img", tmp_path / "work", page_source=source)._check_available(1)
    source.close()
