"""--mem-limit: the pager keeps RSS under the limit by evicting clean pages, which come back on
fault from the paging file (served by the native fault loop); the workload's memory stays right."""

from __future__ import annotations

import pytest

from conftest import require_root
from pager_support import Workload, build_workload, close_pager, make_pager, wait_for

MiB = 1 << 20


@pytest.fixture(scope="module")
def workload_bin(tmp_path_factory):
    require_root()
    return build_workload(tmp_path_factory.mktemp("wl"))


@pytest.fixture
def pager(tmp_path):
    require_root()
    p = make_pager(tmp_path)
    yield p
    close_pager(p)


def test_rss_stays_under_limit_and_data_comes_back(pager, workload_bin, tmp_path):
    limit = 16 * MiB
    wl = Workload(workload_bin, tmp_path, 8192)  # 32 MiB region
    try:
        summary = pager.run_blocking(wl.argv(), "memlimit", limit)
        conn = wl.accept()
        tree = pager.tree(summary["id"])
        conn.cmd("fill 0 8192 1")
        # (RSS alone is not enough to wait for: it reads 0 until the pager has published the
        # tree's processes, which may come after the fill)
        wait_for(lambda: (s := tree.snapshot())["pages_evicted"] > 0 and s["rss"] <= limit,
                 timeout=30, what="RSS under the limit by eviction")
        assert tree.snapshot()["pages_evicted"] > 0
        for gen in (2, 3):
            # every page read back (half of them from the paging file), half rewritten
            assert conn.cmd("verify") == "ok 8192"
            conn.cmd(f"random 3000 {gen} {gen}")
            wait_for(
                lambda: tree.snapshot()["rss"] <= limit, timeout=30, what="RSS under the limit"
            )
        assert conn.cmd("verify") == "ok 8192"
        snap = tree.snapshot()
        assert snap["pages_faulted_in"] > 0
        assert snap["last_error"] is None, snap["last_error"]
    finally:
        wl.close()


def test_forked_child_is_evicted_under_the_limit_too(pager, workload_bin, tmp_path):
    """The fault loop serves a forked child from clones of its parent's C index; through
    FaultLoop.sources() the pager updates that clone after the child's flushes and evicts the
    child's pages with it, so a child alone bigger than the limit is kept under it too."""
    from gfvm.pager import procfs

    limit = 8 * MiB
    wl = Workload(workload_bin, tmp_path, 4096)  # 16 MiB region
    try:
        summary = pager.run_blocking(wl.argv(), "memlimit-fork", limit)
        conn = wl.accept()
        tree = pager.tree(summary["id"])
        conn.cmd("fill 0 4096 1")
        conn.cmd("forkstay")
        child = wl.accept()
        wait_for(
            lambda: child.pid in tree.spaces and tree.spaces[child.pid].resolved,
            what="the child to be tracked",
        )
        child_host_pid = tree.spaces[child.pid].host_pid
        child.cmd("fill 0 4096 2")  # the child's own copy of every page: 16 MiB > the limit
        wait_for(lambda: tree.snapshot()["rss"] <= limit, timeout=30, what="RSS under the limit")
        assert procfs.rss_bytes(child_host_pid) < limit  # the child's pages went out too
        assert child.cmd("verify") == "ok 4096"  # and come back from the paging file
        assert conn.cmd("verify") == "ok 4096"
        assert tree.snapshot()["last_error"] is None
    finally:
        wl.close()
