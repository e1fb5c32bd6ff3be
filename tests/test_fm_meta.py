"""The metadata state (tree + file configurations) and its on-disk log."""

from __future__ import annotations

import errno
import json
import subprocess

import pytest

from gfvm.fm.meta import IN_SYNC, OUTDATED, ROOT, MetaError, MetaState, decode_name
from gfvm.fm.metalog import MetaLog


def run(st: MetaState, op: dict) -> dict:
    st.check(op)
    return st.apply(op)


def mk(st, parent, name, kind="mkdir", **extra):
    op = {"op": kind, "parent": parent, "name": name, "mode": 0o755, "ino": st.next_ino, "now": 1}
    if kind == "create":
        op.update(master="n1", members={"n1": IN_SYNC, "n2": IN_SYNC}, gen="g0", replicas=2)
    op.update(extra)
    return run(st, op)["ino"]


def test_tree_operations_and_errors():
    st = MetaState()
    d = mk(st, ROOT, "procs")
    f = mk(st, d, "pages", "create")
    assert st.resolve("/procs/pages").ino == f
    assert st.get(f).mode == 0o700  # files never readable by others
    with pytest.raises(MetaError) as e:
        mk(st, d, "pages", "create")
    assert e.value.errno == errno.EEXIST
    with pytest.raises(MetaError) as e:
        st.check({"op": "rmdir", "parent": ROOT, "name": "procs"})
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(MetaError) as e:
        st.check({"op": "unlink", "parent": ROOT, "name": "procs"})
    assert e.value.errno == errno.EISDIR
    run(st, {"op": "rename", "parent": d, "name": "pages", "newparent": ROOT, "newname": "p2", "now": 2})
    assert st.path_of(f) == "/p2"
    run(st, {"op": "unlink", "parent": ROOT, "name": "p2", "now": 3})
    with pytest.raises(MetaError) as e:
        st.resolve("p2")
    assert e.value.errno == errno.ENOENT


def test_rename_into_own_subtree_refused():
    st = MetaState()
    a = mk(st, ROOT, "a")
    b = mk(st, a, "b")
    with pytest.raises(MetaError) as e:
        st.check({"op": "rename", "parent": ROOT, "name": "a", "newparent": b, "newname": "x"})
    assert e.value.errno == errno.EINVAL


def test_rename_noreplace_and_replace():
    st = MetaState()
    mk(st, ROOT, "x", "create")
    y = mk(st, ROOT, "y", "create")
    with pytest.raises(MetaError):
        st.check({"op": "rename", "parent": ROOT, "name": "x", "newparent": ROOT, "newname": "y", "noreplace": True})
    r = run(st, {"op": "rename", "parent": ROOT, "name": "x", "newparent": ROOT, "newname": "y", "now": 1})
    assert r["removed"]["ino"] == y


@pytest.mark.parametrize("bad", [b"a/b", b"..", b".", b"x" * 256, b"\xff\xfe", b"tab\there", b""])
def test_bad_names_refused(bad):
    with pytest.raises(MetaError):
        decode_name(bad)


def test_config_is_compare_and_set_and_keeps_master_in_sync():
    st = MetaState()
    f = mk(st, ROOT, "f", "create")
    e = st.get(f)
    good = {"op": "config", "ino": f, "epoch": 2, "master": "n2", "members": {"n1": IN_SYNC, "n2": IN_SYNC},
            "expect_epoch": 1, "expect_members": dict(e.members)}
    st.check(good)
    stale = dict(good, expect_epoch=0)
    with pytest.raises(MetaError) as ex:
        st.check(stale)
    assert ex.value.errno == errno.ESTALE
    with pytest.raises(MetaError):
        st.check(dict(good, members={"n1": IN_SYNC, "n2": OUTDATED}))  # master must be in sync
    with pytest.raises(MetaError):
        st.check(dict(good, epoch=1))  # a new master needs a new epoch
    run(st, dict(good, gen="g1"))
    assert st.get(f).master == "n2" and st.get(f).gens == ["g0", "g1"]


def test_snapshot_roundtrip():
    st = MetaState()
    d = mk(st, ROOT, "d")
    mk(st, d, "f", "create")
    st2 = MetaState.from_dict(json.loads(json.dumps(st.to_dict())))
    assert st2.path_of(st.resolve("d/f").ino) == "/d/f"
    assert st2.next_ino == st.next_ino


def test_metalog_replays_ops_and_ignores_torn_tail(tmp_path):
    log = MetaLog(tmp_path)
    st = MetaState()
    ops = []
    for i in range(5):
        op = {"op": "mkdir", "parent": ROOT, "name": f"d{i}", "mode": 0o700, "ino": st.next_ino, "now": i}
        st.check(op)
        st.apply(op)
        log.append(1, i + 1, op)
        ops.append(op)
    log.close()
    with open(log.log_path, "ab") as f:
        f.write(b'{"t":1,"v":6,"op":{"op":"mkd')  # crash in the middle of an append
    st2, last, term, voted = MetaLog(tmp_path).load()
    assert last == (1, 5)
    assert sorted(st2.children[ROOT]) == [f"d{i}" for i in range(5)]
    log3 = MetaLog(tmp_path)
    log3.load()
    op = {"op": "mkdir", "parent": ROOT, "name": "d5", "mode": 0o700, "ino": st2.next_ino, "now": 9}
    log3.append(1, 6, op)  # appending after a torn tail must not glue onto it
    log3.close()
    st4, last4, _, _ = MetaLog(tmp_path).load()
    assert last4 == (1, 6) and "d5" in st4.children[ROOT]


def test_metalog_snapshot_then_compaction(tmp_path):
    log = MetaLog(tmp_path)
    st = MetaState()
    op = {"op": "mkdir", "parent": ROOT, "name": "a", "mode": 0o700, "ino": st.next_ino, "now": 0}
    st.apply(op)
    log.append(1, 1, op)
    log.save_snapshot(st, (1, 1))
    log.save_vote(4, "n2")
    st2, last, term, voted = MetaLog(tmp_path).load()
    assert last == (1, 1) and "a" in st2.children[ROOT] and term == 4 and voted == "n2"



def _mkdir_op(st: MetaState, name: str, pad: int = 0) -> dict:
    # a long name makes a long line: the small disk then fills in the middle of one
    op = {"op": "mkdir", "parent": ROOT, "name": name + "-" * pad, "mode": 0o700,
          "ino": st.next_ino, "now": 0}
    st.check(op)
    return op


def test_metalog_append_on_a_full_disk_is_all_or_nothing(tmp_path):
    """A full disk takes part of a line and fails on the rest: the append raises ENOSPC and
    leaves the log as it was, and once there is room again the next lines are kept whole.
    (Before, the short write went unnoticed: the op counted as logged, and the next line
    glued onto the torn one, so load dropped both and every line after them.)"""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    try:
        log = MetaLog(mnt)
        filler = mnt / "filler"
        filler.write_bytes(b"x" * 16384)  # deleted later to make room again
        st = MetaState()
        acked: list[str] = []
        for i in range(1000):
            op = _mkdir_op(st, f"d{i}", pad=200)
            try:
                log.append(1, len(acked) + 1, op)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
            st.apply(op)
            acked.append(op["name"])
        else:
            pytest.fail("the 64 KiB disk never filled up")
        assert acked
        data = log.log_path.read_bytes()
        assert data.endswith(b"\n") and data.count(b"\n") == len(acked), "a torn line was left"
        filler.unlink()
        for name in ("again", "after"):
            op = _mkdir_op(st, name)
            log.append(1, len(acked) + 1, op)
            st.apply(op)
            acked.append(name)
        log.close()
        st2, last, _, _ = MetaLog(mnt).load()
        assert last == (1, len(acked))
        assert sorted(st2.children[ROOT]) == sorted(acked)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
