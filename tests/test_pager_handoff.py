"""The migration hand-off API on one node, without CRIU: freeze, flush_all, release_memory, then
either roll back (reattach) or hand over and take the same processes back as a "target" would
(adopt_restored): the workload's memory comes back from the paging file."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conftest import require_root
from pager_support import Workload, build_workload, close_pager, make_pager
from gfvm.pager import procfs
from gfvm.pager.cgroup import TreeCgroup


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


def _start(pager, workload_bin, tmp_path):
    wl = Workload(workload_bin, tmp_path, 4096)
    summary = pager.run_blocking(wl.argv(), "handoff", None)
    conn = wl.accept()
    conn.cmd("fill 0 4096 1")
    conn.cmd("random 1000 2 3")
    tree = pager.tree(summary["id"])
    return wl, conn, tree, summary


def test_release_then_rollback(pager, workload_bin, tmp_path):
    wl, conn, tree, summary = _start(pager, workload_bin, tmp_path)
    cg = TreeCgroup(tuple(Path(p) for p in tree.rec.cgroup))
    try:
        cg.freeze()
        pager.flush_all(summary["id"])
        rss_before = procfs.rss_bytes(summary["pid"])
        dropped = pager.release_memory(summary["id"])
        assert dropped >= 4096
        assert procfs.rss_bytes(summary["pid"]) < rss_before - 4096 * 4096 // 2
        pager.reattach(summary["id"])
        cg.thaw()
        assert conn.cmd("verify") == "ok 4096"
        conn.cmd("random 500 3 4")
        assert conn.cmd("verify") == "ok 4096"
    finally:
        cg.thaw()
        wl.close()


def test_hand_over_and_adopt_restored(pager, workload_bin, tmp_path):
    wl, conn, tree, summary = _start(pager, workload_bin, tmp_path)
    gfvm_id, pid = summary["id"], summary["pid"]
    cg = TreeCgroup(tuple(Path(p) for p in tree.rec.cgroup))
    try:
        cg.freeze()
        pager.flush_all(gfvm_id)
        pager.release_memory(gfvm_id)
        paging_dir = pager.hand_over(gfvm_id)
        assert gfvm_id not in pager.trees
        assert pager.backing.exists(f"{paging_dir}/index")
        # the "target" (here the same node) takes the frozen processes and their paging file
        pager.adopt_restored(
            gfvm_id, name="handoff", cmd=tree.rec.cmd, init_pid=tree.rec.init_pid, host_pids=[pid]
        )
        cg.thaw()
        assert conn.cmd("verify") == "ok 4096"
        new_tree = pager.tree(gfvm_id)
        assert (
            new_tree.snapshot()["pages_faulted_in"] > 0 or new_tree.loop.counters().pages_copied > 0
        )
        conn.cmd("random 500 5 6")
        assert conn.cmd("verify") == "ok 4096"
    finally:
        cg.thaw()
        wl.close()


def test_paging_file_source_gives_the_pages_at_the_dump(pager, workload_bin, tmp_path):
    """What the migration target reads: after flush_all with the tree frozen, the source's pages
    for the task's inner pid equal its memory."""
    from gfvm import native
    from gfvm.pager.source import PagingFileSource

    wl, conn, tree, summary = _start(pager, workload_bin, tmp_path)
    cg = TreeCgroup(tuple(Path(p) for p in tree.rec.cgroup))
    try:
        cg.freeze()
        pager.flush_all(summary["id"])
        src = PagingFileSource(pager.backing, tree.rec.paging_dir)
        try:
            assert 2 in src.asids()
            region = conn.region
            buf = bytearray(4096 * 16)
            native.read_pages(summary["pid"], [region + i * 4096 for i in range(16)], buf)
            assert src.lookup_run(2, region, 16) == bytes(buf)
            assert any(a <= region < b for a, b in src.ranges(2))
            assert src.lookup(2, 0x1000) is None
            (source,) = src.native_sources(2)
            assert source.index.get(region) is not None
        finally:
            src.close()
    finally:
        cg.thaw()
        wl.close()


def _paging_files(pager, paging_dir: str) -> dict[str, bytes]:
    return {name: pager.backing.path(f"{paging_dir}/{name}").read_bytes()
            for name in ("index", "pages")}


def _hand_over_frozen(pager, workload_bin, tmp_path):
    """A workload frozen, flushed, released and handed over, as a migration source leaves it."""
    wl, conn, tree, summary = _start(pager, workload_bin, tmp_path)
    cg = TreeCgroup(tuple(Path(p) for p in tree.rec.cgroup))
    cg.freeze()
    pager.flush_all(summary["id"])
    pager.release_memory(summary["id"])
    paging_dir = pager.hand_over(summary["id"])
    return wl, conn, tree, summary, cg, paging_dir


def test_held_adoption_writes_nothing_until_released(pager, workload_bin, tmp_path):
    """A migration target's tree before its commit point: several ticks, then an abandon (its
    final commit included) leave the paging file exactly as the source wrote it."""
    wl, conn, tree, summary, cg, paging_dir = _hand_over_frozen(pager, workload_bin, tmp_path)
    try:
        before = _paging_files(pager, paging_dir)
        pager.adopt_restored(
            summary["id"], name="handoff", cmd=tree.rec.cmd, init_pid=tree.rec.init_pid,
            host_pids=[summary["pid"]], hold=True,
        )
        time.sleep(6 * pager.settings.interval + 0.5)  # probe, page-out, commit would have run
        assert _paging_files(pager, paging_dir) == before
        pager.abandon(summary["id"])
        assert _paging_files(pager, paging_dir) == before
    finally:
        cg.thaw()
        wl.close()


def test_released_adoption_pages_out_and_keeps_memory(pager, workload_bin, tmp_path):
    """After `release_adopted` (the commit point) the tree writes its paging file again: the
    pages present since the adoption go out, and the memory is intact."""
    wl, conn, tree, summary, cg, paging_dir = _hand_over_frozen(pager, workload_bin, tmp_path)
    gfvm_id = summary["id"]
    try:
        before = _paging_files(pager, paging_dir)
        pager.adopt_restored(
            gfvm_id, name="handoff", cmd=tree.rec.cmd, init_pid=tree.rec.init_pid,
            host_pids=[summary["pid"]], hold=True,
        )
        pager.release_adopted(gfvm_id)
        cg.thaw()
        assert conn.cmd("verify") == "ok 4096"
        conn.cmd("random 500 7 8")
        pager.flush_all(gfvm_id)
        assert _paging_files(pager, paging_dir)["index"] != before["index"]
        assert conn.cmd("verify") == "ok 4096"
    finally:
        cg.thaw()
        wl.close()


def test_rollback_reads_the_copy_the_files_are_now(pager, workload_bin, tmp_path):
    """While another node was the files' master, this node's copy of `pages` was replaced (a
    new file with the same bytes; the old one emptied, as a resync resets a copy): after the
    rollback the released pages come from the new copy, not from the descriptor opened before."""
    wl, conn, tree, summary = _start(pager, workload_bin, tmp_path)
    gfvm_id = summary["id"]
    cg = TreeCgroup(tuple(Path(p) for p in tree.rec.cgroup))
    try:
        cg.freeze()
        pager.flush_all(gfvm_id)
        assert pager.release_memory(gfvm_id) >= 4096
        pages = pager.backing.path(f"{tree.rec.paging_dir}/pages")
        old = pages.with_name("pages.old")
        os.rename(pages, old)
        pages.write_bytes(old.read_bytes())
        os.truncate(old, 0)
        pager.reattach(gfvm_id)
        cg.thaw()
        assert conn.cmd("verify") == "ok 4096"
        assert pager.tree(gfvm_id).state == "running"
    finally:
        cg.thaw()
        wl.close()


def test_rollback_drops_index_records_it_did_not_write(pager, workload_bin, tmp_path):
    """Records another node appended to the index while it was the master (it never
    committed the migration) are gone after the rollback: the index is this node's again."""
    from gfvm.pager.pagefile import _pack_record, DROP, load_index

    wl, conn, tree, summary = _start(pager, workload_bin, tmp_path)
    gfvm_id = summary["id"]
    cg = TreeCgroup(tuple(Path(p) for p in tree.rec.cgroup))
    try:
        cg.freeze()
        pager.flush_all(gfvm_id)
        pager.release_memory(gfvm_id)
        index = pager.backing.path(f"{tree.rec.paging_dir}/index")
        entries = load_index(pager.backing, tree.rec.paging_dir).entries(2)
        region = conn.region >> 12
        with open(index, "ab") as f:  # a DROP of the workload's whole region
            f.write(_pack_record(DROP, 2, region, 4096))
        pager.reattach(gfvm_id)
        assert load_index(pager.backing, tree.rec.paging_dir).entries(2) == entries
        cg.thaw()
        assert conn.cmd("verify") == "ok 4096"
    finally:
        cg.thaw()
        wl.close()


def test_rollback_refuses_a_copy_too_short_for_its_index(pager, workload_bin, tmp_path):
    """A local copy of `pages` cut short while another node was the master: the rollback
    fails (the tree is not served from it, nothing is thawed by the pager) instead of thawing a
    process whose faults would read past the end of the file."""
    from gfvm.pager.pagefile import PagingFileError

    wl, conn, tree, summary = _start(pager, workload_bin, tmp_path)
    gfvm_id = summary["id"]
    cg = TreeCgroup(tuple(Path(p) for p in tree.rec.cgroup))
    try:
        cg.freeze()
        pager.flush_all(gfvm_id)
        pager.release_memory(gfvm_id)
        pages = pager.backing.path(f"{tree.rec.paging_dir}/pages")
        os.truncate(pages, pages.stat().st_size // 2)
        with pytest.raises(PagingFileError, match="index uses slots"):
            pager.reattach(gfvm_id)
        assert pager.tree(gfvm_id).state == "released"
    finally:
        cg.kill_all()
        cg.thaw()
        wl.close()
