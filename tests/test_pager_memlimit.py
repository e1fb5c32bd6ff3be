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
        wait_for(lambda: tree.snapshot()["rss"] <= limit, timeout=30, what="RSS under the limit")
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
