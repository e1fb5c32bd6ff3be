"""native.pread_pages: scattered pages of a file in one call, checked against page sums."""

from __future__ import annotations

import array
import errno
import os
import zlib

import pytest

from gfvm import native

PAGE = 4096


def _sum(page: bytes) -> int:
    return zlib.crc32(page) or 0xFFFFFFFF


@pytest.fixture
def paged_file(tmp_path):
    """A file of 8 pages (page 3 a hole of zeros) and its sums; yields (fd, data, sums)."""
    data = bytearray(os.urandom(8 * PAGE))
    data[3 * PAGE : 4 * PAGE] = bytes(PAGE)
    sums = array.array("I", [_sum(bytes(data[i * PAGE : (i + 1) * PAGE])) for i in range(8)])
    sums[3] = 0  # the hole marker
    path = tmp_path / "data"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        yield fd, bytes(data), sums
    finally:
        os.close(fd)


def test_reads_scattered_pages_in_the_order_asked(paged_file):
    fd, data, sums = paged_file
    pages = array.array("Q", [7, 0, 3, 7, 2])
    out = bytearray(len(pages) * PAGE)
    wants = array.array("I", [sums[p] for p in pages])
    assert native.pread_pages(fd, pages, out, wants) == len(pages)
    for i, p in enumerate(pages):
        assert out[i * PAGE : (i + 1) * PAGE] == data[p * PAGE : (p + 1) * PAGE]


def test_stops_at_the_first_page_that_does_not_match(paged_file):
    fd, data, sums = paged_file
    os.pwrite(fd, b"\x01", 5 * PAGE + 100)  # damage page 5
    pages = array.array("Q", [1, 2, 5, 6])
    out = bytearray(len(pages) * PAGE)
    assert native.pread_pages(fd, pages, out, array.array("I", [sums[p] for p in pages])) == 2
    assert out[: 2 * PAGE] == data[PAGE : 3 * PAGE]


def test_a_hole_must_be_zeros(paged_file):
    fd, _, sums = paged_file
    pages = array.array("Q", [3])
    out = bytearray(PAGE)
    assert native.pread_pages(fd, pages, out, array.array("I", [0])) == 1
    os.pwrite(fd, b"\x01", 3 * PAGE + 4095)
    assert native.pread_pages(fd, pages, out, array.array("I", [0])) == 0


def test_stops_at_the_end_of_the_file(paged_file):
    fd, _, sums = paged_file
    pages = array.array("Q", [6, 7, 8, 1])
    out = bytearray(len(pages) * PAGE)
    assert native.pread_pages(fd, pages, out, array.array("I", [sums[6], sums[7], 0, sums[1]])) == 2
    assert native.pread_pages(fd, pages, out) == 2  # unchecked: short all the same


def test_without_sums_reads_unchecked(paged_file):
    fd, data, _ = paged_file
    os.pwrite(fd, b"\x01", 5 * PAGE)
    pages = array.array("Q", [5])
    out = bytearray(PAGE)
    assert native.pread_pages(fd, pages, out) == 1
    assert out[0] == 1


def test_a_bad_descriptor_raises():
    with pytest.raises(OSError) as e:
        native.pread_pages(-1, array.array("Q", [0]), bytearray(PAGE))
    assert e.value.errno == errno.EBADF


def test_wrong_argument_shapes_are_refused(paged_file):
    fd, _, _ = paged_file
    with pytest.raises(ValueError):
        native.pread_pages(fd, array.array("Q", [0, 1]), bytearray(PAGE))  # buffer too small
    with pytest.raises(ValueError):
        native.pread_pages(fd, array.array("L", [0]), bytearray(PAGE))  # not array('Q')
    with pytest.raises(ValueError):
        native.pread_pages(fd, array.array("Q", [0]), bytearray(PAGE), array.array("I", [1, 2]))
    with pytest.raises(BufferError):
        native.pread_pages(fd, array.array("Q", [0]), bytes(PAGE))  # not writable
