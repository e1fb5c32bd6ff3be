"""Batched process_vm_readv / writev through gfvm.native against native_target's known pages."""

from __future__ import annotations

import errno
import os

import pytest
from native_support import PAGE, page_bytes

from gfvm import native

pytest_plugins = ["native_fixtures"]  # start_target, target_binary, tracer


def test_read_scattered_pages_in_one_call(start_target):
    t = start_target(2048)
    pages = list(range(0, 2048, 3))  # 683 scattered pages: more than one batch of iovecs
    buf = bytearray(len(pages) * PAGE)
    assert native.read_pages(t.pid, [t.page(i) for i in pages], buf) == len(buf)
    for k, i in enumerate(pages):
        assert buf[k * PAGE : (k + 1) * PAGE] == page_bytes(i, 1), f"page {i}"


def test_read_ranges_and_regions(start_target):
    t = start_target(64)
    assert t.cmd("write 10 4 7") == "ok"
    buf = bytearray(8 * PAGE)
    assert native.read_ranges(
        t.pid, [(t.page(10), t.page(14)), (t.page(20), t.page(24))], buf
    ) == len(buf)
    want = b"".join(page_bytes(i, 7) for i in range(10, 14)) + b"".join(
        page_bytes(i, 1) for i in range(20, 24)
    )
    assert bytes(buf) == want
    pm = native.open_pagemap(t.pid)
    try:
        present = native.scan_present(pm, t.addr, t.end)
    finally:
        os.close(pm)
    whole = bytearray(present.page_count * PAGE)
    assert native.read_regions(t.pid, present, whole) == 64 * PAGE
    assert whole[10 * PAGE : 11 * PAGE] == page_bytes(10, 7)


def test_partial_read_stops_at_the_first_hole(start_target):
    t = start_target(16)
    assert t.cmd("munmap 5 1") == "ok"
    buf = bytearray(8 * PAGE)
    got = native.read_pages(t.pid, [t.page(i) for i in range(8)], buf)
    assert got == 5 * PAGE
    assert buf[4 * PAGE : 5 * PAGE] == page_bytes(4, 1)


def test_nothing_readable_is_efault(start_target):
    t = start_target(4)
    assert t.cmd("munmap 0 1") == "ok"
    with pytest.raises(OSError) as exc:
        native.read_pages(t.pid, [t.page(0)], bytearray(PAGE))
    assert exc.value.errno == errno.EFAULT


def test_write_pages_then_the_process_sees_them(start_target):
    t = start_target(16)
    data = b"".join(page_bytes(i, 9) for i in (2, 7))
    assert native.write_pages(t.pid, [t.page(2), t.page(7)], data) == 2 * PAGE
    assert t.cmd("verify").startswith("bad 2 ")
    assert t.cmd("expect 2 1 9") == "ok"
    assert t.cmd("expect 7 1 9") == "ok"
    assert t.cmd("verify") == "ok 16"


def test_write_ranges(start_target):
    t = start_target(8)
    data = b"".join(page_bytes(i, 3) for i in range(2, 5))
    assert native.write_ranges(t.pid, [(t.page(2), t.page(5))], data) == 3 * PAGE
    assert t.cmd("expect 2 3 3") == "ok"
    assert t.cmd("verify") == "ok 8"


def test_short_buffer_is_refused(start_target):
    t = start_target(4)
    with pytest.raises(ValueError):
        native.read_pages(t.pid, [t.page(0), t.page(1)], bytearray(PAGE))


def test_dead_process_is_esrch(start_target):
    t = start_target(4)
    t.kill()
    with pytest.raises(ProcessLookupError):
        native.read_pages(t.pid, [t.page(0)], bytearray(PAGE))
