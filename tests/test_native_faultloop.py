"""The native fault-service loop (gfvm.native.FaultLoop) on real processes: native_target's
pages are saved to a paging file, evicted by injected MADV_DONTNEED, and come back through the
loop when the target touches them; the target checks every byte itself."""

from __future__ import annotations

import errno
import os
import select
import signal
import time

import pytest
import trio
from native_support import PAGE, inject_uffd, page_bytes, require_root

from gfvm import native

pytest_plugins = ["native_fixtures"]  # start_target, target_binary, tracer


@pytest.fixture
def loop():
    require_root()
    with native.FaultLoop(64) as lp:
        lp.start()
        yield lp


class Managed:
    """A target under a pager-like setup: injected WP-tracking uffd, paging file, index, loop."""

    def __init__(self, target, tracer, loop, tmp_path, *, defer_missing=False, wp=True, pid=True):
        self.t, self.tracer, self.loop = target, tracer, loop
        self.uffd = inject_uffd(tracer, target, native.PAGER_FEATURES, missing=True, wp=wp)
        self.pidfd = native.pidfd_open(target.pid)
        # Kept open across methods, closed by close().
        self.file = open(tmp_path / f"paging-{target.pid}", "w+b")  # noqa: SIM115
        self.index = native.PageIndex()
        self.uffd_wp = wp
        self.id = loop.add(
            self.uffd,
            [native.Source(self.index, self.file.fileno())],
            wp=wp,
            pid=target.pid if pid else 0,
            pidfd=self.pidfd,
            defer_missing=defer_missing,
        )

    def flush(self, first=0, count=None, *, crcs=True):
        """Saves pages [first, first + count) at slot = page number, the way a pager does:
        re-protect (scan) first, then read and store, then index (with the pages' CRC-32s
        unless crcs=False)."""
        count = self.t.npages - first if count is None else count
        if self.uffd_wp:
            pm = native.open_pagemap(self.t.pid)
            try:
                native.scan_written(pm, self.t.page(first), self.t.page(first + count))
            finally:
                os.close(pm)
        buf = bytearray(count * PAGE)
        assert native.read_ranges(
            self.t.pid, [(self.t.page(first), self.t.page(first + count))], buf
        ) == len(buf)
        self.file.seek(first * PAGE)
        self.file.write(buf)
        self.file.flush()
        self.index.set_many(
            [self.t.page(i) for i in range(first, first + count)],
            range(first, first + count),
            crcs=native.crc32_pages(buf) if crcs else None,
        )

    def corrupt(self, slot):
        """Flips one bit of a slot in the paging file (on disk)."""
        self.file.seek(slot * PAGE + 100)
        b = self.file.read(1)
        self.file.seek(slot * PAGE + 100)
        self.file.write(bytes([b[0] ^ 0x10]))
        self.file.flush()

    def evict(self, first=0, count=None):
        count = self.t.npages - first if count is None else count
        if not self.uffd_wp:
            # Without WP tracking evict_pages would find every page written: drop them directly.
            self.loop.expect_eviction(self.id, [(self.t.page(first), self.t.page(first + count))])
            try:
                self.tracer.inject_madvise(
                    self.t.pid, [(self.t.page(first), self.t.page(first + count))]
                )
            finally:
                self.loop.expect_eviction(self.id, [])
            return
        return native.evict_pages(
            self.tracer,
            self.t.pid,
            [(self.t.page(first), self.t.page(first + count))],
            loop=self.loop,
            uffd_id=self.id,
            uffd=self.uffd,
            index=self.index,
        )

    def written(self):
        pm = native.open_pagemap(self.t.pid)
        try:
            return native.scan_written(pm, self.t.addr, self.t.end).ranges()
        finally:
            os.close(pm)

    def present_pages(self):
        pm = native.open_pagemap(self.t.pid)
        try:
            return native.scan_present(pm, self.t.addr, self.t.end).page_count
        finally:
            os.close(pm)

    def close(self):
        self.file.close()
        self.uffd.close()
        os.close(self.pidfd)


@pytest.fixture
def manage(tracer, loop, tmp_path):
    made = []

    def make(target, **kw):
        made.append(Managed(target, tracer, loop, tmp_path, **kw))
        return made[-1]

    try:
        yield make
    finally:
        for m in made:
            m.close()


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


@pytest.mark.parametrize("window", [1, 16, 64, 256])
def test_evicted_pages_come_back_with_their_bytes(start_target, manage, loop, window):
    loop.window_pages = window
    t = start_target(512)
    m = manage(t)
    assert t.cmd("write 100 50 2") == "ok"
    m.flush()
    m.evict()
    assert m.present_pages() == 0
    assert t.cmd("verify") == "ok 512"
    # The counters move just after the copy that wakes the target: they may lag one window.
    wait_for(lambda: loop.counters(m.id).pages_copied == 512)
    c = loop.counters(m.id)
    assert c.pages_zero == 0 and c.errors == 0
    assert c.windows >= 512 // window
    assert m.written() == []  # installed write-protected: dirty tracking stays exact
    assert t.cmd("write 7 2 3") == "ok"
    assert m.written() == [(t.page(7), t.page(9))]


def test_eviction_keeps_pages_not_safely_in_the_paging_file(start_target, manage, loop):
    t = start_target(64)
    m = manage(t)
    m.flush(0, 32)
    assert t.cmd("write 5 1 2") == "ok"  # written after the flush: newest data only in memory
    runs = m.evict()
    assert runs == [(t.page(0), t.page(5)), (t.page(6), t.page(32))]
    assert m.present_pages() == 1 + 32
    assert t.cmd("verify") == "ok 64"


def test_flush_racing_with_dontneed_never_restores_stale_data(start_target, manage, loop):
    """The pager reads pages, the process discards some of them meanwhile, then the pager
    indexes what it read. Whichever reaches the index first (the loop applies the REMOVE just
    after the process resumes), the discarded pages end up without a slot."""
    t = start_target(16)
    m = manage(t)
    seq = m.index.change_seq
    buf = bytearray(16 * PAGE)
    assert native.read_ranges(t.pid, [(t.addr, t.end)], buf) == len(buf)
    assert t.cmd("dontneed 0 4") == "ok"
    m.file.write(buf)
    m.file.flush()
    skipped = m.index.set_many([t.page(i) for i in range(16)], range(16), unless_changed_since=seq)
    assert set(skipped) <= {t.page(i) for i in range(4)}
    wait_for(lambda: any(e.kind == "remove" for e in loop.pop_events()))
    assert [a for a, _ in m.index.items()] == [t.page(i) for i in range(4, 16)]
    m.evict()
    assert t.cmd("verify") == "ok 16"  # pages 0-3 read zeros


def test_pages_without_a_slot_come_back_as_zeros(start_target, manage, loop):
    t = start_target(64)
    m = manage(t)
    m.flush(0, 32)
    assert t.cmd("dontneed 32 32") == "ok"
    m.evict()
    assert t.cmd("verify") == "ok 64"
    wait_for(lambda: loop.counters(m.id).pages_copied + loop.counters(m.id).pages_zero == 64)
    c = loop.counters(m.id)
    assert c.pages_copied == 32 and c.pages_zero == 32
    assert m.written() == []


def test_dontneed_by_the_process_means_zeros_not_old_data(start_target, manage, loop):
    t = start_target(64)
    m = manage(t)
    m.flush()
    m.evict()
    assert t.cmd("dontneed 8 8") == "ok"  # the process discards pages that have slots
    # Its madvise returned when the loop *read* the event; sync() waits until it is applied.
    loop.sync(m.id)
    events = loop.pop_events()
    removes = [(e.start, e.end, e.evicted) for e in events if e.kind == "remove"]
    assert removes == [(t.addr, t.end, True), (t.page(8), t.page(16), False)]
    assert len(m.index) == 56 and t.page(8) not in m.index
    assert t.cmd("verify") == "ok 64"


def test_munmap_drops_index_entries(start_target, manage, loop):
    t = start_target(64)
    m = manage(t)
    m.flush()
    m.evict()
    assert t.cmd("munmap 48 16") == "ok"
    loop.sync(m.id)
    assert [(e.kind, e.start, e.end) for e in loop.pop_events() if e.kind == "unmap"] == [
        ("unmap", t.page(48), t.page(64))
    ]
    assert len(m.index) == 48
    assert t.cmd("verify") == "ok 48"


def test_mremap_moves_index_entries(start_target, manage, loop):
    t = start_target(64)
    m = manage(t)
    m.flush()
    m.evict()
    word, new = t.cmd("mremap").split()
    new = int(new, 16)
    assert word == "ok"
    loop.sync(m.id)
    remaps = [e for e in loop.pop_events() if e.kind == "remap"]
    assert [(e.start, e.end, e.to) for e in remaps] == [(t.addr, t.end, new)]
    assert m.index.items() == [(new + i * PAGE, i) for i in range(64)]
    assert t.cmd("verify") == "ok 64"


def test_forked_child_is_served_from_a_copy_of_the_index(start_target, manage, loop):
    t = start_target(64)
    m = manage(t)
    m.flush()
    m.evict()
    assert t.cmd("fork") == "child 0"  # the child checked every page, then wrote page 0
    loop.sync(m.id)
    forks = [e for e in loop.pop_events() if e.kind == "fork"]
    assert len(forks) == 1 and forks[0].child_id != 0 and forks[0].uffd is not None
    forks[0].uffd.close()
    assert loop.counters(forks[0].child_id).faults > 0
    assert len(m.index) == 64  # the parent's index is its own
    assert t.cmd("verify") == "ok 64"


def test_sources_of_a_forked_child_are_the_clones_the_loop_reads(start_target, manage, loop):
    t = start_target(64)
    m = manage(t)
    m.flush()
    m.evict()
    assert t.cmd("fork") == "child 0"
    loop.sync(m.id)
    (fork,) = [e for e in loop.pop_events() if e.kind == "fork"]
    fork.uffd.close()
    (mine,) = loop.sources(m.id)
    assert mine.index.cdata == m.index.cdata  # the parent's own index, not a copy
    assert os.path.samestat(os.fstat(mine.fd), os.fstat(m.file.fileno()))
    (child,) = loop.sources(fork.child_id)
    assert child.index.cdata != m.index.cdata
    assert child.index.items() == m.index.items()  # cloned at the fork
    assert os.path.samestat(os.fstat(child.fd), os.fstat(m.file.fileno()))
    # Changes made through it are what the loop serves the child from.
    child.index.remove(t.page(3))
    assert t.page(3) not in loop.sources(fork.child_id)[0].index
    assert t.page(3) in m.index
    fd = child.fd
    del child
    with pytest.raises(OSError):
        os.fstat(fd)  # the Source owned its dup
    with pytest.raises(KeyError):
        loop.sources(12345)


@pytest.mark.parametrize("wp", [True, False], ids=["wp-tracked", "missing-only"])
def test_corrupt_slot_is_poisoned_never_served(start_target, manage, loop, wp):
    """A slot whose bytes no longer match the index's CRC-32: the loop does not serve it, it
    poisons the page (the process gets SIGBUS when it touches it, never the wrong bytes) and
    reports the page and the slot; the other pages are served as usual."""
    t = start_target(64)
    m = manage(t, wp=wp)
    m.flush()
    m.evict()
    m.corrupt(5)
    t.send("verify")  # pages in order: 0..4 fine, page 5 poisoned
    assert t.proc.wait(timeout=10) == -signal.SIGBUS  # not "bad 5 ...": never the bad bytes
    (err,) = [e for e in loop.pop_events() if e.kind == "error"]
    assert err.corrupt and (err.uffd_id, err.start, err.end) == (m.id, t.page(5), t.page(6))
    assert (err.slot, err.source) == (5, 0)
    c = loop.counters(m.id)
    assert c.pages_poisoned == 1 and c.errors == 0
    assert c.pages_copied >= 5 and c.from_source[0] == c.pages_copied


def test_pages_without_a_checksum_are_served_unchecked(start_target, manage, loop):
    """Entries set without CRCs (e.g. CRIU's own image pages) are served as they are."""
    t = start_target(16)
    m = manage(t)
    m.flush(crcs=False)
    m.evict()
    m.corrupt(5)
    assert t.cmd("verify").startswith("bad 5 ")
    assert loop.counters(m.id).pages_poisoned == 0


def test_process_death_is_reported_and_nothing_hangs(start_target, manage, loop):
    t = start_target(16)
    m = manage(t)
    m.flush()
    m.evict()
    t.proc.kill()
    t.proc.wait(timeout=10)
    wait_for(lambda: loop.state(m.id)[0] == "exited")
    assert [e.kind for e in loop.pop_events() if e.uffd_id == m.id][-1] == "exit"
    loop.stop()
    loop.start()


def test_stopped_loop_leaves_the_fault_waiting(start_target, manage, loop):
    t = start_target(16)
    m = manage(t)
    m.flush()
    m.evict()
    loop.stop()
    t.send("verify")
    time.sleep(0.2)
    assert not t.ready_to_read() and t.state() == "S"  # blocked on its fault, not fed zeros
    loop.start()
    assert t.read_line() == "ok 16"


def test_unreadable_slot_is_an_error_and_python_can_take_over(start_target, manage, loop):
    """A slot past the end of the paging file must never be served as zeros: the loop reports
    EIO, stops serving the uffd and re-queues the fault; Python then serves it itself."""
    t = start_target(8)
    m = manage(t)
    m.flush()
    m.evict()
    m.index[t.page(3)] = 1000  # beyond the file
    t.send("verify")
    wait_for(lambda: loop.state(m.id) == ("failed", errno.EIO))
    assert any(e.kind == "error" and e.error == errno.EIO for e in loop.pop_events())
    time.sleep(0.1)
    assert not t.ready_to_read()  # blocked, not fed zeros
    assert select.select([m.uffd.fileno()], [], [], 5)[0]  # the fault waits in the uffd again
    served = 0
    while not t.ready_to_read(0.01):
        for ev in m.uffd.read_events():
            if isinstance(ev, native.PageFault):
                page = (ev.address - t.addr) // PAGE
                try:
                    m.uffd.copy(ev.address & ~(PAGE - 1), page_bytes(page, 1), wp=True)
                    served += 1
                except FileExistsError:
                    m.uffd.wake(ev.address & ~(PAGE - 1), PAGE)
    assert served >= 1
    assert t.read_line() == "ok 8"


def test_deferred_pages_go_to_python(start_target, manage, loop):
    t = start_target(32)
    m = manage(t, defer_missing=True)
    m.flush()
    m.evict()
    for i in range(16, 32):
        m.index.remove(t.page(i))  # pretend these live elsewhere (e.g. CRIU's images)
    t.send("verify")
    deferred = 0
    while not t.ready_to_read(0.01):
        for ev in loop.pop_events():
            if ev.kind == "fault":
                page = (ev.start - t.addr) // PAGE
                assert 16 <= page < 32
                m.uffd.copy(t.page(page), page_bytes(page, 1), wp=True)
                deferred += 1
    assert t.read_line() == "ok 32"
    assert deferred == loop.counters(m.id).deferred >= 1


def test_second_source_serves_what_the_first_lacks(start_target, tracer, loop, tmp_path):
    t = start_target(32)
    uffd = inject_uffd(tracer, t, native.PAGER_FEATURES, missing=True, wp=True)
    first, second = native.PageIndex(), native.PageIndex()
    data = b"".join(page_bytes(i, 1) for i in range(32))
    with open(tmp_path / "a", "w+b") as fa, open(tmp_path / "b", "w+b") as fb:
        fa.write(data[: 16 * PAGE])
        fa.flush()
        fb.write(bytes(PAGE) + data)  # the second file has its pages one slot further on
        fb.flush()
        first.set_many([t.page(i) for i in range(16)], range(16))
        second.set_many([t.page(i) for i in range(32)], range(1, 33))
        uid = loop.add(
            uffd,
            [native.Source(first, fa.fileno()), native.Source(second, fb.fileno())],
            wp=True,
            pid=t.pid,
        )
        native.evict_pages(
            tracer, t.pid, [(t.addr, t.end)], loop=loop, uffd_id=uid, uffd=uffd, index=second
        )
        assert t.cmd("verify") == "ok 32"
        wait_for(lambda: loop.counters(uid).pages_copied == 32)
        assert loop.counters(uid).from_source == (16, 16, 0, 0)
    uffd.close()


def test_mapping_source(start_target, tracer, loop):
    t = start_target(16)
    uffd = inject_uffd(tracer, t, native.PAGER_FEATURES, missing=True, wp=True)
    index = native.PageIndex()
    index.set_many([t.page(i) for i in range(16)], range(16))
    mapping = bytearray(b"".join(page_bytes(i, 1) for i in range(16)))
    uid = loop.add(uffd, [native.Source(index, mapping=mapping)], wp=True, pid=t.pid)
    native.evict_pages(
        tracer, t.pid, [(t.addr, t.end)], loop=loop, uffd_id=uid, uffd=uffd, index=index
    )
    assert t.cmd("verify") == "ok 16"
    uffd.close()


def test_present_pages_in_a_window_are_skipped(start_target, manage, loop):
    loop.window_pages = 64
    t = start_target(64)
    m = manage(t)
    m.flush()
    for i in range(0, 64, 2):
        m.evict(i, 1)  # every other page
    assert t.cmd("verify") == "ok 64"
    wait_for(lambda: loop.counters(m.id).pages_copied == 32)
    c = loop.counters(m.id)
    assert c.eexist > 0 and c.errors == 0


def test_concurrent_faults_from_many_threads(start_target, manage, loop):
    t = start_target(1024)
    m = manage(t)
    m.flush()
    m.evict()
    assert t.cmd("pverify 8") == "ok"
    assert t.cmd("verify") == "ok 1024"
    assert loop.counters(m.id).errors == 0


def test_several_processes_on_one_loop(start_target, manage, loop):
    targets = [start_target(32) for _ in range(3)]
    ms = [manage(t) for t in targets]
    for m in ms:
        m.flush()
        m.evict()
    for t in targets:
        t.send("verify")
    assert [t.read_line() for t in targets] == ["ok 32"] * 3
    wait_for(lambda: loop.counters().pages_copied == 96)


def test_latency_histogram_and_removal(start_target, manage, loop):
    t = start_target(64)
    m = manage(t)
    m.flush()
    m.evict()
    assert t.cmd("verify") == "ok 64"
    hist = loop.latency()
    assert hist.count >= 1 and hist.p50_ns is not None and hist.p99_ns >= hist.p50_ns
    dup = loop.dup_uffd(m.id)
    dup.close()
    loop.remove(m.id)
    with pytest.raises(KeyError):
        loop.state(m.id)


async def test_events_wake_a_trio_task(start_target, manage, loop):
    t = start_target(16)
    manage(t)
    t.send("dontneed 0 2")
    with trio.fail_after(10):
        events = await loop.wait_events()
    assert [(e.kind, e.start, e.end) for e in events] == [("remove", t.page(0), t.page(2))]
    assert t.read_line() == "ok"


def wait_event(loop, kind, timeout=10.0):
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        seen += loop.pop_events()
        found = [e for e in seen if e.kind == kind]
        if found:
            return found[0], seen
        assert time.monotonic() < deadline, f"no {kind} event (got {seen})"
        select.select([loop.notify_fd], [], [], 0.05)


@pytest.mark.parametrize("pid", [True, False], ids=["vma-clamped", "no-pid"])
def test_prefetch_installs_what_the_sources_have_and_nothing_else(start_target, manage, loop, pid):
    t = start_target(512)
    m = manage(t, pid=pid)
    m.flush()
    m.evict()
    assert t.cmd("dontneed 256 256") == "ok"  # in no source now: must not be installed ahead
    assert t.cmd("munmap 100 10") == "ok"  # a hole: two VMAs
    loop.sync(m.id)
    loop.pop_events()
    loop.prefetch(m.id, [(t.addr, t.end)])
    done, _ = wait_event(loop, "prefetched")
    assert (done.uffd_id, done.count, done.error) == (m.id, 246, 0)
    assert m.present_pages() == 246  # pages 256-511 still missing: never zero-filled ahead
    c = loop.counters(m.id)
    assert c.faults == 0 and c.pages_prefetched == c.pages_copied == 246 and c.pages_zero == 0
    # Installed write-protected, like faults (emptied pages read as written: PLATFORM.md).
    assert all(a >= t.page(256) for a, _ in m.written())
    assert t.cmd("verify") == "ok 502"  # 256-511 fault in as zeros
    assert loop.counters(m.id).pages_prefetched == 246


def test_prefetch_runs_between_faults(start_target, manage, loop):
    t = start_target(4096)
    m = manage(t)
    m.flush()
    m.evict()
    loop.prefetch(m.id, [(t.addr, t.end)])
    assert t.cmd("pverify 4") == "ok"  # faults served meanwhile, from the same thread
    done, _ = wait_event(loop, "prefetched")
    c = loop.counters(m.id)
    assert done.count == c.pages_prefetched and c.pages_copied == 4096
    assert c.errors == 0 and m.present_pages() == 4096
    assert t.cmd("verify") == "ok 4096"


def test_prefetch_never_serves_a_corrupt_page(start_target, manage, loop):
    t = start_target(64)
    m = manage(t)
    m.flush()
    m.evict()
    m.corrupt(9)
    loop.prefetch(m.id, [(t.addr, t.end)])
    done, seen = wait_event(loop, "prefetched")
    assert done.count == 63
    (bad,) = [e for e in seen if e.kind == "error"]
    assert bad.corrupt and (bad.start, bad.slot) == (t.page(9), 9)
    assert loop.counters(m.id).pages_poisoned == 1
    t.send("verify")  # page 9 is poisoned: SIGBUS, never the corrupt bytes
    assert t.proc.wait(timeout=10) == -signal.SIGBUS


def test_prefetch_of_a_removed_entry_reports_it(start_target, manage, loop):
    t = start_target(64)
    m = manage(t)
    m.flush()
    m.evict()
    loop.stop()
    loop.prefetch(m.id, [(t.addr, t.end)])
    loop.remove(m.id)
    done, _ = wait_event(loop, "prefetched")
    assert (done.uffd_id, done.count, done.error) == (m.id, 0, errno.ECANCELED)
    loop.start()
    with pytest.raises(KeyError):
        loop.prefetch(m.id, [(t.addr, t.end)])


def test_prefetch_of_nothing_is_done_at_once(start_target, manage, loop):
    t = start_target(16)
    m = manage(t)
    loop.prefetch(m.id, [])
    done, _ = wait_event(loop, "prefetched")
    assert (done.uffd_id, done.count, done.error) == (m.id, 0, 0)
