"""gfvm.native's page checksums (csrc/checksum.c): every CRC-32 implementation against zlib, and
`page_matches`, the File Manager's per-page check (sum 0 = hole, CRC 0 stored as 0xFFFFFFFF)."""

from __future__ import annotations

import os
import zlib

import pytest

from gfvm import native

P = 4096


def _sum(page: bytes) -> int:
    """The File Manager's stored sum of a full page (gfvm.fm.store.page_sum)."""
    return zlib.crc32(page) or 0xFFFFFFFF


def _pages_that_stress_folding() -> list[bytes]:
    pages = [os.urandom(P) for _ in range(200)]
    pages += [b"\xff" * P, bytes(P), b"\x01" + bytes(P - 1), bytes(P - 1) + b"\x80"]
    # one bit set in each 16-byte lane of the first and the last 256-byte block (the wide loop's
    # accumulators and its final lane folding)
    for pos in list(range(0, 256, 16)) + list(range(P - 256, P, 16)):
        page = bytearray(P)
        page[pos + 7] = 0x40
        pages.append(bytes(page))
    return pages


def test_the_best_crc32_implementation_is_listed_last_and_zlib_always_runs():
    impls = native.crc32_impls()
    assert impls[0] == "zlib"
    assert set(impls) <= set(native.CRC32_IMPLS.values())


@pytest.mark.parametrize("impl", sorted(native.CRC32_IMPLS.values()))
def test_each_crc32_implementation_is_zlibs_crc32(impl):
    if impl not in native.crc32_impls():
        if os.environ.get("CI") == "true":
            pytest.fail(f"this CPU cannot run the {impl} CRC-32 (CI machines are expected to)")
        pytest.skip(f"this CPU cannot run the {impl} CRC-32")
    for page in _pages_that_stress_folding():
        assert native.crc32_page_using(page, impl) == zlib.crc32(page)


def test_a_page_matches_its_sum():
    page = os.urandom(P)
    assert native.page_matches(page, _sum(page))
    assert native.page_matches(bytearray(page), _sum(page))  # any buffer
    assert native.page_matches(memoryview(page), _sum(page))


def test_a_flipped_bit_does_not_match():
    page = bytearray(os.urandom(P))
    want = _sum(bytes(page))
    for pos in (0, 1234, P - 1):
        page[pos] ^= 0x04
        assert not native.page_matches(page, want)
        page[pos] ^= 0x04
    assert native.page_matches(page, want)


def test_a_hole_matches_only_when_every_byte_is_zero():
    assert native.page_matches(bytes(P), 0)
    for pos in (0, 7, 8, 9, 2048, P - 1):  # within and after the first word, the last byte
        page = bytearray(P)
        page[pos] = 1
        assert not native.page_matches(page, 0), pos
    # a zero page is not a hole's match by accident of its CRC: its sum is not 0
    assert native.page_matches(bytes(P), _sum(bytes(P)))
    assert _sum(bytes(P)) != 0


def test_a_page_whose_crc_is_zero_matches_the_stored_0xffffffff():
    from test_fm_store import _page_with_crc_zero

    page = _page_with_crc_zero(b"q")
    assert native.page_matches(page, 0xFFFFFFFF)
    assert not native.page_matches(page, 0)  # and it is not a hole


def test_a_short_page_is_the_tail_checked_zero_padded():
    tail = os.urandom(100)
    padded = tail + bytes(P - 100)
    assert native.page_matches(tail, _sum(padded))
    assert not native.page_matches(tail, _sum(tail))  # the sum of the unpadded bytes is not it
    assert native.page_matches(bytes(100), 0)
    assert not native.page_matches(b"\x00" * 99 + b"\x01", 0)
    assert native.page_matches(b"", 0) and native.page_matches(b"", _sum(bytes(P)))


def test_more_than_a_page_never_matches():
    page = os.urandom(P)
    assert not native.page_matches(page + b"\0", _sum(page))
    assert not native.page_matches(bytes(P + 1), 0)


def test_the_direct_call_for_bytes_gives_the_same_answers():
    page = os.urandom(P)
    assert native.page_bytes_match(page, P, _sum(page)) == 1
    assert native.page_bytes_match(page, P, _sum(page) ^ 1) == 0
    assert native.page_bytes_match(page[:10], 10, _sum(page[:10] + bytes(P - 10))) == 1
    assert native.page_bytes_match(bytes(P), P, 0) == 1
    assert native.page_bytes_match(bytes(P + 1), P + 1, 0) == 0
