"""Dirty tracking and page-out on real processes with a real uffd (Pager without gfvmd).

Each test runs the C workload (tests/pager_workload.c) as a managed tree, makes it write known
patterns, freezes the tree, calls flush_all and checks that every written page in the paging file
equals the process's memory (and that the workload still verifies its own memory).
"""

from __future__ import annotations

import contextlib
import os
import time

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


pytest_plugins = ["native_fixtures"]  # early_binary


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


def test_page_written_between_scan_and_protection_walk_is_paged_out(workload_bin, tmp_path):
    """A protection walk covers the gaps between the pages it was asked to protect, so it also
    protects a page of a gap written after the tick's scan: that page must become dirty and
    reach the paging file. The tick is run step by step on the worker (automatic ticks are an
    hour apart) with the write in the middle."""
    from gfvm.pager.tracker import PagerSettings

    pager = make_pager(tmp_path, settings=PagerSettings(interval=3600))
    try:
        wl, conn, tree, _ = start(pager, workload_bin, tmp_path, npages=256)
        try:
            conn.cmd("fill 0 256 1")
            for _ in range(3):  # seen dirty, probed, then cold: everything paged out
                tree.call(tree.run_tick)
            assert tree.dirty_pages() == 0
            conn.cmd("fill 10 1 2")
            conn.cmd("fill 12 1 2")

            def scan():
                tree.tick += 1
                tree.tick_times[tree.tick] = time.monotonic()
                space = tree.spaces[conn.pid]
                tree._scan(space)
                return space

            space = tree.call(scan)
            page = (conn.region >> 12) + 11
            assert page - 1 in space.hot and page not in space.hot
            conn.cmd("fill 11 1 3")  # after the scan, between two pages about to be probed

            def protect_and_flush():
                tree._flush_space(space, tree._flush_candidates(space))
                tree.pf.commit()

            tree.call(protect_and_flush)
            assert page in space.dirty
            _, checked = frozen_flush_and_check(pager, tree)
            assert checked >= 256
            assert conn.cmd("verify") == "ok 256"
        finally:
            wl.close()
    finally:
        close_pager(pager)


@contextlib.contextmanager
def _hot_then_paused(workload_bin, tmp_path, npages):
    """A pager and a tree whose `npages` pages were hot until the hot bound forced them out, then
    left alone for two ticks: yields (pager, conn, tree), closes them after. Ticks are run by hand
    (automatic ones are hours apart; bound = 3 ticks)."""
    from gfvm.pager.tracker import PagerSettings

    pager = make_pager(tmp_path, settings=PagerSettings(interval=3600, hot_bound=3 * 3600))
    try:
        wl, conn, tree, _ = start(pager, workload_bin, tmp_path, npages=npages)
        try:
            conn.cmd(f"fill 0 {npages} 1")
            tree.call(tree.run_tick)  # seen dirty, probed
            for gen in (2, 3, 4):  # written again at every tick: hot, then forced out at the bound
                conn.cmd(f"fill 0 {npages} {gen}")
                tree.call(tree.run_tick)
            tree.call(tree.run_tick)
            tree.call(tree.run_tick)  # a pause
            assert tree.dirty_pages() < 64  # (the workload's own stack and libc pages)
            yield pager, conn, tree
        finally:
            wl.close()
    finally:
        close_pager(pager)


def test_writer_resuming_after_a_pause_pays_probe_faults_for_a_sample(workload_bin, tmp_path):
    """Recently hot pages written again after a pause: only a sample of them is protected (each
    protection costs the process a write fault); still hot, the others are presumed hot."""
    npages = 4096
    with _hot_then_paused(workload_bin, tmp_path, npages) as (pager, conn, tree):
        before = tree.counters.protections
        conn.cmd(f"fill 0 {npages} 5")  # resumes
        tree.call(tree.run_tick)
        conn.cmd(f"fill 0 {npages} 6")  # the sample was written again: hot
        tree.call(tree.run_tick)
        protected = tree.counters.protections - before
        assert protected < npages // 8, f"{protected} protections for {npages} pages"
        assert tree.dirty_pages() >= npages  # presumed hot: out at the bound, not lost
        _, checked = frozen_flush_and_check(pager, tree)
        assert checked >= npages
        assert conn.cmd("verify") == f"ok {npages}"


def test_recently_hot_pages_gone_cold_are_still_paged_out_a_tick_later(workload_bin, tmp_path):
    """Recently hot pages written once after a pause and then left alone: the sample shows them
    cold, so the pages that waited on it are probed, and everything is paged out."""
    npages = 4096
    with _hot_then_paused(workload_bin, tmp_path, npages) as (pager, conn, tree):
        conn.cmd(f"fill 0 {npages} 5")  # written once
        for _ in range(3):  # sample probed; sample cold, the others probed; those cold
            tree.call(tree.run_tick)
        assert tree.dirty_pages() < 64
        _, checked = frozen_flush_and_check(pager, tree)
        assert checked >= npages
        assert conn.cmd("verify") == f"ok {npages}"


def test_threads_writing_in_parallel(pager, workload_bin, tmp_path):
    wl, conn, tree, _ = start(pager, workload_bin, tmp_path, npages=4096)
    try:
        conn.cmd("threads 4 20")
        assert conn.cmd("verify") == "ok 4096"
        frozen_flush_and_check(pager, tree)
    finally:
        wl.close()


def test_large_heap(pager, workload_bin, tmp_path):
    wl, conn, tree, _ = start(pager, workload_bin, tmp_path, npages=16)
    try:
        conn.cmd("heap 64 9")  # 64 MiB of malloc'd memory: a new anonymous mapping
        result, checked = frozen_flush_and_check(pager, tree)
        assert checked >= 64 * 256
        assert conn.cmd("verify").startswith("ok")
    finally:
        wl.close()


def test_dontneed_munmap_mremap_keep_index_right(pager, workload_bin, tmp_path):
    wl, conn, tree, _ = start(pager, workload_bin, tmp_path, npages=1024)
    try:
        conn.cmd("fill 0 1024 1")
        frozen_flush_and_check(pager, tree)
        asid = 2
        region = conn.region >> 12
        assert all(region + i in tree.pf.index.entries(asid) for i in range(1024))
        conn.cmd("dontneed 0 100")  # these read zeros now: the file must not serve old data
        conn.cmd("munmap 900 124")
        frozen_flush_and_check(pager, tree)
        entries = tree.pf.index.entries(asid)
        assert not any(region + i in entries for i in range(100))
        assert not any(region + i in entries for i in range(900, 1024))
        moved = int(conn.cmd("mremap 900").split()[1], 16) >> 12
        frozen_flush_and_check(pager, tree)
        entries = tree.pf.index.entries(asid)
        assert all(moved + i in entries for i in range(100, 900))
        assert not any(region + i in entries for i in range(100, 900))
        assert conn.cmd("verify") == "ok 900"
        conn.cmd("fill 0 50 4")  # after DONTNEED: fresh pages, written again
        frozen_flush_and_check(pager, tree)
        assert conn.cmd("verify") == "ok 900"
    finally:
        wl.close()


def test_fork_child_gets_its_own_address_space(pager, workload_bin, tmp_path):
    wl, conn, tree, _ = start(pager, workload_bin, tmp_path, npages=512)
    try:
        conn.cmd("fill 0 512 3")
        frozen_flush_and_check(pager, tree)
        child_pid = int(conn.cmd("forkstay").split()[1])
        child = wl.accept()
        assert child.pid == child_pid == 3  # inner pids
        wait_for(
            lambda: 3 in tree.spaces and tree.spaces[3].resolved, what="the child to be tracked"
        )
        child.cmd("random 200 8 1")
        conn.cmd("random 200 9 2")
        result, checked = frozen_flush_and_check(pager, tree)
        # both processes have their own pages in the file
        assert len(tree.pf.index.entries(3)) >= 512 and len(tree.pf.index.entries(2)) >= 512
        assert child.cmd("verify") == "ok 512" and conn.cmd("verify") == "ok 512"
        child.send("exit 0")
        wait_for(lambda: 3 not in tree.spaces, what="the child to be forgotten")
        assert not tree.pf.index.entries(3)
        assert conn.cmd("fork") == "ok 0"  # a short-lived child verifies its copy and exits
        frozen_flush_and_check(pager, tree)
    finally:
        wl.close()


def test_status_lists_a_forked_child_before_the_next_tick(workload_bin, tmp_path):
    """`gfvm status` (the published snapshot) lists a child as soon as the pager has identified
    it, not at the next tick: right after `gfvm run` the command itself is such a child (of
    tini), and its RSS read 0 until then. Ticks here are an hour apart, and nothing is asked of
    the tree's worker (each request also publishes)."""
    from gfvm.pager.tracker import PagerSettings

    pager = make_pager(tmp_path, settings=PagerSettings(interval=3600))
    try:
        wl, conn, tree, _ = start(pager, workload_bin, tmp_path, npages=64)
        try:
            conn.cmd("fill 0 64 1")
            assert int(conn.cmd("forkstay").split()[1]) == 3
            child = wl.accept()

            def child_listed():
                space = tree.spaces.get(3)
                if space is None or not space.resolved:
                    return False
                snap = tree.snapshot()
                return space.host_pid in snap["pids"] and snap["rss"] > 0

            wait_for(child_listed, 10, what="the forked child in the published snapshot")
            child.send("exit 0")
        finally:
            wl.close()
    finally:
        close_pager(pager)


def test_exec_is_tracked_again(pager, workload_bin, tmp_path):
    wl, conn, tree, summary = start(pager, workload_bin, tmp_path, npages=256)
    try:
        conn.cmd("fill 0 256 2")
        frozen_flush_and_check(pager, tree)
        old_entries = len(tree.pf.index.entries(2))
        assert old_entries >= 256
        # exec the workload again: new address space, same pid; it connects anew
        conn.send(f"exec {workload_bin} {wl.sock_path} 128")
        conn2 = wl.accept()
        assert conn2.pid == 2
        wait_for(
            lambda: 2 in tree.spaces and len(tree.pf.index.entries(2)) < old_entries,
            what="the old address space to be forgotten",
        )
        conn2.cmd("fill 0 128 6")
        frozen_flush_and_check(pager, tree)
        assert conn2.cmd("verify") == "ok 128"
    finally:
        wl.close()


def test_run_attaches_before_the_first_instruction(pager, early_binary):
    """tests/native_early.c writes a marker into a page in its first instructions and then
    forbids userfaultfd() (seccomp): `gfvm run` must have made its uffd at the exec stop (a later
    injection fails with EPERM), and the page written first is tracked and paged out."""
    from pathlib import Path

    summary = pager.run_blocking([str(early_binary)], "early", None)
    tree = pager.tree(summary["id"])
    log = Path(tree.rec.log_path)
    wait_for(lambda: b"early " in log.read_bytes(), what="the program's first line")
    first = int(log.read_bytes().split()[1], 16)
    marker = (0x6766766D65617231).to_bytes(8, "little")

    def paged_out() -> bool:
        page = tree.call(lambda: tree.pf.read_page(2, first >> 12))
        return page is not None and page[:8] == marker

    wait_for(paged_out, what="the first page written to be paged out")
    assert tree.snapshot()["last_error"] is None


def test_corrupt_page_in_the_paging_file_is_never_served(pager, workload_bin, tmp_path):
    """A page whose slot is corrupted on disk after it was evicted: the fault loop checks the
    CRC-32 the pager gave it, poisons the page instead of serving it (the workload gets SIGBUS
    and never reports wrong bytes) and the pager learns which page and slot (fail-stop)."""
    wl, conn, tree, _ = start(pager, workload_bin, tmp_path, npages=256)
    try:
        conn.cmd("fill 0 256 2")
        frozen_flush_and_check(pager, tree)
        assert tree.call(tree.evict) >= 256
        vpage = (conn.region >> 12) + 100
        slot, _crc = tree.pf.index.lookup(2, vpage)
        with open(pager.backing.path(f"{tree.rec.paging_dir}/pages"), "r+b") as f:
            f.seek(slot * 4096 + 8)
            byte = f.read(1)
            f.seek(slot * 4096 + 8)
            f.write(bytes([byte[0] ^ 1]))
        conn.send("verify")
        assert conn.f.readline() == ""  # died (SIGBUS / fail-stop), never "bad 100 ..."
        wait_for(lambda: "fails its checksum" in (tree.last_error or ""), what="the error")
        assert f"page {vpage << 12:#x}" in tree.last_error and f"slot {slot}" in tree.last_error
    finally:
        wl.close()


def test_run_of_a_missing_command_says_why(pager):
    from gfvm.errors import GfvmError

    with pytest.raises(GfvmError, match="exited at once") as info:
        pager.run_blocking(["/nonexistent/program"], None, None)
    assert "not found" in str(info.value)
    assert not pager.trees
    procs = pager.backing.path("procs")
    assert not procs.exists() or not list(procs.iterdir())  # nothing left behind
