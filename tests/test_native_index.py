"""gfvm.native.PageIndex (C hash map shared with the fault loop) against a dict model."""

from __future__ import annotations

import array
import errno
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gfvm import native

P = 4096
BASE = 0x7F00_0000_0000

pages = st.integers(min_value=0, max_value=300).map(lambda i: BASE + i * P)
slots = st.integers(min_value=0, max_value=2**63 - 1)
ops = st.one_of(
    st.tuples(st.just("set"), pages, slots),
    st.tuples(st.just("remove"), pages),
    st.tuples(st.just("remove_range"), pages, st.integers(0, 80)),
    st.tuples(st.just("move_range"), pages, pages, st.integers(0, 80)),
    st.tuples(st.just("clear")),
)


def apply_model(model: dict[int, int], op) -> None:
    kind = op[0]
    if kind == "set":
        model[op[1]] = op[2]
    elif kind == "remove":
        model.pop(op[1], None)
    elif kind == "remove_range":
        for a in [a for a in model if op[1] <= a < op[1] + op[2] * P]:
            del model[a]
    elif kind == "move_range":
        src, dst, n = op[1], op[2], op[3] * P
        moved = {a - src + dst: s for a, s in model.items() if src <= a < src + n}
        for a in [a for a in model if src <= a < src + n]:
            del model[a]
        model.update(moved)
    else:
        model.clear()


def apply_index(index: native.PageIndex, op) -> None:
    kind = op[0]
    if kind == "set":
        index[op[1]] = op[2]
    elif kind == "remove":
        index.remove(op[1])
    elif kind == "remove_range":
        index.remove_range(op[1], op[1] + op[2] * P)
    elif kind == "move_range":
        index.move_range(op[1], op[2], op[3] * P)
    else:
        index.clear()


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=60))
def test_behaves_like_a_dict(program):
    index, model = native.PageIndex(), {}
    for op in program:
        apply_model(model, op)
        apply_index(index, op)
    assert len(index) == len(model)
    assert index.items() == sorted(model.items())
    for a in range(BASE, BASE + 301 * P, P):
        assert index.get(a) == model.get(a)


def test_growth_and_bulk_load():
    index = native.PageIndex()
    addrs = array.array("Q", [BASE + i * P for i in range(100_000)])
    index.set_many(addrs, array.array("Q", range(100_000)))
    assert len(index) == 100_000
    assert index[BASE + 99_999 * P] == 99_999
    assert index.get_many([BASE, BASE + P, BASE - P]) == [0, 1, None]
    got_addrs, got_slots = index.export(BASE + 10 * P, BASE + 20 * P)
    assert list(got_addrs) == [BASE + i * P for i in range(10, 20)]
    assert list(got_slots) == list(range(10, 20))
    assert index.remove_range(BASE, BASE + 50_000 * P) == 50_000
    assert len(index) == 50_000 and BASE + 49_999 * P not in index and BASE + 50_000 * P in index


def test_clone_is_independent():
    parent = native.PageIndex()
    parent.update({BASE: 1, BASE + P: 2})
    child = parent.clone()
    parent[BASE] = 10
    del parent[BASE + P]
    child[BASE + 2 * P] = 3
    assert parent.items() == [(BASE, 10)]
    assert child.items() == [(BASE, 1), (BASE + P, 2), (BASE + 2 * P, 3)]


def test_set_many_skips_pages_changed_since():
    index = native.PageIndex()
    seq = index.change_seq
    index.remove_range(BASE + 2 * P, BASE + 4 * P)  # e.g. the process discarded pages 2-3
    index.move_range(BASE + 10 * P, BASE + 20 * P, 2 * P)  # and moved 10-11 to 20-21
    skipped = index.set_many([BASE + i * P for i in range(12)], range(12), unless_changed_since=seq)
    assert skipped == [BASE + i * P for i in (2, 3, 10, 11)]
    assert sorted(a for a, _ in index.items()) == [BASE + i * P for i in (0, 1, 4, 5, 6, 7, 8, 9)]
    assert index.set_many([BASE + 2 * P], [2], unless_changed_since=index.change_seq) == []
    assert index[BASE + 2 * P] == 2


def test_set_many_refuses_when_the_change_log_is_too_short():
    index = native.PageIndex()
    seq = index.change_seq
    for i in range(300):
        index.remove_range(BASE + i * P, BASE + (i + 1) * P)
    with pytest.raises(OSError) as exc:
        index.set_many([BASE + 1000 * P], [1], unless_changed_since=seq)
    assert exc.value.errno == errno.ESTALE
    assert len(index) == 0


def test_bad_input_is_refused_and_changes_nothing():
    index = native.PageIndex()
    index[BASE] = 1
    with pytest.raises(ValueError):
        index[BASE + 1] = 2
    with pytest.raises(ValueError):
        index[BASE] = -1
    with pytest.raises(ValueError):
        index.set_many([BASE + P, BASE + 7], [1, 2])  # all or nothing
    with pytest.raises(KeyError):
        del index[BASE + P]
    with pytest.raises(KeyError):
        index[BASE + P]
    assert index.items() == [(BASE, 1)]


def test_concurrent_writers_and_readers():
    index = native.PageIndex()

    def writer(k):
        for i in range(20_000):
            index[BASE + (k * 20_000 + i) * P] = i

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for _ in range(200):
        index.export()  # sorted snapshot while the table grows
    for t in threads:
        t.join()
    assert len(index) == 80_000


def test_checksums_travel_with_their_entries():
    index = native.PageIndex()
    index.set_many([BASE, BASE + P, BASE + 2 * P], [0, 1, 2], crcs=[7, 0, 2**32 - 1])
    index.set(BASE + 3 * P, 3)  # no checksum
    index.set(BASE + 4 * P, 4, crc=44)
    assert [index.get_crc(BASE + i * P) for i in range(6)] == [7, 0, 2**32 - 1, None, 44, None]
    index.move_range(BASE, BASE + 100 * P, 5 * P)  # mremap: checksums move along
    assert [index.get_crc(BASE + (100 + i) * P) for i in range(5)] == [7, 0, 2**32 - 1, None, 44]
    child = index.clone()
    assert child.get_crc(BASE + 104 * P) == 44
    index.set(BASE + 104 * P, 9)  # replaced without one: the old checksum is gone
    assert index.get_crc(BASE + 104 * P) is None and child.get_crc(BASE + 104 * P) == 44
    seq = index.change_seq
    index.remove_range(BASE + 100 * P, BASE + 101 * P)
    skipped = index.set_many(
        [BASE + 100 * P, BASE + 101 * P],
        [5, 6],
        crcs=array.array("I", [5, 6]),
        unless_changed_since=seq,
    )
    assert skipped == [BASE + 100 * P] and index.get_crc(BASE + 101 * P) == 6


def test_bad_checksums_are_refused():
    index = native.PageIndex()
    with pytest.raises(ValueError):
        index.set_many([BASE, BASE + P], [0, 1], crcs=[1])  # lengths differ
    with pytest.raises(ValueError):
        index.set(BASE, 0, crc=2**32)
    with pytest.raises(OverflowError):
        index.set_many([BASE], [0], crcs=[-1])
    assert len(index) == 0


def test_crc32_pages_is_zlibs_crc32():
    import os
    import zlib

    # Random pages, and pages that stress the folding (all ones, one bit set at either end).
    data = bytearray(os.urandom(2000 * P))
    specials = [b"\xff" * P, b"\x01" + bytes(P - 1), bytes(P - 1) + b"\x80", bytes(P)]
    data += b"".join(specials)
    got = native.crc32_pages(data)
    assert list(got) == [zlib.crc32(data[i * P : (i + 1) * P]) for i in range(2004)]
    data = bytearray(os.urandom(7 * P)) + bytes(P)
    got = native.crc32_pages(data)
    assert got.typecode == "I" and len(got) == 8
    assert list(got) == [zlib.crc32(data[i * P : (i + 1) * P]) for i in range(8)]
    assert list(native.crc32_pages(memoryview(data)[P:], 2)) == list(got[1:3])
    assert len(native.crc32_pages(b"")) == 0
    with pytest.raises(ValueError):
        native.crc32_pages(bytes(P), 2)
