"""PAGEMAP_SCAN through gfvm.native on a real process: exact WP_ASYNC dirty tracking and
present-page scans over native_target's region."""

from __future__ import annotations

import errno
import os

import pytest
from native_support import inject_uffd, require_root

from gfvm import native

pytest_plugins = ["native_fixtures"]  # start_target, target_binary, tracer

TRACKING = native.UFFD_FEATURE_WP_ASYNC | native.UFFD_FEATURE_WP_UNPOPULATED


@pytest.fixture
def pagemap():
    fds = []

    def open_for(pid):
        fds.append(native.open_pagemap(pid))
        return fds[-1]

    try:
        yield open_for
    finally:
        for fd in fds:
            os.close(fd)


def test_written_pages_are_exact_and_reprotected(start_target, tracer, pagemap):
    t = start_target(128)
    inject_uffd(tracer, t, TRACKING, missing=False, wp=True)
    pm = pagemap(t.pid)
    assert len(native.scan_written(pm, t.addr, t.end)) == 0  # armed: nothing written yet
    assert t.cmd("write 3 5 2") == "ok"
    assert t.cmd("write 100 1 2") == "ok"
    written = native.scan_written(pm, t.addr, t.end)
    assert written.ranges() == [(t.page(3), t.page(8)), (t.page(100), t.page(101))]
    assert written.page_count == 6
    assert list(written.pages()) == [t.page(i) for i in (3, 4, 5, 6, 7, 100)]
    assert len(native.scan_written(pm, t.addr, t.end)) == 0  # re-protected by the first scan
    assert t.cmd("write 4 1 3") == "ok"
    assert native.scan_written(pm, t.addr, t.end).ranges() == [(t.page(4), t.page(5))]
    assert t.cmd("verify") == "ok 128"


def test_scan_without_reprotect_reports_again(start_target, tracer, pagemap):
    t = start_target(16)
    inject_uffd(tracer, t, TRACKING, missing=False, wp=True)
    pm = pagemap(t.pid)
    assert t.cmd("write 1 2 2") == "ok"
    for _ in range(2):
        assert native.scan_written(pm, t.addr, t.end, reprotect=False).ranges() == [
            (t.page(1), t.page(3))
        ]


def test_many_regions_are_collected_past_a_full_vector(start_target, tracer, pagemap):
    t = start_target(2048)
    inject_uffd(tracer, t, TRACKING, missing=False, wp=True)
    pm = pagemap(t.pid)
    for i in range(0, 2048, 2):
        assert t.cmd(f"write {i} 1 2") == "ok"
    written = native.scan_written(pm, t.addr, t.end)
    assert written.ranges() == [(t.page(i), t.page(i + 1)) for i in range(0, 2048, 2)]
    assert written.walk_end == t.end
    assert len(native.scan_written(pm, t.addr, t.end)) == 0


def test_max_pages_stops_the_walk(start_target, tracer, pagemap):
    t = start_target(64)
    inject_uffd(tracer, t, TRACKING, missing=False, wp=True)
    pm = pagemap(t.pid)
    assert t.cmd("write 0 64 2") == "ok"
    first = native.pagemap_scan(
        pm,
        t.addr,
        t.end,
        category_mask=native.PAGE_IS_WRITTEN,
        max_pages=10,
        flags=native.PM_SCAN_WP_MATCHING,
    )
    assert first.page_count == 10
    assert first.walk_end == t.page(10)
    rest = native.scan_written(pm, first.walk_end, t.end)
    assert rest.ranges() == [(t.page(10), t.end)]


def test_present_pages(start_target, pagemap):
    t = start_target(32)
    pm = pagemap(t.pid)
    assert native.scan_present(pm, t.addr, t.end).ranges() == [(t.addr, t.end)]
    assert t.cmd("dontneed 8 8") == "ok"
    present = native.scan_present(pm, t.addr, t.end)
    assert present.ranges() == [(t.addr, t.page(8)), (t.page(16), t.end)]
    assert all(r.categories == native.PAGE_IS_PRESENT for r in present)


def test_wpasync_check_refuses_untracked_memory(start_target, pagemap):
    t = start_target(8)
    pm = pagemap(t.pid)
    with pytest.raises(PermissionError) as exc:
        native.scan_written(pm, t.addr, t.end)
    assert exc.value.errno == errno.EPERM


def test_unaligned_start_is_refused(start_target, pagemap):
    t = start_target(8)
    with pytest.raises(ValueError):
        native.scan_present(pagemap(t.pid), t.addr + 8, t.end)


def test_pagemap_of_missing_process_is_esrch_or_enoent():
    require_root()
    with pytest.raises(FileNotFoundError):
        native.open_pagemap(2**22 + 12345)
