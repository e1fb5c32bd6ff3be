"""RELIABILITY.md promise 1, checked the hard way: when `write_pages` + `fsync` return on the
master, every replica the File Manager calls in sync already holds exactly those bytes.

The workload is the pager's (gfvmd's `fm.bench_pages` op, through FmBacking from a worker
thread): batches of 256..4096 pages at random slots of a paging file, fsync, then one record
appended to an index file and fsynced (docs/paging-file.md I1). After every round the test reads
the data file of each in-sync copy straight from its node's store (on the host side, no File
Manager in between) and compares it with what was acknowledged. With and without n1's link
impaired (delay, jitter, loss: the migration test's row-9 settings)."""

from __future__ import annotations

import os
import random
import shutil
import time

import pytest

from gfvm import control
from gfvm.fm.component import bench_page, bench_record

PAGES = "procs/acked/pages"
INDEX = "procs/acked/index"
ROUNDS = 25  # acknowledged rounds checked
BUDGET_S = 180  # at most this long (a round that fails is not acknowledged: nothing to check)


def _call(c, node, op, args, timeout=120):
    return control.call(c.control_socket(node), op, args, timeout=timeout)


def _copy(c, node: str, fid: int) -> bytes:
    """The bytes of `node`'s copy of file `fid`, read from its store on the host side."""
    path = c.dirs(node).state / "fm" / "files" / str(fid) / "data"
    with open(path, "rb") as f:
        return f.read()


def _wait_ready(c, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            sts = [_call(c, n, "fm.status", {}, timeout=10) for n in c.nodes]
            if len({s["leader"] for s in sts}) == 1 and all(s["lease"] and s["leader"] for s in sts):
                return
        except (control.RemoteError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError("no metadata leader")
        time.sleep(0.2)


@pytest.mark.parametrize("impaired", [False, True], ids=["clean", "impaired"])
def test_fsynced_pages_are_on_every_in_sync_replica(make_cluster, impaired):
    if impaired and shutil.which("iptables") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("iptables is missing")
        pytest.skip("iptables is missing")
    c = make_cluster(3, replicas=2)
    _wait_ready(c)
    rng = random.Random(1234 + impaired)
    slots: dict[int, int] = {}  # slot -> seed of the acknowledged content
    records: dict[int, bytes] = {}  # offset in the index -> acknowledged record
    problems: list[str] = []
    checked = failed = 0
    if impaired:
        c.impair("n1", delay_ms=20, jitter_ms=10, loss_pct=1, seed=7)
    try:
        rnd = 0
        t0 = time.monotonic()
        while rnd - failed < ROUNDS and time.monotonic() - t0 < BUDGET_S:
            rnd += 1
            seed = rnd
            first = rng.randrange(0, 4096)
            pages = rng.randint(256, 2048)
            batch = rng.randint(256, 1024)
            try:
                r = _call(c, "n1", "fm.bench_pages", {"path": PAGES, "index_path": INDEX, "seed": seed,
                                                       "first_slot": first, "pages": pages,
                                                       "batch_pages": batch, "threads": 2})
            except control.RemoteError as exc:
                # not acknowledged (EIO: too few in-sync copies for a while): those pages may
                # hold the old or the new bytes anywhere, so they are not checked any more
                failed += 1
                print(f"round {rnd}: not acknowledged: {exc}")
                for s in range(first, first + pages):
                    slots.pop(s, None)
                time.sleep(1)
                continue
            for s in range(first, first + pages):
                slots[s] = seed
            records[r["index_size"] - 64] = bench_record(seed, first, pages)
            # acknowledged: every copy in sync now must hold all of it
            for path, check in ((PAGES, "pages"), (INDEX, "index")):
                w = _call(c, "n1", "fm.where", {"path": path}, timeout=10)
                for node in w["in_sync"]:
                    data = _copy(c, node, w["fid"])
                    checked += 1
                    if check == "index":
                        have = sum(1 for o, rec in records.items() if data[o : o + 64] == rec)
                        if have != len(records):
                            problems.append(f"round {rnd}: {node}'s index copy holds {have} of "
                                            f"{len(records)} acknowledged records ({len(data)} bytes)")
                        continue
                    bad = [s for s, sd in slots.items() if data[s * 4096 : (s + 1) * 4096] != bench_page(sd, s)]
                    if bad:
                        problems.append(f"round {rnd}: {node}'s pages copy ({len(data)} bytes) lacks "
                                        f"{len(bad)} of {len(slots)} acknowledged pages (first: slot {min(bad)})")
            if problems:
                break
    finally:
        if impaired:
            c.impair("n1")
        if problems or rnd - failed < 5:
            for node in c.nodes:
                print(f"===== gfvmd log of {node}\n{c.daemon_log(node).read_text(errors='replace')[-20000:]}")
    assert not problems, "\n".join(problems)
    assert rnd - failed >= 5, f"only {rnd - failed} of {rnd} rounds acknowledged"
    assert checked >= (rnd - failed) * 2


async def test_member_late_while_catching_up_is_not_silently_left_out(tmp_path):
    """A replica being resynced is late with an ack (a write sent while it was catching up, its
    frame applied after write_timeout) while its resync's last frames are already out. Whatever
    the master then does, a replica it calls in sync must hold every write acknowledged after
    that: here the master once stopped sending it frames (the late write only took it off the
    list of targets) and still marked it in sync when the resync finished."""
    import trio

    from test_fm_api import trio_cluster

    def pages(tag: int, first: int, n: int) -> tuple[list[int], bytes]:
        return [s * 4096 for s in range(first, first + n)], b"".join(bench_page(tag, s) for s in range(first, first + n))

    async with trio_cluster(tmp_path, 3, replicas=2) as files:
        n1 = files["n1"]
        fm1 = n1.fm
        f = await n1.open("f", create=True)
        await f.write_pages(*pages(1, 0, 1024))
        await f.fsync()
        where = await n1.where("f")
        fid = where["fid"]
        (r,) = [n for n in where["in_sync"] if n != "n1"]
        fmr = files[r].fm
        expected = {s: 1 for s in range(1024)}
        # the resync's first chunk waits a little, so writes go to r while it is catching up
        fm1.faults.arm("resync.chunk", "delay:0.5")
        # r's next frame is late: r is dropped (outdated), then resynced
        fmr.faults.arm("member.before_apply", "delay:1.5")

        async def rearm_when_catching_up():
            while fm1.files[fid].targets.get(r) != "catching_up":
                await trio.sleep(0.005)
            # late again while catching up: a write's frame to r misses its deadline
            fmr.faults.arm("member.before_apply", "delay:1.5")

        async with trio.open_nursery() as n:
            n.start_soon(rearm_when_catching_up)
            await f.write_pages(*pages(2, 0, 256))
        expected.update({s: 2 for s in range(256)})
        for tag in range(3, 9):
            with trio.fail_after(30):
                await f.write_pages(*pages(tag, 256 * (tag - 2), 256))
                await f.fsync()
            expected.update({s: tag for s in range(256 * (tag - 2), 256 * (tag - 1))})
            e = fm1.file_entry(fid)
            if e.members.get(r) != "in_sync":
                continue
            data = (fmr.store.path_of(fid) / "data").read_bytes()
            bad = [s for s, t in expected.items() if data[s * 4096 : (s + 1) * 4096] != bench_page(t, s)]
            assert not bad, (f"after write {tag}: {r} is in sync but lacks {len(bad)} acknowledged pages "
                             f"(first: slot {min(bad)}); n1 sends it frames: {r in fm1.files[fid].targets}")
        # r must end up in sync (and then hold everything)
        with trio.fail_after(30):
            while fm1.file_entry(fid).members.get(r) != "in_sync":
                await trio.sleep(0.05)
        await f.fsync()
        data = (fmr.store.path_of(fid) / "data").read_bytes()
        assert all(data[s * 4096 : (s + 1) * 4096] == bench_page(t, s) for s, t in expected.items())
