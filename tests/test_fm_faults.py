"""RELIABILITY.md fault matrix, rows that need no link cuts (gfvmd processes on loopback):
each row is its own test, driven by SIGKILL/SIGSTOP and the daemons' named fault points."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time

import pytest

from test_fm_harness import (
    Cluster,
    Writer,
    arm,
    check_records,
    masters_per_epoch,
    page,
    wait_for,
    write_file,
)


def fsync_write(path, offset, data):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_bytes(node, fid):
    """The bytes of `node`'s copy as stored (data file), read directly."""
    return (node.copy_dir(fid) / "data").read_bytes()


def one_master_per_epoch(cluster, fid):
    per = masters_per_epoch(cluster, fid)
    assert all(len(v) == 1 for v in per.values()), per


def test_row1_replica_killed_during_writes_resyncs_by_bitmap(tmp_path):
    c = Cluster(tmp_path, 3, replicas=3, fm={"rereplicate_after": 120})
    try:
        n1, n2, n3 = c.nodes
        w = Writer(n1.mount / "f", every=4)
        w.start()
        wait_for(lambda: w.acked >= 32, 30, what="first records")
        n3.kill(signal.SIGKILL)
        before = w.acked
        wait_for(lambda: w.acked >= before + 64, 30, what="writes to continue on n1+n2")
        assert n1.where("f")["members"]["n3"]["state"] == "outdated"
        n3.start()
        assert not n3.where("f")["local"]["readable"]  # not read from until in sync
        wait_for(lambda: "n3" in n1.where("f")["in_sync"], 30, what="n3 back in sync")
        w.stop()
        assert w.error is None
        fid = n1.where("f")["fid"]
        assert "incremental resync of n3" in n1.log.read_text()
        data = (n3.mount / "f").read_bytes()
        assert check_records(data, w.acked) == []
        n1.call("fm.status")
        assert copy_bytes(n3, fid)[: len(data)] == copy_bytes(n1, fid)[: len(data)]
    finally:
        c.close()


def test_row2_master_crashes_after_local_write_receives_hot_extents(tmp_path):
    c = Cluster(tmp_path, 3, replicas=2, fm={"auto_failover": False})
    try:
        n1 = c["n1"]
        for i in range(16):
            fsync_write(n1.mount / "f", i * 4096, page(i))
        w = n1.where("f")
        replica = next(c[n] for n in w["members"] if n != "n1")
        arm(n1, "master.after_local_write", "crash")
        with pytest.raises(OSError):
            fsync_write(n1.mount / "f", 16 * 4096, page(16))  # applied on n1 only, never acked
        n1.proc.wait(10)
        n1.unmount()
        n1.start()
        wait_for(lambda: n1.where("f")["local"]["readable"], 30, what="n1 to serve again")
        data = (n1.mount / "f").read_bytes()
        assert check_records(data, 16) == []
        assert "restarted master took" in n1.log.read_text()
        fsync_write(n1.mount / "f", 17 * 4096, page(17))
        a, b = copy_bytes(n1, w["fid"]), copy_bytes(replica, w["fid"])
        assert a == b  # the copies are identical again
        one_master_per_epoch(c, w["fid"])
    finally:
        c.close()


def test_row3_master_node_dies_replica_promoted_and_writable(tmp_path):
    c = Cluster(tmp_path, 3, replicas=2, fm={"rereplicate_after": 120})
    try:
        n1 = c["n1"]
        w = Writer(n1.mount / "f", every=4)
        w.start()
        wait_for(lambda: w.acked >= 40, 30, what="records")
        info = n1.where("f")
        replica = next(c[n] for n in info["members"] if n != "n1")
        n1.kill(signal.SIGKILL)
        w.stop()
        wait_for(lambda: replica.where("f")["master"] == replica.name, 30, what="automatic failover")
        after = replica.where("f")
        assert after["epoch"] == info["epoch"] + 1
        assert check_records((replica.mount / "f").read_bytes(), w.acked) == []
        # the process could be restarted there: its file takes writes (a third copy is made)
        fsync_write(replica.mount / "f", 0, page(0, salt=5))
        assert (replica.mount / "f").read_bytes()[:4096] == page(0, salt=5)
        one_master_per_epoch(c, info["fid"])
    finally:
        c.close()


def test_row6_paused_master_is_fenced_and_demotes_itself(tmp_path):
    c = Cluster(tmp_path, 3, replicas=2, fm={"rereplicate_after": 120})
    try:
        n1 = c["n1"]
        write_file(n1.mount / "f", b"")
        info = n1.where("f")
        outsider = next(n for n in c.nodes if n.name not in info["members"])
        replica = next(c[n] for n in info["members"] if n != "n1")
        w = Writer(outsider.mount / "f", every=2, pause=0.01)
        w.start()
        wait_for(lambda: w.acked >= 16, 30, what="records")
        n1.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: replica.where("f")["master"] == replica.name, 30, what="failover")
            acked_at_failover = w.acked
            wait_for(lambda: w.acked >= acked_at_failover + 16, 30, what="writes on the new master")
        finally:
            n1.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: n1.where("f")["master"] == replica.name, 30, what="n1 to learn it was demoted")
        time.sleep(1.0)
        w.stop()
        assert w.error is None
        assert check_records((replica.mount / "f").read_bytes(), w.acked) == []
        got = (n1.mount / "f").read_bytes()
        assert check_records(got, w.acked) == [], (len(got), got[:64], n1.where("f"))
        one_master_per_epoch(c, info["fid"])
    finally:
        c.close()


def test_row7_rolling_failures_never_promote_a_stale_copy(tmp_path):
    c = Cluster(tmp_path, 3, replicas=3, fm={"min_copies": 1, "rereplicate_after": 120,
                                             "io_timeout": 4.0})
    try:
        n1, n2, n3 = c.nodes
        write_file(n1.mount / "f", os.urandom(24 << 20))
        n3.kill(signal.SIGKILL)
        fsync_write(n1.mount / "f", 0, page(1))  # n3 misses this
        arm(n1, "resync.chunk", "delay:0.5*")  # every resync crawls: nodes die in the middle
        n3.start()
        wait_for(lambda: "resync of n3" in n1.log.read_text(), 30, what="n3's resync to start")
        n2.kill(signal.SIGKILL)
        fsync_write(n1.mount / "f", 4096, page(2))  # acknowledged by n1 alone (min_copies=1)
        n2.start()
        wait_for(lambda: "resync of n2" in n1.log.read_text(), 30, what="n2's resync to start")
        info = n1.where("f")
        assert info["in_sync"] == ["n1"], info
        n1.kill(signal.SIGKILL)
        # n2 and n3 both miss acknowledged writes: neither may become master
        time.sleep(c.config.sections["fm"]["failover_after"] * 3)
        after = n2.where("f")
        assert after["master"] == "n1" and after["epoch"] == info["epoch"], after
        with pytest.raises(OSError) as exc:
            (n2.mount / "f").read_bytes()
        assert exc.value.errno == 5  # EIO: unavailable, never stale data, never ENOENT
        r = subprocess.run([os.sys.executable, "-m", "gfvm", "fm", "promote", "f", "n2"],
                           env=n2.env, capture_output=True, text=True)
        assert r.returncode != 0 and "stale" in r.stderr, r.stderr
    finally:
        c.close()


def flip_bit(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x04]))
        f.flush()
        os.fsync(f.fileno())


def test_row12_bit_flip_on_a_replica_is_caught_and_refetched(tmp_path):
    c = Cluster(tmp_path, 3, replicas=2)
    try:
        n1 = c["n1"]
        data = os.urandom(3 << 20)
        write_file(n1.mount / "f", data)
        info = n1.where("f")
        replica = next(c[n] for n in info["members"] if n != "n1")
        flip_bit(replica.copy_dir(info["fid"]) / "data", (1 << 20) + 12345)
        assert (replica.mount / "f").read_bytes() == data  # never the rotten byte
        assert "checksum mismatch" in replica.log.read_text()
        assert copy_bytes(replica, info["fid"]) == data  # repaired in place from the master
    finally:
        c.close()


def test_row12_corrupt_resync_source_is_repaired_not_copied_on(tmp_path):
    c = Cluster(tmp_path, 3, replicas=3, fm={"rereplicate_after": 120})
    try:
        n1, n2, n3 = c.nodes
        data = bytearray(os.urandom(2 << 20))
        write_file(n1.mount / "f", bytes(data))
        fid = n1.where("f")["fid"]
        n3.kill(signal.SIGKILL)
        fsync_write(n1.mount / "f", 0, page(7))  # chunk 0 now needs a resync to n3
        data[:4096] = page(7)
        flip_bit(n1.copy_dir(fid) / "data", 3 * 4096 + 99)  # rot in the source's chunk 0
        n3.start()
        wait_for(lambda: "n3" in n1.where("f")["in_sync"], 30, what="n3 resynced")
        assert copy_bytes(n3, fid) == bytes(data)  # the rot never reached n3
        assert copy_bytes(n1, fid) == bytes(data)  # and the source was repaired from n2
        assert "resync source" in n1.log.read_text()
    finally:
        c.close()


@pytest.mark.parametrize("victim", ["data", "info.json"])
def test_row13_deleted_replica_file_is_resynced_never_read_as_deleted(tmp_path, victim):
    c = Cluster(tmp_path, 3, replicas=2)
    try:
        n1 = c["n1"]
        data = os.urandom(1 << 20)
        write_file(n1.mount / "f", data)
        info = n1.where("f")
        replica = next(c[n] for n in info["members"] if n != "n1")
        os.unlink(replica.copy_dir(info["fid"]) / victim)
        assert (replica.mount / "f").read_bytes() == data  # not ENOENT, not zeros
        wait_for(lambda: "lost copy" in n1.log.read_text() or "reports" in n1.log.read_text(), 30,
                 what="the master to hear about the lost copy")
        wait_for(lambda: replica.name in n1.where("f")["in_sync"] and replica.store_has(info["fid"])
                 and (replica.copy_dir(info["fid"]) / "data").exists(), 30, what="full resync")
        assert copy_bytes(replica, info["fid"]) == data
        assert (replica.mount / "f").read_bytes() == data
    finally:
        c.close()


def test_row15_kill_all_daemons_restart_in_random_order(tmp_path):
    c = Cluster(tmp_path, 3, replicas=2)
    try:
        n1 = c["n1"]
        w = Writer(n1.mount / "f", every=4)
        w.start()
        wait_for(lambda: w.acked >= 48, 30, what="records")
        for node in c.nodes:
            node.kill(signal.SIGKILL)
        w.stop()
        order = list(c.nodes)
        random.Random(os.getpid()).shuffle(order)
        for node in order:
            node.start(wait=False)
        for node in order:
            node.wait_ready()
        c.wait_stable()
        wait_for(lambda: len(order[0].where("f")["in_sync"]) >= 2, 30, what="copies confirmed")
        info = order[0].where("f")
        assert info["split_brain"] == []
        for node in c.nodes:
            assert check_records((node.mount / "f").read_bytes(), w.acked) == [], node.name
        fsync_write(order[-1].mount / "f", 0, page(0, salt=3))  # writable again
        one_master_per_epoch(c, info["fid"])
    finally:
        c.close()


def test_row15_empty_replacement_node_is_never_a_source(tmp_path):
    c = Cluster(tmp_path, 3, replicas=2, fm={"rereplicate_after": 120})
    try:
        n1 = c["n1"]
        data = os.urandom(8 << 20)
        write_file(n1.mount / "f", data)
        info = n1.where("f")
        replica = next(c[n] for n in info["members"] if n != "n1")
        replica.kill(signal.SIGKILL)
        shutil.rmtree(replica.state)  # a new, empty disk
        replica.state.mkdir()
        arm(n1, "resync.chunk", "delay:1*")
        replica.start()
        wait_for(lambda: "resync of " + replica.name in n1.log.read_text(), 30, what="resync start")
        n1.kill(signal.SIGKILL)
        time.sleep(c.config.sections["fm"]["failover_after"] * 3)
        after = replica.where("f")
        assert after["master"] == "n1", after  # the empty node did not take over
        with pytest.raises(OSError) as exc:
            (replica.mount / "f").read_bytes()
        assert exc.value.errno == 5
    finally:
        c.close()


def test_row15_resync_source_dies_an_in_sync_copy_takes_over(tmp_path):
    c = Cluster(tmp_path, 3, replicas=3, fm={"rereplicate_after": 120})
    try:
        n1, n2, n3 = c.nodes
        data = bytearray(os.urandom(16 << 20))
        write_file(n1.mount / "f", bytes(data))
        n3.kill(signal.SIGKILL)
        fsync_write(n1.mount / "f", 0, page(9))
        data[:4096] = page(9)
        arm(n1, "resync.chunk", "delay:0.5*")
        n3.start()
        wait_for(lambda: "resync of n3" in n1.log.read_text(), 30, what="resync start")
        n1.kill(signal.SIGKILL)
        wait_for(lambda: n2.where("f")["master"] == "n2", 30, what="n2 (in sync) to take over")
        wait_for(lambda: "n3" in n2.where("f")["in_sync"], 30, what="n3 resynced from n2")
        fid = n2.where("f")["fid"]
        assert copy_bytes(n3, fid) == bytes(data)
    finally:
        c.close()


def test_row16_stale_promotion_refused_forced_one_splits_not_merges(tmp_path):
    c = Cluster(tmp_path, 3, replicas=3, fm={"rereplicate_after": 120, "auto_failover": False})
    try:
        n1, n2, n3 = c.nodes
        write_file(n1.mount / "f", page(0) * 8)
        fid = n1.where("f")["fid"]
        n3.kill(signal.SIGKILL)
        fsync_write(n1.mount / "f", 0, page(1))  # n3 misses it
        arm(n1, "resync.chunk", "delay:5*")
        n3.start()
        r = subprocess.run([os.sys.executable, "-m", "gfvm", "fm", "promote", "f", "n3"],
                           env=n3.env, capture_output=True, text=True)
        assert r.returncode == 2 and "stale" in r.stderr
        assert n1.where("f")["master"] == "n1"
        r = subprocess.run([os.sys.executable, "-m", "gfvm", "fm", "promote", "--force", "--json", "f", "n3"],
                           env=n3.env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        info = n3.where("f")
        assert info["master"] == "n3" and sorted(info["split_brain"]) == ["n1", "n2"]
        # not merged: n3 serves what it had; the newer copies are kept aside on n1 and n2
        assert (n3.mount / "f").read_bytes()[:4096] == page(0)
        for node in (n1, n2):
            kept = list((node.state / "fm" / "kept").iterdir())
            assert len(kept) == 1 and (kept[0] / "data").read_bytes()[:4096] == page(1)
    finally:
        c.close()


class CorruptingProxy:
    """A TCP proxy that flips one random bit in a share of the segments it forwards."""

    def __init__(self, listen, target, rate: float) -> None:
        import socket
        import threading

        self.rate = rate
        self.flipped = 0
        self.target = target
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(listen)
        self.sock.listen(16)
        self.rng = random.Random(7)
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while not self.closed:
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(self.target)
            except OSError:  # the target is not up yet: drop this one, keep accepting
                a.close()
                continue
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.rate and self.rng.random() < self.rate:
                    buf = bytearray(data)
                    i = self.rng.randrange(len(buf))
                    buf[i] ^= 1 << self.rng.randrange(8)
                    data = bytes(buf)
                    self.flipped += 1
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self):
        self.closed = True
        self.sock.close()


def test_row10_corrupted_frames_are_rejected_nothing_corrupt_stored(tmp_path):
    c = Cluster(tmp_path, 3, replicas=3, start=False, fm={"rereplicate_after": 120})
    n1, n2 = c["n1"], c["n2"]
    proxy_addr = n2.address.rsplit(".", 1)[0] + ".12"
    # n1 (only) reaches n2 through the proxy; everyone else talks to n2 directly
    toml = n1.etc / "cluster.toml"
    toml.write_text(toml.read_text().replace(f'address = "{n2.address}"', f'address = "{proxy_addr}"'))
    proxy = CorruptingProxy((proxy_addr, n2.port), (n2.address, n2.port), rate=0.0)
    try:
        c.start()
        w = Writer(n1.mount / "f", every=4)
        w.start()
        wait_for(lambda: w.acked >= 32, 30, what="records")
        proxy.rate = 0.05
        time.sleep(3)
        proxy.rate = 0.0
        wait_for(lambda: proxy.flipped > 0, 5, what="corruption")
        fid = n1.where("f")["fid"]
        wait_for(lambda: "n2" in n1.where("f")["in_sync"], 40, what="n2 in sync after the noise")
        w.stop()
        assert w.error is None
        n1.call("fm.status")
        fsync_write(n1.mount / "f", 0, page(0))  # a flush to n2 confirms its copy
        d1, d2 = copy_bytes(n1, fid), copy_bytes(n2, fid)
        assert d1 == d2 and check_records(d2, w.acked) == []
        assert "connection" in n1.log.read_text()  # TLS refused the damaged records
    finally:
        proxy.close()
        c.close()


def test_fsync_on_the_master_is_retried_when_a_member_cannot_be_dropped_at_once(tmp_path):
    """A member that misses a FLUSH is dropped; when its drop cannot be committed at once (here
    the fault point says Unavailable: the metadata leader not answering or the configuration
    changed meanwhile, as row 10's corrupted link can cause), an fsync on the master is retried
    like a write and acknowledged by the two good copies. It once failed with EIO at once: the
    error left the fsync's nursery wrapped in an exception group, which the retry loop did not
    recognise as "try again"."""
    c = Cluster(tmp_path, 3, replicas=3, fm={"rereplicate_after": 120})
    try:
        n1 = c["n1"]
        path = n1.mount / "f"
        write_file(path, b"".join(page(i) for i in range(16)))
        fid = n1.where("f")["fid"]
        # the member that misses the FLUSH is not the metadata leader (no election meanwhile)
        victim, good = (c["n3"], c["n2"]) if n1.status()["leader"] == "n2" else (c["n2"], c["n3"])
        arm(n1, "drop.before_commit", "unavailable")
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, page(1000), 0)  # acknowledged by all three
            victim.proc.send_signal(signal.SIGSTOP)
            try:
                os.fsync(fd)  # the victim never acknowledges the FLUSH: it is dropped
            finally:
                victim.proc.send_signal(signal.SIGCONT)
        finally:
            os.close(fd)
        text = n1.log.read_text()
        assert "fault point drop.before_commit: unavailable" in text
        assert f"dropping member {victim.name} from the in-sync set" in text
        want = copy_bytes(n1, fid)
        assert want[:4096] == page(1000) and copy_bytes(good, fid) == want
        wait_for(lambda: victim.name in n1.where("f")["in_sync"], 60, what="the victim in sync")
        wait_for(lambda: copy_bytes(victim, fid) == want, 30, what="the copy to equal ours")
    finally:
        c.close()


def test_member_refusing_a_write_as_its_earlier_drop_ends_is_dropped_again(tmp_path):
    """A member's drop still waiting out the lease after its commit does not cover a frame the
    member refuses after a resync declared it in sync meanwhile (here: n3 reported its copy
    lost, was dropped, and was resynced in full while that drop was held): the write that saw
    the refusal drops it again. It once waited for the earlier drop and returned: the write was
    acknowledged, n3 stayed "in sync" without it, and nothing brought it later."""
    c = Cluster(tmp_path, 3, replicas=3, fm={"rereplicate_after": 120})
    try:
        n1, n2, n3 = c.nodes
        write_file(n1.mount / "f", b"".join(page(i) for i in range(256)))
        fid = n1.where("f")["fid"]
        arm(n1, "drop.after_commit", "delay:6")
        arm(n1, "resync.before_in_sync", "delay:2")
        os.unlink(n3.copy_dir(fid) / "info.json")  # n3 reports its copy lost: dropped, held
        wait_for(lambda: "fault point drop.after_commit" in n1.log.read_text(), 30,
                 what="n3's drop to be committed")
        wait_for(lambda: "fault point resync.before_in_sync" in n1.log.read_text(), 30,
                 what="n3's resync to reach its end")
        arm(n3, "member.before_apply", "error")
        fd = os.open(n2.mount / "f", os.O_WRONLY)
        try:
            os.pwrite(fd, page(2000), 4 << 20)  # n3 refuses it (no fsync after it: nothing else
        finally:  # tells the master that n3 lacks it)
            os.close(fd)
        wait_for(lambda: "n3" in n1.where("f")["in_sync"], 60, what="n3 in sync")
        want = copy_bytes(n1, fid)
        assert len(want) == (4 << 20) + 4096
        wait_for(lambda: copy_bytes(n3, fid) == want, 30, what="n3's copy to equal n1's")
    finally:
        c.close()


def _tmpfs(path, size):
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)


def _umount(path):
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_row11_full_disk_on_a_replica_detaches_it_then_it_resyncs(tmp_path):
    c = Cluster(tmp_path, 3, replicas=3, start=False, fm={"rereplicate_after": 120})
    n3 = c["n3"]
    _tmpfs(n3.state, "24m")
    try:
        c.start()
        n1 = c["n1"]
        write_file(n1.mount / "f", os.urandom(32 << 20))  # does not fit on n3
        info = n1.where("f")
        assert info["members"]["n3"]["state"] == "outdated" and info["master"] == "n1"
        assert "n3" not in info["in_sync"]
        subprocess.run(["mount", "-o", "remount,size=200m", str(n3.state)], check=True)
        wait_for(lambda: "n3" in n1.where("f")["in_sync"], 40, what="n3 resynced once it has room")
        assert copy_bytes(n3, info["fid"]) == copy_bytes(n1, info["fid"])
    finally:
        c.close()
        _umount(n3.state)


def test_row11_full_disk_on_the_master_fails_the_write_acknowledges_nothing(tmp_path):
    c = Cluster(tmp_path, 3, replicas=2, start=False)
    n1 = c["n1"]
    _tmpfs(n1.state, "24m")
    try:
        c.start()
        write_file(n1.mount / "f", page(0) * 4)
        info = n1.where("f")
        with pytest.raises(OSError) as exc:
            write_file(n1.mount / "f", os.urandom(32 << 20))
        assert exc.value.errno in (28, 5)  # ENOSPC (or EIO), never a false success
        replica = next(c[n] for n in info["members"] if n != "n1")
        # what the replicas hold never goes beyond what the master could store
        assert os.path.getsize(replica.copy_dir(info["fid"]) / "data") <= os.path.getsize(
            n1.copy_dir(info["fid"]) / "data")
    finally:
        c.close()
        _umount(n1.state)


def test_row14_power_loss_on_the_master_keeps_every_fsynced_record(tmp_path):
    """n1's store is on its own small ext4 (a loop device). A 'power loss' throws away what the
    page cache had not written to that device yet: we copy the device's image while n1 runs
    (fsynced data is in it, later writes may not be), then restart n1 on the copy."""
    for tool in ("losetup", "mkfs.ext4"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    image = tmp_path / "n1.img"
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    c = Cluster(tmp_path, 3, replicas=2, start=False, fm={"auto_failover": False})
    n1 = c["n1"]
    subprocess.run(["mount", "-o", "loop", str(image), str(n1.state)], check=True)
    try:
        c.start()
        w = Writer(n1.mount / "f", every=4, limit=400)
        w.start()
        w.join(60)
        assert w.error is None and w.acked == 400
        fd = os.open(n1.mount / "f", os.O_RDWR)
        for i in range(400, 420):  # written (applied on n1 and its replica), never fsynced
            os.pwrite(fd, page(i), i * 4096)
        os.close(fd)
        fid0 = n1.where("f")["fid"]
        rep0 = next(c[n] for n in n1.where("f")["members"] if n != "n1")
        assert check_records(copy_bytes(rep0, fid0), 420) == [], "replica lacks applied writes"
        shutil.copyfile(image, tmp_path / "crash.img")  # what the disk held at the power cut
        n1.kill(signal.SIGKILL)
        subprocess.run(["umount", str(n1.state)], check=True)
        shutil.move(tmp_path / "crash.img", image)
        subprocess.run(["fsck.ext4", "-p", str(image)], check=False, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(n1.state)], check=True)
        n1.start()
        wait_for(lambda: n1.where("f")["local"]["readable"], 30, what="n1 serving again")
        data = (n1.mount / "f").read_bytes()
        assert check_records(data, 400) == []  # every fsynced record
        assert check_records(data, 420) == []  # and the written ones: the replica had them
        fid = n1.where("f")["fid"]
        replica = next(c[n] for n in n1.where("f")["members"] if n != "n1")
        fsync_write(n1.mount / "f", 0, page(0))
        assert copy_bytes(n1, fid) == copy_bytes(replica, fid)
    finally:
        c.close()
        subprocess.run(["umount", "-l", str(n1.state)], check=False)


def test_writes_ordered_while_a_member_is_dropped_reach_it_by_resync(tmp_path):
    """A write ordered while the master is still dropping a member (after it collected the
    chunks the member missed) goes into the member's bitmap: the incremental resync brings it,
    and the member's copy ends up equal to the master's (a migration target once came back "in
    sync" without such a chunk, and its restore read zeros)."""
    c = Cluster(tmp_path, 3, replicas=3, fm={"rereplicate_after": 120})
    try:
        n1, n2, n3 = c.nodes
        path = n1.mount / "f"
        write_file(path, b"".join(page(i) for i in range(256)))
        info = n1.where("f")
        assert info["master"] == "n1" and set(info["in_sync"]) == {"n1", "n2", "n3"}
        arm(n1, "drop.collect", "delay:4")
        n3.proc.send_signal(signal.SIGSTOP)
        try:
            first = threading.Thread(target=fsync_write, args=(path, 0, page(1000)), daemon=True)
            first.start()  # n3 never acks it: n3 is dropped
            wait_for(lambda: "fault point drop.collect" in n1.log.read_text(), 30,
                     what="the drop of n3")
            # another hot extent, during the drop (through n2's mount: the kernel holds n1's
            # inode lock for the first write)
            fsync_write(n2.mount / "f", 20 << 20, page(2000))
            first.join(30)
        finally:
            n3.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: set(n1.where("f")["in_sync"]) == {"n1", "n2", "n3"}, 60,
                 what="n3 back in sync")
        assert "incremental resync of n3" in n1.log.read_text()
        want = copy_bytes(n1, info["fid"])
        assert len(want) == (20 << 20) + 4096
        assert copy_bytes(n3, info["fid"]) == want
    finally:
        c.close()


def _n3_dropped_and_resync_held(c) -> int:
    """File f written from n1 (R=3); n3 misses a write (paused) and is dropped; its resync is
    then held for 3 s right before it would be declared in sync. Returns f's fid."""
    n1, _, n3 = c.nodes
    path = n1.mount / "f"
    write_file(path, b"".join(page(i) for i in range(256)))
    fid = n1.where("f")["fid"]
    n3.proc.send_signal(signal.SIGSTOP)
    try:
        fsync_write(path, 0, page(1000))  # n3 misses it: dropped
    finally:
        n3.proc.send_signal(signal.SIGCONT)
    assert "n3" not in n1.where("f")["in_sync"]
    arm(n1, "resync.before_in_sync", "delay:3")
    wait_for(lambda: "fault point resync.before_in_sync" in n1.log.read_text(), 30,
             what="n3's resync to reach its end")
    return fid


def test_member_slow_to_acknowledge_a_live_write_gets_it_before_in_sync(tmp_path):
    """A member catching up that acknowledges a live write late (here: paused) right before
    the resync declares it in sync is declared in sync only with that write (it once was
    declared in sync without it and every later one: its copy ended up short, was promoted,
    and cut the others to its size)."""
    c = Cluster(tmp_path, 3, replicas=3, fm={"rereplicate_after": 120})
    try:
        n1, n2, n3 = c.nodes
        fid = _n3_dropped_and_resync_held(c)
        n3.proc.send_signal(signal.SIGSTOP)
        try:
            fsync_write(n2.mount / "f", 4 << 20, page(2000))  # n3 (catching up) misses it
        finally:
            n3.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: "n3" in n1.where("f")["in_sync"], 60, what="n3 in sync")
        fsync_write(n2.mount / "f", 8 << 20, page(3000))
        wait_for(lambda: "n3" in n1.where("f")["in_sync"], 60, what="n3 in sync")
        want = copy_bytes(n1, fid)
        assert len(want) == (8 << 20) + 4096
        wait_for(lambda: copy_bytes(n3, fid) == want, 30, what="n3's copy to equal n1's")
    finally:
        c.close()


def test_member_failing_a_live_write_is_not_declared_in_sync(tmp_path):
    """A member catching up that refuses a live write right before the resync declares it in
    sync is not declared in sync then: a later resync brings it every write."""
    c = Cluster(tmp_path, 3, replicas=3, fm={"rereplicate_after": 120})
    try:
        n1, n2, n3 = c.nodes
        fid = _n3_dropped_and_resync_held(c)
        arm(n3, "member.before_apply", "error")
        fsync_write(n2.mount / "f", 4 << 20, page(2000))  # n3 (catching up) refuses it
        wait_for(lambda: "n3" in n1.where("f")["in_sync"], 60, what="n3 in sync")
        fsync_write(n2.mount / "f", 8 << 20, page(3000))
        want = copy_bytes(n1, fid)
        assert len(want) == (8 << 20) + 4096
        wait_for(lambda: copy_bytes(n3, fid) == want, 30, what="n3's copy to equal n1's")
    finally:
        c.close()
