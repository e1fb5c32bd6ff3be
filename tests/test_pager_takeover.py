"""A new Pager (a restarted gfvmd) takes trees back from the keeper, including a forked child the
previous one had not identified yet. gfvmd-level kill -9 tests are in test_pager_daemon.py."""

from __future__ import annotations

import pytest

from conftest import require_root
from pager_support import Workload, build_workload, close_pager, make_pager, wait_for


@pytest.fixture(scope="module")
def workload_bin(tmp_path_factory):
    require_root()
    return build_workload(tmp_path_factory.mktemp("wl"))


def test_unidentified_fork_child_is_taken_back(workload_bin, tmp_path):
    require_root()
    node = f"tk{tmp_path.name[-6:]}"
    first = make_pager(tmp_path, node=node)
    second = None
    wl = Workload(workload_bin, tmp_path, 512)
    try:
        summary = first.run_blocking(wl.argv(), "tk", None)
        conn = wl.accept()
        conn.cmd("fill 0 512 2")
        tree = first.tree(summary["id"])
        tree._resolve_forks = lambda: None  # this gfvmd "dies" before it identifies the child
        conn.cmd("forkstay")
        child = wl.accept()
        wait_for(lambda: tree.pending_forks, what="the fork event")
        first.close_blocking()  # trees stop being served; the keeper keeps every uffd
        second = make_pager(tmp_path, node=node)
        tree2 = second.tree(summary["id"])
        wait_for(lambda: 3 in tree2.spaces and tree2.spaces[3].resolved, what="the child")
        child.cmd("random 100 4 4")
        assert child.cmd("verify") == "ok 512" and conn.cmd("verify") == "ok 512"
        assert tree2.call(tree2.flush_all).pages > 0
        assert len(tree2.pf.index.entries(3)) >= 512
    finally:
        wl.close()
        close_pager(second or first)
