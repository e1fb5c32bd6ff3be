"""The paging file format: round trips, torn tails, compaction, and crash safety.

Crash safety is checked against a simulated disk (`SimDisk`): writes stay volatile until fsync,
and a crash keeps an arbitrary subset of the volatile writes (as a real disk may). A real power
loss cannot be produced here, so this is where the ordering invariants of pagefile.py are
exercised.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gfvm.pager.backing import PAGE_SIZE, LocalBacking
from gfvm.pager.pagefile import (
    HEADER,
    RECORD,
    PagingFile,
    PagingFileError,
    load_index,
)


def page(tag: int) -> bytes:
    """A recognisable page: its tag repeated."""
    return tag.to_bytes(8, "little") * (PAGE_SIZE // 8)


def write(pf: PagingFile, asid: int, items: dict[int, int]) -> None:
    vpages = list(items)
    data = memoryview(b"".join(page(items[v]) for v in vpages))
    staged = pf.stage(asid, vpages, data)
    pf.sync_pages()
    pf.put(staged)


def test_round_trip_local(tmp_path):
    backing = LocalBacking(tmp_path)
    pf = PagingFile.create(backing, "procs/a1", {"id": "a1", "name": "x"})
    write(pf, 2, {0x400: 1, 0x401: 2, 0x7F00: 3})
    write(pf, 3, {0x400: 4})
    pf.commit()
    pf.close()
    pf = PagingFile.open(backing, "procs/a1")
    assert pf.read_page(2, 0x400) == page(1)
    assert pf.read_page(2, 0x7F00) == page(3)
    assert pf.read_page(3, 0x400) == page(4)
    assert pf.read_page(3, 0x401) is None
    assert pf.read_meta()["name"] == "x"
    assert sorted(load_index(backing, "procs/a1").entries(2)) == [0x400, 0x401, 0x7F00]
    pf.close()


def test_overwrite_never_reuses_live_slot(tmp_path):
    pf = PagingFile.create(LocalBacking(tmp_path), "p", {"id": "p"})
    write(pf, 1, {10: 1})
    pf.commit()
    old_slot, _ = pf.index.lookup(1, 10)
    write(pf, 1, {10: 2})
    new_slot, _ = pf.index.lookup(1, 10)
    assert new_slot != old_slot
    # before the commit the old slot is not reusable; after it, it is
    staged = pf.stage(1, [11], memoryview(page(3)))
    assert old_slot not in staged.slots
    pf.sync_pages()
    pf.put(staged)
    pf.commit()
    staged = pf.stage(1, [12], memoryview(page(4)))
    assert staged.slots == [old_slot]
    pf.close()


def test_torn_tail_is_cut(tmp_path):
    backing = LocalBacking(tmp_path)
    pf = PagingFile.create(backing, "p", {"id": "p"})
    write(pf, 1, {1: 1, 2: 2})
    pf.commit()
    pf.close()
    index_path = tmp_path / "p" / "index"
    good_size = os.path.getsize(index_path)
    with open(index_path, "ab") as f:
        f.write(b"\x01" * (RECORD.size // 2))  # half a record
    pf = PagingFile.open(backing, "p")
    assert os.path.getsize(index_path) == good_size
    write(pf, 1, {3: 3})
    pf.commit()
    pf.close()
    pf = PagingFile.open(backing, "p")
    assert [pf.read_page(1, v) for v in (1, 2, 3)] == [page(1), page(2), page(3)]
    pf.close()


def test_corrupt_page_is_detected(tmp_path):
    backing = LocalBacking(tmp_path)
    pf = PagingFile.create(backing, "p", {"id": "p"})
    write(pf, 1, {5: 7})
    pf.commit()
    slot, _ = pf.index.lookup(1, 5)
    with open(tmp_path / "p" / "pages", "r+b") as f:
        f.seek(slot * PAGE_SIZE + 100)
        f.write(b"X")
    with pytest.raises(PagingFileError, match="checksum"):
        pf.read_page(1, 5)
    pf.close()


def test_bad_header_is_refused(tmp_path):
    backing = LocalBacking(tmp_path)
    PagingFile.create(backing, "p", {"id": "p"}).close()
    with open(tmp_path / "p" / "index", "r+b") as f:
        f.write(b"NOTGFVM!")
    with pytest.raises(PagingFileError, match="magic"):
        PagingFile.open(backing, "p")


def test_events_drop_move_clone_forget(tmp_path):
    backing = LocalBacking(tmp_path)
    pf = PagingFile.create(backing, "p", {"id": "p"})
    write(pf, 1, {v: v for v in range(100, 110)})
    pf.drop(1, 102, 2)
    pf.move(1, 105, 200, 3)
    pf.clone(1, 9)
    write(pf, 1, {100: 999})
    pf.forget(1)
    pf.commit()
    pf.close()
    idx = load_index(backing, "p")
    assert idx.entries(1) == {}
    assert sorted(idx.entries(9)) == [100, 101, 104, 108, 109, 200, 201, 202]
    pf = PagingFile.open(backing, "p")
    assert pf.read_page(9, 100) == page(100)
    assert pf.read_page(9, 201) == page(106)
    pf.close()


def test_compaction_keeps_entries_and_shrinks_log(tmp_path, monkeypatch):
    import gfvm.pager.pagefile as pfmod

    monkeypatch.setattr(pfmod, "COMPACT_MIN_RECORDS", 50)
    backing = LocalBacking(tmp_path)
    pf = PagingFile.create(backing, "p", {"id": "p"})
    for round_ in range(30):
        write(pf, 1, {v: round_ * 100 + v for v in range(5)})
        pf.commit()
    assert pf.generation >= 1
    assert pf.stats()["log_records"] <= 55  # not 150: compacted
    assert os.path.getsize(tmp_path / "p" / "index") < 11 * (RECORD.size + 128) + HEADER.size
    assert pf.stats()["slots"] <= 15  # slots are reused, the pages file does not grow forever
    pf.close()
    pf = PagingFile.open(backing, "p")
    assert [pf.read_page(1, v) for v in range(5)] == [page(2900 + v) for v in range(5)]
    pf.close()


# --- crash safety on a simulated disk ----------------------------------------------------------


class SimFile:
    def __init__(self, disk: SimDisk, name: str) -> None:
        self.disk, self.name = disk, name

    def write_pages(self, offsets, data):
        for i, off in enumerate(offsets):
            self.pwrite(bytes(data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]), off)

    def pwrite(self, data, offset):
        # in record-sized pieces, so that a crash can keep any subset of them (torn appends)
        ops = self.disk.pending.setdefault(self.name, [])
        for i in range(0, len(data), RECORD.size):
            ops.append(("w", offset + i, bytes(data[i : i + RECORD.size])))

    def _current(self) -> bytearray:
        buf = bytearray(self.disk.durable.get(self.name, b""))
        for op in self.disk.pending.get(self.name, []):
            _apply(buf, op)
        return buf

    def pread(self, length, offset):
        return bytes(self._current()[offset : offset + length])

    def fsync(self):
        if self.name.endswith("index") and self.disk.fail_next_index_fsync:
            self.disk.fail_next_index_fsync = False
            raise Crash()
        self.disk.durable[self.name] = bytes(self._current())
        self.disk.pending[self.name] = []

    def size(self):
        return len(self._current())

    def truncate(self, size):
        self.disk.pending.setdefault(self.name, []).append(("t", size, b""))

    def local_read_fd(self):
        return -1

    def close(self):
        pass


def _apply(buf: bytearray, op) -> None:
    kind, off, data = op
    if kind == "t":
        del buf[off:]
        buf.extend(bytes(max(0, off - len(buf))))
    else:
        if len(buf) < off:
            buf.extend(bytes(off - len(buf)))
        buf[off : off + len(data)] = data


class SimDisk:
    """A PagingBacking whose writes are volatile until fsync; `crash` keeps a random subset."""

    def __init__(self) -> None:
        self.durable: dict[str, bytes] = {}
        self.pending: dict[str, list] = {}
        self.fail_next_index_fsync = False

    def open(self, rel, *, create=False):
        if rel not in self.durable and rel not in self.pending:
            if not create:
                raise FileNotFoundError(rel)
            self.durable[rel] = b""
        return SimFile(self, rel)

    def read_file(self, rel):
        return bytes(SimFile(self, rel)._current())

    def replace(self, rel, data):
        self.durable[rel] = bytes(data)
        self.pending[rel] = []

    def exists(self, rel):
        return rel in self.durable

    def makedirs(self, rel):
        pass

    def remove_tree(self, rel):
        pass

    def crash(self, rng: random.Random) -> None:
        for name, ops in self.pending.items():
            buf = bytearray(self.durable.get(name, b""))
            for op in ops:
                if rng.random() < 0.5:
                    _apply(buf, op)
            self.durable[name] = bytes(buf)
        self.pending = {}


class Crash(Exception):
    pass


KINDS = [
    "write",
    "write",
    "write",
    "write",
    "commit",
    "crash",
    "crash_in_commit",
    "drop",
    "move",
    "clone",
    "forget",
]
ops = st.lists(
    st.tuples(
        st.sampled_from(KINDS),
        st.integers(1, 2),
        st.integers(0, 3),
        st.integers(0, 3),
        st.integers(1, 3),
    ),
    max_size=40,
)


def _decode(op):
    """Turns a generated (kind, asid, x, y, n) into the operation's arguments."""
    kind, asid, x, y, n = op
    if kind == "write":
        return kind, asid, sorted({x, (x + y) % 4} if y else {x})
    if kind == "drop":
        return kind, asid, x, n
    if kind == "move":
        return kind, asid, x, 4 + y, n
    if kind == "clone":
        return kind, asid, 3 + y % 2
    if kind == "forget":
        return kind, asid + 2 * (y % 2)
    return (kind,)


def _snapshot(model):
    return {a: dict(s) for a, s in model.items() if s}


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.integers(0, 2**32))
def test_crash_never_exposes_wrong_data(script, seed):
    """After a crash at any point (including halfway through a commit, with any subset of the
    unsynced writes reaching the disk), the reopened index equals the state after the last commit
    plus a prefix of the records that followed it, and every entry reads back its exact bytes."""
    rng = random.Random(seed)
    disk = SimDisk()
    pf = PagingFile.create(disk, "p", {"id": "p"})
    model: dict[int, dict[int, int]] = {}  # asid -> vpage -> tag, as of now
    history = [_snapshot(model)]  # state at the last commit, then after each buffered record
    tag = 0
    for op in map(_decode, script):
        if op[0] == "write":
            _, asid, vpages = op
            items = {}
            for v in vpages:
                tag += 1
                items[v] = tag
            write(pf, asid, items)
            for v, t in items.items():
                model.setdefault(asid, {})[v] = t
                history.append(_snapshot(model))
        elif op[0] == "drop":
            _, asid, v, n = op
            pf.drop(asid, v, n)
            for x in range(v, v + n):
                model.get(asid, {}).pop(x, None)
        elif op[0] == "move":
            _, asid, src, dst, n = op
            pf.move(asid, src, dst, n)
            space = model.get(asid, {})
            for x in range(dst, dst + n):
                space.pop(x, None)
            moved = {x - src + dst: space.pop(x) for x in range(src, src + n) if x in space}
            space.update(moved)
        elif op[0] == "clone":
            _, parent, child = op
            pf.clone(parent, child)
            model[child] = dict(model.get(parent, {}))
        elif op[0] == "forget":
            pf.forget(op[1])
            model.pop(op[1], None)
        elif op[0] == "commit":
            pf.commit()
            history = [_snapshot(model)]
            continue
        if op[0] in ("drop", "move", "clone", "forget"):
            history.append(_snapshot(model))
        if op[0].startswith("crash"):
            candidates = [history[0]]
            if op[0] == "crash_in_commit" and pf.uncommitted:
                disk.fail_next_index_fsync = True
                with pytest.raises(Crash):
                    pf.commit()
                candidates = history
            disk.crash(rng)
            pf = PagingFile.open(disk, "p")
            recovered = {
                a: {v: _tag_of(pf.read_page(a, v)) for v in s}
                for a, s in pf.index.spaces.items()
                if s
            }
            assert recovered in candidates
            model = {a: dict(s) for a, s in recovered.items()}
            history = [_snapshot(model)]


def _tag_of(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


def test_held_paging_file_writes_nothing(tmp_path):
    """A held paging file (a migration target before its commit point): commit keeps its
    records buffered, page writes and compaction are refused; closing while held loses the
    buffered records; after the hold, commit writes them."""
    backing = LocalBacking(tmp_path)
    pf = PagingFile.create(backing, "p", {"id": "p"})
    write(pf, 2, {0x400: 1, 0x401: 2})
    pf.commit()
    pf.close()
    files = {n: (tmp_path / "p" / n).read_bytes() for n in ("index", "pages")}
    pf = PagingFile.open(backing, "p")
    pf.held = True
    pf.drop(2, 0x400, 1)
    pf.commit()
    with pytest.raises(PagingFileError):
        pf.stage(2, [0x402], memoryview(page(3)))
    with pytest.raises(PagingFileError):
        pf.compact()
    assert {n: (tmp_path / "p" / n).read_bytes() for n in files} == files
    pf.held = False
    pf.commit()
    pf.close()
    assert sorted(load_index(backing, "p").entries(2)) == [0x401]
