"""Dirty tracking and page-out on real processes with a real uffd (Pager without gfvmd).

Each test runs the C workload (tests/pager_workload.c) as a managed tree, makes it write known
patterns, freezes the tree, calls flush_all and checks that every written page in the paging file
equals the process's memory (and that the workload still verifies its own memory).
"""

from __future__ import annotations

import os

import pytest

from conftest import require, require_root
from pager_support import (
    Workload,
    build_workload,
    check_file_matches_memory,
    close_pager,
    make_pager,
    wait_for,
)


@pytest.fixture(scope="module")
def workload_bin(tmp_path_factory):
    require_root()
    require(os.path.exists("/dev/userfaultfd") or True, "userfaultfd")
    return build_workload(tmp_path_factory.mktemp("wl"))


@pytest.fixture
def pager(tmp_path):
    require_root()
    p = make_pager(tmp_path)
    yield p
    close_pager(p)


def start(pager, workload_bin, tmp_path, npages=1024, **kw):
    wl = Workload(workload_bin, tmp_path, npages)
    summary = pager.run_blocking(wl.argv(), kw.get("name"), kw.get("mem_limit"))
    conn = wl.accept()
    tree = pager.tree(summary["id"])
    return wl, conn, tree, summary


def frozen_flush_and_check(pager, tree):
    from gfvm.pager.cgroup import TreeCgroup
    from pathlib import Path

    cg = TreeCgroup(tuple(Path(p) for p in tree.rec.cgroup))
    cg.freeze()
    try:
        result = pager.flush_all(tree.rec.id)
        checked = check_file_matches_memory(tree)
    finally:
        cg.thaw()
    return result, checked


def test_run_reports_pids_inside_own_pid_namespace(pager, workload_bin, tmp_path):
    wl, conn, tree, summary = start(pager, workload_bin, tmp_path, npages=16)
    try:
        assert summary["inner_pid"] == 2
        assert conn.pid == 2  # getpid() inside the namespace
        assert summary["pid"] != 2 and os.path.exists(f"/proc/{summary['pid']}")
        with open(f"/proc/{summary['init_pid']}/comm") as f:
            assert f.read().strip().startswith("tini")
    finally:
        wl.close()


def test_random_writes_are_paged_out_exactly(pager, workload_bin, tmp_path):
    wl, conn, tree, _ = start(pager, workload_bin, tmp_path, npages=2048)
    try:
        conn.cmd("fill 0 2048 1")
        conn.cmd("random 500 2 7")
        result, checked = frozen_flush_and_check(pager, tree)
        assert checked >= 2048
        assert tree.pf.index.live_entries() >= 2048
        conn.cmd("random 300 3 8")
        conn.cmd("verify")
        result, checked = frozen_flush_and_check(pager, tree)
        assert 0 < result.pages < 2048 + 200  # only what was dirtied since (plus libc's pages)
        assert conn.cmd("verify") == "ok 2048"
    finally:
        wl.close()


def test_background_flush_pages_out_cold_pages(pager, workload_bin, tmp_path):
    wl, conn, tree, _ = start(pager, workload_bin, tmp_path, npages=1024)
    try:
        conn.cmd("fill 0 1024 5")
        wait_for(lambda: tree.snapshot()["pages_in_file"] >= 1024, what="background page-out")
        wait_for(lambda: tree.snapshot()["dirty_pages"] < 16, what="dirty set to drain")
        result, _ = frozen_flush_and_check(pager, tree)
        assert result.pages < 64  # almost everything was already out
    finally:
        wl.close()
