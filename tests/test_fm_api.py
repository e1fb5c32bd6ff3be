"""The same-node API (what the pager and migration call), on File Managers running inside the
test's own trio loop: one alone, and three talking mutual TLS on loopback (no FUSE here)."""

from __future__ import annotations

import itertools
import os
import threading
from contextlib import asynccontextmanager

import pytest
import trio

from conftest import claim_loopback_block
from gfvm import pki
from gfvm.config import ClusterConfig, NodePaths, NodeSpec
from gfvm.errors import NotFound, Unavailable, UsageError
from gfvm.fm.api import Files
from gfvm.fm.core import FileManager
from gfvm.fm.store import PAGE, CorruptData
from test_fm_harness import FAST

_k = itertools.count()


def _paths(root, name):
    base = root / name
    return NodePaths(etc=base / "etc", state=base / "state", run=base / "run", mount=base / "mnt")


@asynccontextmanager
async def single(tmp_path):
    fm = FileManager(_paths(tmp_path, "solo"), None)
    async with trio.open_nursery() as n:
        await n.start(fm.serve)
        yield Files(fm)
        n.cancel_scope.cancel()


@asynccontextmanager
async def trio_cluster(tmp_path, n_nodes=3, replicas=2, fm: dict | None = None):
    k, claim = claim_loopback_block("127.78", os.getpid() * 13 + next(_k))
    with claim:
        names = [f"n{i + 1}" for i in range(n_nodes)]
        addresses = [f"127.78.{k}.{i + 1}" for i in range(n_nodes)]
        config = ClusterConfig(name=f"a{k}", replicas=replicas,
                               nodes=tuple(NodeSpec(n, a, 7077) for n, a in zip(names, addresses)),
                               sections={"fm": {**FAST, **(fm or {})}})
        ca = pki.create_ca(tmp_path / "ca", config.name)
        fms = {}
        for name in names:
            paths = _paths(tmp_path, name)
            ca.issue(name).write(paths.tls_dir)
            fms[name] = FileManager(paths, config, name)
        async with trio.open_nursery() as n:
            for fm in fms.values():
                await n.start(fm.serve)
            with trio.fail_after(20):
                while not all(fm.lease_valid() and fm.consensus.leader for fm in fms.values()):
                    await trio.sleep(0.05)
            yield {name: Files(fm) for name, fm in fms.items()}
            n.cancel_scope.cancel()


async def test_open_create_write_pages_read_fsync(tmp_path):
    async with single(tmp_path) as files:
        await files.makedirs("procs/7")
        f = await files.open("procs/7/pages", create=True)
        pages = os.urandom(4 * PAGE)
        await f.write_pages([0, 10 * PAGE, 11 * PAGE, 300 * PAGE], pages)
        await f.fsync()
        assert await f.read(10 * PAGE, 2 * PAGE) == pages[PAGE : 3 * PAGE]
        assert await f.read(PAGE, PAGE) == bytes(PAGE)
        assert await f.size() == 301 * PAGE


async def test_batches_larger_than_a_frame(tmp_path):
    async with single(tmp_path) as files:
        f = await files.open("big", create=True)
        offsets = [i * 2 * PAGE for i in range(1000)]  # 1000 scattered pages: 4 frames
        data = os.urandom(1000 * PAGE)
        await f.write_pages(offsets, data)
        got = await f.read(0, 2000 * PAGE)
        assert all(got[o : o + PAGE] == data[i * PAGE : (i + 1) * PAGE] for i, o in enumerate(offsets))


async def test_local_fd_and_reader_give_the_written_pages(tmp_path):
    async with single(tmp_path) as files:
        f = await files.open("p", create=True)
        data = os.urandom(64 * PAGE)
        await f.write(0, data)
        fd = f.local_fd()
        try:
            assert os.pread(fd, PAGE, 5 * PAGE) == data[5 * PAGE : 6 * PAGE]
            with pytest.raises(OSError):
                os.pwrite(fd, b"x", 0)  # read-only
        finally:
            os.close(fd)
        reader = await f.local_reader()
        results = []

        def from_thread():
            results.append(all(reader.read_page(i) == data[i * PAGE : (i + 1) * PAGE] for i in range(64)))

        t = threading.Thread(target=from_thread)
        await trio.to_thread.run_sync(lambda: (t.start(), t.join()))
        reader.close()
        assert results == [True]


async def test_local_reader_refuses_a_damaged_page_and_a_dirty_hole(tmp_path):
    async with single(tmp_path) as files:
        f = await files.open("p", create=True)
        data = os.urandom(8 * PAGE)
        await f.write(0, data)
        await f.write(20 * PAGE, b"z" * PAGE)  # pages 8..19: holes
        with open(f.local_path(), "r+b") as raw:  # damage behind the File Manager's back
            raw.seek(3 * PAGE + 5)
            raw.write(bytes([data[3 * PAGE + 5] ^ 1]))
            raw.seek(10 * PAGE + 9)
            raw.write(b"!")
        reader = await f.local_reader()
        try:
            for slot in (3, 10):
                with pytest.raises(CorruptData) as info:
                    await trio.to_thread.run_sync(reader.read_page, slot)
                assert info.value.pages == [slot]
            assert await trio.to_thread.run_sync(reader.read_page, 2) == data[2 * PAGE : 3 * PAGE]
            assert await trio.to_thread.run_sync(reader.read_page, 11) == bytes(PAGE)
            assert await trio.to_thread.run_sync(reader.read_page, 21) == bytes(PAGE)  # past the end
        finally:
            reader.close()


async def test_open_errors(tmp_path):
    async with single(tmp_path) as files:
        with pytest.raises(NotFound):
            await files.open("missing")
        await files.makedirs("d")
        with pytest.raises(UsageError):
            await files.open("d")
        await files.open("d/x", create=True)
        with pytest.raises(UsageError):
            await files.open("d/x", create=True, exclusive=True)
        with pytest.raises(NotFound):
            await files.open("nodir/x", create=True)


async def test_write_on_one_node_read_on_another(tmp_path):
    async with trio_cluster(tmp_path) as nodes:
        f1 = await nodes["n1"].open("x", create=True)
        data = os.urandom(3 << 20)
        await f1.write(0, data)
        await f1.fsync()
        for name in ("n2", "n3"):
            f = await nodes[name].open("x")
            assert await f.read(0, len(data)) == data


async def test_in_sync_nodes_promote_and_local_fd_on_the_new_master(tmp_path):
    async with trio_cluster(tmp_path) as nodes:
        await nodes["n1"].makedirs("procs/9")
        f1 = await nodes["n1"].open("procs/9/pages", create=True)
        img = await nodes["n1"].open("procs/9/core.img", create=True)
        await f1.write_pages([0, PAGE], os.urandom(2 * PAGE))
        await img.write(0, b"image")
        holders = await nodes["n1"].in_sync_nodes(["procs/9/pages", "procs/9/core.img"])
        assert len(holders) == 2 and "n1" in holders
        target = next(n for n in holders if n != "n1")
        outsider = next(n for n in nodes if n not in holders)
        w = await nodes[outsider].promote("procs/9/pages", target)
        assert w["master"] == target and w["epoch"] == 2
        ft = await nodes[target].open("procs/9/pages")
        assert ft.is_master()
        fd = ft.local_fd()
        try:
            assert os.pread(fd, 2 * PAGE, 0) == await f1.read(0, 2 * PAGE)
        finally:
            os.close(fd)
        with pytest.raises(Unavailable):
            (await nodes[outsider].open("procs/9/pages")).local_fd()  # no copy there


async def test_promoting_a_node_without_a_copy_is_refused(tmp_path):
    async with trio_cluster(tmp_path) as nodes:
        f = await nodes["n1"].open("y", create=True)
        await f.write(0, b"y")
        w = await nodes["n1"].where("y")
        outsider = next(n for n in nodes if n not in w["members"])
        with pytest.raises(UsageError):
            await nodes["n1"].promote("y", outsider)


async def _member_copy(nodes, path: str, length: int) -> tuple[str, bytes]:
    """(member, bytes of its local copy) for the in-sync member of `path` that is not master."""
    w = await nodes["n1"].where(path)
    member = next(n for n in w["in_sync"] if n != w["master"])
    f = await nodes[member].open(path)
    reader = await f.local_reader()
    try:
        return member, await trio.to_thread.run_sync(reader.read, 0, length)
    finally:
        reader.close()


async def test_a_big_page_batch_is_pipelined_and_identical_on_both_copies(tmp_path):
    async with trio_cluster(tmp_path) as nodes:
        f = await nodes["n1"].open("pages", create=True)
        slots = list(range(3 * 1024 + 17))  # 12 MiB and a bit: 13 frames, several in flight
        order = slots[::-1][:100] + slots[:-100]  # not in slot order
        data = os.urandom(len(order) * PAGE)
        await f.write_pages([s * PAGE for s in order], data)
        want = bytearray(len(slots) * PAGE)
        for i, s in enumerate(order):
            want[s * PAGE : (s + 1) * PAGE] = data[i * PAGE : (i + 1) * PAGE]
        assert await f.read(0, len(want)) == want
        _, copy = await _member_copy(nodes, "pages", len(want))
        assert copy == want  # applied there before write_pages returned, no fsync needed


async def test_a_repeated_offset_in_one_batch_keeps_the_last_page(tmp_path):
    async with trio_cluster(tmp_path) as nodes:
        f = await nodes["n1"].open("pages", create=True)
        n = 600  # three frames; slot 5 appears in the first and in the last one
        offsets = [i * PAGE for i in range(n - 1)] + [5 * PAGE]
        data = os.urandom(n * PAGE)
        await f.write_pages(offsets, data)
        assert await f.read(5 * PAGE, PAGE) == data[-PAGE:]
        _, copy = await _member_copy(nodes, "pages", 6 * PAGE)
        assert copy[5 * PAGE :] == data[-PAGE:]


async def test_a_failing_piece_fails_the_whole_write_after_the_pieces_in_flight(tmp_path):
    async with trio_cluster(tmp_path) as nodes:
        files = nodes["n1"]
        f = await files.open("big", create=True)
        data = os.urandom(6 << 20)
        files.fm.faults.arm("master.before_local_write", "error@4")  # the 4th 1 MiB piece
        with pytest.raises(OSError):
            await f.write(0, data)
        # the first three pieces were acknowledged by every in-sync copy; nothing after them
        # was started, and the copies agree on every byte
        got = await f.read(0, len(data))
        assert got[: 3 << 20] == data[: 3 << 20]
        assert len(got) == 3 << 20
        _, copy = await _member_copy(nodes, "big", len(data))
        assert copy == got


async def test_frames_applied_together_fail_like_one_by_one(tmp_path):
    """A member applies queued frames in one go; a frame that fails there (a real EFBIG from
    RLIMIT_FSIZE) fails alone, the ones before it are applied, the ones after it refused."""
    import resource
    import signal

    from gfvm.fm import messages as m

    async with trio_cluster(tmp_path) as nodes:
        f = await nodes["n1"].open("runs", create=True)
        await f.write(0, b"first")
        w = await nodes["n1"].where("runs")
        member = nodes[next(n for n in w["in_sync"] if n != w["master"])].fm
        fs = member.runtime(w["fid"])
        base = fs.applied[1]
        page = os.urandom(PAGE)
        frames = [m.ReplWrite(w["fid"], w["epoch"], base + 1, 1, 0, page),
                  m.ReplPages(w["fid"], w["epoch"], base + 2, 2, [PAGE], page),
                  m.ReplWrite(w["fid"], w["epoch"], base + 3, 3, 64 << 20, page),  # past the limit
                  m.ReplWrite(w["fid"], w["epoch"], base + 4, 4, 2 * PAGE, page)]
        old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 20, old_limit[1]))
        try:
            outcomes = await member.master.handle_frames(w["master"], frames)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            signal.signal(signal.SIGXFSZ, old_handler)
        assert outcomes[:2] == [None, None]
        assert isinstance(outcomes[2], OSError)
        assert "earlier frame failed" in str(outcomes[3])
        assert fs.broken and fs.applied[1] == base + 2
        assert fs.lf.read(0, 2 * PAGE) == page * 2
        assert fs.lf.size == 2 * PAGE  # the refused frame was not applied


async def _readable_locally(files: Files, path: str, want: bytes) -> bool:
    """Whether this node serves `path` from its own copy (the pager's fault path), and that
    copy starts with `want`."""
    f = await files.open(path)
    try:
        fd = f.local_fd()
    except Unavailable:
        return False
    try:
        return os.pread(fd, len(want), 0) == want
    finally:
        os.close(fd)


async def _idle_replicated_file(nodes, path: str) -> tuple[bytes, dict]:
    """Writes `path` on n1 and leaves it idle; (its data, where). Every in-sync member reads
    its copy locally."""
    f = await nodes["n1"].open(path, create=True)
    data = os.urandom(8 * PAGE)
    await f.write(0, data)
    await f.fsync()
    w = await nodes["n1"].where(path)
    for member in w["in_sync"]:
        assert await _readable_locally(nodes[member], path, data)
    return data, w


async def test_an_installed_metadata_state_keeps_a_confirmed_copy_readable(tmp_path):
    """A member that installs the leader's whole metadata state (it fell behind: a restart, a
    burst of ops) still reads its confirmed copy locally. Installing used to clear every
    file's confirmation, and an idle file was never confirmed again: a migration target
    restarted then could not take its process back (it waited for a local copy for good)."""
    async with trio_cluster(tmp_path, replicas=3) as nodes:  # a member that is no leader
        data, w = await _idle_replicated_file(nodes, "idle")
        leader = next(fl.fm for fl in nodes.values() if fl.fm.consensus.leader == fl.fm.node)
        member = next(n for n in w["in_sync"] if n not in (w["master"], leader.node))
        ack = await leader.consensus._install(member, leader.consensus.term)
        assert ack.ok
        assert await _readable_locally(nodes[member], "idle", data)


async def test_a_copy_resynced_beside_another_stays_readable_once_in_sync(tmp_path):
    """Two members are resynced at once. The first to finish is marked in sync by a config op
    that still lists the second as outdated, and the second applies that op after its own
    resync's FLUSH confirmed its copy (metadata and stream are not ordered). Once in sync, the
    second must read its copy locally. Applying that op used to clear the confirmation, and an
    idle file then stayed unreadable there for good: a migration target restarted after its
    crash waited for a local copy of its process's paging file forever."""
    # one copy acknowledges a write: the write that drops both members completes at once
    async with trio_cluster(tmp_path, replicas=3, fm={"min_copies": 1}) as nodes:
        data, w = await _idle_replicated_file(nodes, "both")
        master = nodes[w["master"]].fm
        members = [n for n in w["in_sync"] if n != w["master"]]
        for name in members:
            nodes[name].fm.faults.arm("member.before_ack", "error")  # the next write drops it
        # the first resync to finish waits before it is marked in sync: the other's op is first
        master.faults.arm("resync.before_in_sync", "delay:1@1")
        data = os.urandom(PAGE) + data[PAGE:]
        f = await nodes[w["master"]].open("both")
        await f.write(0, data[:PAGE])
        with trio.fail_after(30):
            while master.faults.hits.get("resync.before_in_sync", 0) < 2 or not all(
                    name in nodes[name].fm.file_entry(w["fid"]).in_sync() for name in members):
                await trio.sleep(0.05)
        assert all(nodes[name].fm.faults.hits["member.before_ack"] >= 1 for name in members)
        for name in members:
            with trio.fail_after(10):
                while not await _readable_locally(nodes[name], "both", data):
                    await trio.sleep(0.1)


async def test_a_write_two_members_failed_drops_each_of_them_once(tmp_path):
    """A write that both members fail drops each of them once; each is resynced once. The
    acknowledgement check used to drop them a second time when their resyncs had finished
    while it dropped the other one (they were in sync again, and had not acknowledged that
    write): each was then resynced again, in full."""
    async with trio_cluster(tmp_path, replicas=3, fm={"min_copies": 1}) as nodes:
        data, w = await _idle_replicated_file(nodes, "twice")
        master = nodes[w["master"]].fm
        members = [n for n in w["in_sync"] if n != w["master"]]
        for name in members:
            nodes[name].fm.faults.arm("member.before_ack", "error")
        f = await nodes[w["master"]].open("twice")
        await f.write(0, os.urandom(PAGE))
        with trio.fail_after(30):
            while set((await nodes[w["master"]].where("twice"))["in_sync"]) != set(w["in_sync"]):
                await trio.sleep(0.05)
        assert master.faults.hits.get("drop.before_commit") == 2
        assert master.faults.hits.get("resync.before_in_sync") == 2


def test_a_loopback_block_is_held_by_one_test_cluster_at_a_time():
    """Test clusters on this machine (from any test run) never share their loopback addresses."""
    k1, held = claim_loopback_block("127.78", 5)
    with held:
        k2, other = claim_loopback_block("127.78", 5)
        other.close()
        assert k2 != k1
    k3, again = claim_loopback_block("127.78", k1 - 20)
    again.close()
    assert k3 == k1  # released with its socket
