"""RangeMap (what an address space still waits for, and from which dump address) against a
page-by-page reference model, under random sequences of serve/unmap/remap operations."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gfvm.migrate.rangemap import RangeMap

P = 4096


def model_of(rm: RangeMap) -> dict[int, int]:
    """page address -> origin page address, expanded from the map."""
    out = {}
    for start, end, origin in rm:
        assert start < end and start % P == 0 and end % P == 0
        for a in range(start, end, P):
            out[a] = origin + (a - start)
    return out


def check_invariants(rm: RangeMap) -> None:
    entries = list(rm)
    for (s1, e1, _), (s2, _, _) in zip(entries, entries[1:]):
        assert e1 <= s2


pages = st.integers(min_value=0, max_value=63).map(lambda i: i * P)
spans = st.tuples(pages, st.integers(min_value=1, max_value=16).map(lambda n: n * P))
ops = st.lists(st.tuples(st.sampled_from(["remove", "move", "find"]), spans, pages), max_size=30)


@given(ops)
@settings(max_examples=300, deadline=None)
def test_matches_a_page_model(operations):
    rm = RangeMap.identity([(0, 16 * P), (20 * P, 40 * P), (48 * P, 64 * P)])
    model = model_of(rm)
    for op, (start, length), dst in operations:
        end = start + length
        if op == "remove":
            dropped = rm.remove(start, end)
            gone = [a for a in model if start <= a < end]
            assert dropped == len(gone) * P
            for a in gone:
                del model[a]
        elif op == "move":
            if dst < end and start < dst + length:
                continue  # mremap never moves onto an overlapping range
            moved = {a - start + dst: model.pop(a) for a in list(model) if start <= a < end}
            for a in [a for a in model if dst <= a < dst + length]:
                del model[a]
            model.update(moved)
            rm.move(start, dst, length)
        else:
            hit = rm.find(start)
            if start in model:
                assert hit is not None and hit[2] + (start - hit[0]) == model[start]
            else:
                assert hit is None
        check_invariants(rm)
        assert model_of(rm) == model
        assert rm.total_bytes == len(model) * P


def test_copy_is_independent():
    a = RangeMap.identity([(0, 4 * P)])
    b = a.copy()
    b.remove(0, P)
    assert a.total_bytes == 4 * P and b.total_bytes == 3 * P


def test_next_at_or_after():
    rm = RangeMap.identity([(P, 2 * P), (5 * P, 6 * P)])
    assert rm.next_at_or_after(0) == (P, 2 * P, P)
    assert rm.next_at_or_after(P) == (P, 2 * P, P)
    assert rm.next_at_or_after(2 * P) == (5 * P, 6 * P, 5 * P)
    assert rm.next_at_or_after(6 * P) is None


def test_overlapping_add_is_refused():
    rm = RangeMap.identity([(0, 4 * P)])
    try:
        rm.add(3 * P, 5 * P, 0)
    except ValueError:
        return
    raise AssertionError("overlap accepted")
