"""Three real gfvmd processes (TLS between them, FUSE mounts): the tree is the same everywhere,
bytes written on one node read back identical on the others, copies land where they should."""

from __future__ import annotations

import hashlib
import os

import pytest

from test_fm_harness import Cluster, wait_for, write_file


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("fmcluster"), 3, replicas=2)
    yield c
    c.close()


def test_write_on_n1_reads_identical_on_n2_and_n3(cluster):
    n1, n2, n3 = cluster.nodes
    (n1.mount / "w").mkdir()
    data = os.urandom(3 * 1024 * 1024 + 777)
    write_file(n1.mount / "w" / "f", data)
    for node in (n2, n3):
        assert (node.mount / "w" / "f").read_bytes() == data, node.name


def test_r2_file_lies_in_exactly_two_stores(cluster):
    n1 = cluster.nodes[0]
    write_file(n1.mount / "r2", b"x" * 100000)
    w = n1.where("r2")
    holders = [n.name for n in cluster.nodes if n.store_has(w["fid"])]
    assert len(holders) == 2 and holders == sorted(w["members"])
    assert w["master"] == "n1" and w["in_sync"][0] == "n1"


def test_mkdir_on_one_node_is_visible_on_the_others_at_once(cluster):
    n1, n2, n3 = cluster.nodes
    (n2.mount / "made-on-n2").mkdir()
    assert (n3.mount / "made-on-n2").is_dir()
    assert (n1.mount / "made-on-n2").is_dir()


def test_rename_propagates(cluster):
    n1, n2, n3 = cluster.nodes
    write_file(n1.mount / "old-name", b"content")
    assert (n3.mount / "old-name").read_bytes() == b"content"
    os.rename(n2.mount / "old-name", n2.mount / "new-name")
    for node in cluster.nodes:
        wait_for(lambda node=node: not (node.mount / "old-name").exists(), 5, what="old name gone")
        assert (node.mount / "new-name").read_bytes() == b"content"


def test_unlink_propagates_and_frees_every_copy(cluster):
    n1, n2, n3 = cluster.nodes
    write_file(n1.mount / "doomed", b"bye" * 1000)
    fid = n1.where("doomed")["fid"]
    assert any(n.store_has(fid) for n in (n2, n3))
    os.unlink(n3.mount / "doomed")
    for node in cluster.nodes:
        wait_for(lambda node=node: not (node.mount / "doomed").exists(), 5, what="name gone")
        wait_for(lambda node=node: not node.store_has(fid), 5, what=f"{node.name}'s copy removed")


def test_write_from_a_non_member_is_forwarded_to_the_master(cluster):
    n1, n2, n3 = cluster.nodes
    write_file(n1.mount / "fwd", b"a" * 8192)
    w = n1.where("fwd")
    outsider = next(n for n in cluster.nodes if n.name not in w["members"])
    with open(outsider.mount / "fwd", "r+b") as f:
        f.seek(4096)
        f.write(b"B" * 100)
        f.flush()
        os.fsync(f.fileno())
    expected = b"a" * 4096 + b"B" * 100 + b"a" * (4096 - 100)
    for node in cluster.nodes:
        assert (node.mount / "fwd").read_bytes() == expected, node.name
    assert not outsider.store_has(w["fid"])


def test_many_small_files(cluster):
    n1, n2, n3 = cluster.nodes
    d = n2.mount / "small"
    d.mkdir()
    contents = {f"f{i:04d}": os.urandom(i * 37 % 5000 + 1) for i in range(200)}
    for name, data in contents.items():
        write_file(d / name, data, fsync=False)
    for node in (n1, n3):
        got = sorted(os.listdir(node.mount / "small"))
        assert got == sorted(contents)
        for name, data in contents.items():
            assert (node.mount / "small" / name).read_bytes() == data


def test_files_of_one_directory_share_their_nodes(cluster):
    n1 = cluster.nodes[0]
    (n1.mount / "proc-1").mkdir()
    write_file(n1.mount / "proc-1" / "pages", b"p")
    write_file(n1.mount / "proc-1" / "core.img", b"c")
    a, b = n1.where("proc-1/pages"), n1.where("proc-1/core.img")
    assert sorted(a["members"]) == sorted(b["members"])


@pytest.mark.slow
def test_one_gib_file_replicated_and_identical(cluster):
    n1, n2, n3 = cluster.nodes
    block = os.urandom(1 << 20)
    h = hashlib.sha256()
    fd = os.open(n1.mount / "big", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for i in range(1024):
            chunk = block[i % 7 :] + block[: i % 7]  # every MiB different
            os.write(fd, chunk)
            h.update(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    w = n1.where("big")
    replica = next(n for n in cluster.nodes if n.name in w["members"] and n.name != "n1")
    h2 = hashlib.sha256()
    with open(replica.mount / "big", "rb") as f:
        while chunk := f.read(1 << 20):
            h2.update(chunk)
    assert h2.hexdigest() == h.hexdigest()
    assert os.path.getsize(replica.copy_dir(w["fid"]) / "data") == 1 << 30
