"""userfaultfd primitives of gfvm.native on real processes: a uffd injected into native_target
acts on the target's memory; the target checks its own pages."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal

import pytest
from native_support import PAGE, inject_uffd, page_bytes, require_root

from gfvm import native

pytest_plugins = ["native_fixtures"]  # start_target, target_binary, tracer

NO_EVENTS = (
    native.UFFD_FEATURE_THREAD_ID
    | native.UFFD_FEATURE_WP_ASYNC
    | native.UFFD_FEATURE_WP_UNPOPULATED
)
ALL_EVENTS = (
    native.UFFD_FEATURE_EVENT_FORK
    | native.UFFD_FEATURE_EVENT_REMAP
    | native.UFFD_FEATURE_EVENT_REMOVE
    | native.UFFD_FEATURE_EVENT_UNMAP
    | native.UFFD_FEATURE_THREAD_ID
)


def pump(uffd, target, timeout=10.0):
    """Reads uffd messages until the target answers; returns (events, answer)."""
    events = []
    for _ in range(int(timeout / 0.01)):
        if target.ready_to_read():
            return events, target.read_line()
        if select.select([uffd.fileno()], [], [], 0.01)[0]:
            events += uffd.read_events()
    raise TimeoutError("target did not answer")


def wait_fault(uffd, timeout=5.0):
    assert select.select([uffd.fileno()], [], [], timeout)[0], "no fault arrived"
    (ev,) = uffd.read_events(1)
    assert isinstance(ev, native.PageFault)
    return ev


def test_api_is_allowed_once():
    require_root()
    with native.Userfaultfd.create() as u:
        api = u.api(native.UFFD_FEATURE_WP_ASYNC)
        assert api.features & native.UFFD_FEATURE_WP_ASYNC
        assert api.ioctls
        with pytest.raises(OSError) as exc:
            u.api(0)
        assert exc.value.errno == errno.EINVAL


def test_created_uffd_is_nonblocking_and_cloexec():
    require_root()
    with native.Userfaultfd.create() as u:
        assert os.get_blocking(u.fileno()) is False
        assert fcntl.fcntl(u.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_register_reports_range_ioctls_and_rejects_unaligned(start_target, tracer):
    t = start_target(16)
    u = tracer.inject_userfaultfd(t.pid)
    u.api(NO_EVENTS)
    ioctls = u.register(t.addr, 16 * PAGE, missing=True, wp=True)
    for bit in (
        native.UFFDIO_COPY_BIT,
        native.UFFDIO_ZEROPAGE_BIT,
        native.UFFDIO_WAKE_BIT,
        native.UFFDIO_WRITEPROTECT_BIT,
    ):
        assert ioctls & bit
    with pytest.raises(OSError) as exc:
        u.register(t.addr + 1, PAGE)
    assert exc.value.errno == errno.EINVAL
    u.unregister(t.addr, 16 * PAGE)
    assert t.cmd("verify") == "ok 16"


def test_page_fault_is_decoded_with_address_thread_and_flags(start_target, tracer):
    t = start_target(8)
    u = inject_uffd(tracer, t, NO_EVENTS)
    assert t.cmd("dontneed 2 1") == "ok"
    t.send("write 2 1 5")  # a write to the missing page
    fault = wait_fault(u)
    assert fault.address == t.page(2)
    assert fault.tid == t.pid
    assert fault.write and not fault.wp
    u.copy(t.page(2), bytes(PAGE))
    assert t.read_line() == "ok"
    assert t.cmd("verify") == "ok 8"


def test_copy_reports_partial_progress_and_eexist(start_target, tracer):
    t = start_target(16)
    u = inject_uffd(tracer, t, NO_EVENTS)
    assert t.cmd("dontneed 0 8") == "ok"
    data = b"".join(page_bytes(i, 4) for i in range(9))
    with pytest.raises(native.PartialCopy) as exc:
        u.copy(t.page(0), data)  # page 8 is present: stops in front of it
    assert exc.value.errno == errno.EAGAIN
    assert exc.value.copy == 8 * PAGE
    with pytest.raises(FileExistsError):
        u.copy(t.page(8), page_bytes(8, 4))
    got = bytearray(8 * PAGE)
    assert native.read_ranges(t.pid, [(t.page(0), t.page(8))], got) == 8 * PAGE
    assert bytes(got) == data[: 8 * PAGE]
    assert t.cmd("expect 0 8 4") == "ok"
    assert t.cmd("verify") == "ok 16"


def test_zeropage_serves_zeros(start_target, tracer):
    t = start_target(8)
    u = inject_uffd(tracer, t, NO_EVENTS)
    assert t.cmd("dontneed 0 4") == "ok"
    assert u.zeropage(t.page(0), 4 * PAGE) == 4 * PAGE
    assert t.cmd("verify") == "ok 8"


def test_dirty_state_of_installed_pages(start_target, tracer):
    """The finding behind the fault loop's choice (csrc/uffd.c): with WP_ASYNC, ZEROPAGE and
    COPY without MODE_WP count as written, COPY with MODE_WP does not."""
    t = start_target(8)
    u = inject_uffd(tracer, t, NO_EVENTS, wp=True)
    assert t.cmd("dontneed 0 3") == "ok"
    u.zeropage(t.page(0), PAGE)
    u.writeprotect(t.page(1), 2 * PAGE)  # DONTNEED dropped the markers: arm again
    u.copy(t.page(1), bytes(PAGE), wp=True)
    u.copy(t.page(2), bytes(PAGE), wp=False)
    pm = native.open_pagemap(t.pid)
    try:
        written = native.scan_written(pm, t.addr, t.end, reprotect=False)
    finally:
        os.close(pm)
    assert written.ranges() == [(t.page(0), t.page(1)), (t.page(2), t.page(3))]


def test_zeropage_refuses_armed_missing_pages(start_target, tracer):
    """A write-protect marker on a missing page makes UFFDIO_ZEROPAGE fail with EEXIST (COPY
    accepts it): one more reason the fault loop installs zeros by COPY on tracked ranges."""
    t = start_target(4)
    u = inject_uffd(tracer, t, NO_EVENTS, wp=True)
    assert t.cmd("dontneed 0 1") == "ok"
    u.writeprotect(t.page(0), PAGE)
    with pytest.raises(FileExistsError):
        u.zeropage(t.page(0), PAGE)
    u.copy(t.page(0), bytes(PAGE), wp=True)
    assert t.cmd("verify") == "ok 4"


def test_wake_makes_the_thread_fault_again(start_target, tracer):
    t = start_target(4)
    u = inject_uffd(tracer, t, NO_EVENTS)
    assert t.cmd("dontneed 1 1") == "ok"
    t.send("verify")
    first = wait_fault(u)
    u.wake(first.address, PAGE)  # not served: the access is retried
    again = wait_fault(u)
    assert again.address == first.address == t.page(1)
    u.zeropage(t.page(1), PAGE)
    assert t.read_line() == "ok 4"


def test_poisoned_page_raises_sigbus(start_target, tracer):
    t = start_target(4)
    u = inject_uffd(tracer, t, NO_EVENTS | native.UFFD_FEATURE_POISON)
    assert t.cmd("dontneed 0 1") == "ok"
    assert u.poison(t.page(0), PAGE) == PAGE
    t.send("verify")
    assert t.proc.wait(timeout=10) == -signal.SIGBUS


def test_remove_and_unmap_events(start_target, tracer):
    t = start_target(64)
    u = inject_uffd(tracer, t, ALL_EVENTS)
    t.send("dontneed 4 4")
    events, answer = pump(u, t)
    assert answer == "ok"
    assert events == [native.RemoveEvent(t.page(4), t.page(8))]
    t.send("munmap 60 4")
    events, answer = pump(u, t)
    assert answer == "ok"
    assert events == [native.UnmapEvent(t.page(60), t.page(64))]


def test_remap_event(start_target, tracer):
    t = start_target(16)
    u = inject_uffd(tracer, t, ALL_EVENTS)
    t.send("mremap")
    events, answer = pump(u, t)
    word, new = answer.split()
    assert word == "ok"
    remaps = [e for e in events if isinstance(e, native.RemapEvent)]
    assert remaps == [native.RemapEvent(t.addr, t.addr + 16 * PAGE, int(new, 16))]


def test_fork_event_hands_over_the_childs_uffd(start_target, tracer):
    t = start_target(8)
    u = inject_uffd(tracer, t, ALL_EVENTS)
    t.send("fork")
    events, answer = pump(u, t)
    assert answer == "child 0"
    forks = [e for e in events if isinstance(e, native.ForkEvent)]
    assert len(forks) == 1
    child_uffd = forks[0].uffd
    try:
        assert os.get_blocking(child_uffd.fileno()) is False
        assert fcntl.fcntl(child_uffd.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        child_uffd.close()
