"""Bad and unusual input through the /gfvm mount (RELIABILITY.md "Hostile and bad input: FUSE"):
each case gets a clear errno or a correct result, and the daemon keeps serving."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import sys
import threading

import pytest

from test_fm_harness import Cluster, wait_for, write_file


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("fuse-input"), 2, replicas=2)
    yield c
    c.close()


@pytest.fixture
def n1(cluster):
    yield cluster["n1"]
    assert cluster["n1"].proc.poll() is None, "gfvmd died"
    assert cluster["n1"].status()["node"] == "n1"  # still serving


def test_dotdot_at_the_root_stays_inside(n1):
    assert os.path.realpath(n1.mount / "..") != str(n1.mount)  # the kernel resolves it...
    os.mkdir(n1.mount / "esc")
    assert os.listdir(n1.mount / "esc" / "..") == os.listdir(n1.mount)  # ...within the tree


def test_name_too_long(n1):
    with pytest.raises(OSError) as e:
        open(n1.mount / ("x" * 256), "wb")
    assert e.value.errno == errno.ENAMETOOLONG
    write_file(n1.mount / ("y" * 255), b"ok")  # exactly NAME_MAX is fine


def test_non_utf8_name_refused(n1):
    with pytest.raises(OSError) as e:
        os.open(os.fsencode(str(n1.mount)) + b"/bad\xff\xfe", os.O_CREAT | os.O_WRONLY, 0o600)
    assert e.value.errno == errno.EINVAL


def test_control_character_name_refused(n1):
    with pytest.raises(OSError) as e:
        open(n1.mount / "tab\tname", "wb")
    assert e.value.errno == errno.EINVAL


def test_sparse_and_huge_offsets(n1):
    fd = os.open(n1.mount / "sparse", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"end", 100 << 30)  # 100 GiB: a hole before
        assert os.fstat(fd).st_size == (100 << 30) + 3
        assert os.pread(fd, 8, 50 << 30) == bytes(8)
        assert os.pread(fd, 3, 100 << 30) == b"end"
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", 1 << 40)  # past the 1 TiB limit
        assert e.value.errno == errno.EFBIG
    finally:
        os.close(fd)


def test_partial_pages(n1, cluster):
    fd = os.open(n1.mount / "partial", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"A" * 5000, 0)
        os.pwrite(fd, b"bbbbbbbbbb", 4090)  # across a page boundary
        os.fsync(fd)
    finally:
        os.close(fd)
    want = b"A" * 4090 + b"b" * 10 + b"A" * 900
    assert (n1.mount / "partial").read_bytes() == want
    assert (cluster["n2"].mount / "partial").read_bytes() == want


def test_o_direct(n1):
    fd = os.open(n1.mount / "direct", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        buf = mmap.mmap(-1, 8192)
        buf.write(b"D" * 8192)
        assert os.pwritev(fd, [buf], 0) == 8192
        rbuf = mmap.mmap(-1, 8192)
        assert os.preadv(fd, [rbuf], 0) == 8192
        assert rbuf[:] == b"D" * 8192
    finally:
        os.close(fd)


def test_shared_writable_mmap(n1, cluster):
    write_file(n1.mount / "mm", bytes(8192))
    with open(n1.mount / "mm", "r+b") as f:
        mm = mmap.mmap(f.fileno(), 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        mm[100:105] = b"hello"
        mm.flush()
        mm.close()
        os.fsync(f.fileno())
    assert (n1.mount / "mm").read_bytes()[100:105] == b"hello"
    assert (cluster["n2"].mount / "mm").read_bytes()[100:105] == b"hello"


def test_truncate_during_replication(n1, cluster):
    path = n1.mount / "trunc"
    stop = threading.Event()

    def writer():
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        i = 0
        while not stop.is_set():
            os.pwrite(fd, os.urandom(65536), (i % 64) * 65536)
            i += 1
        os.close(fd)

    write_file(path, b"")
    t = threading.Thread(target=writer)
    t.start()
    for size in (10000, 0, 3 << 20, 12345):
        os.truncate(path, size)
    stop.set()
    t.join()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    assert (n1.mount / "trunc").read_bytes() == (cluster["n2"].mount / "trunc").read_bytes()


def test_unlink_of_an_open_file_keeps_it_readable_through_the_handle(n1):
    write_file(n1.mount / "gone", b"still readable")
    fd = os.open(n1.mount / "gone", os.O_RDWR)
    try:
        os.unlink(n1.mount / "gone")
        assert not (n1.mount / "gone").exists()
        assert os.pread(fd, 14, 0) == b"still readable"
    finally:
        os.close(fd)


def test_another_uid_cannot_enter(n1):
    r = subprocess.run([sys.executable, "-c", f"import os; os.setuid(1000); os.listdir({str(n1.mount)!r})"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_files_are_private(n1):
    fd = os.open(n1.mount / "mode", os.O_CREAT | os.O_WRONLY, 0o666)
    os.close(fd)
    assert os.stat(n1.mount / "mode").st_mode & 0o077 == 0


def test_client_killed_mid_write(n1, cluster):
    code = (f"import os\nfd=os.open({str(n1.mount / 'victim')!r}, os.O_RDWR|os.O_CREAT, 0o600)\n"
            "b=os.urandom(1<<20)\n"
            "while True: os.pwrite(fd, b, 0)\n")
    p = subprocess.Popen([sys.executable, "-c", code])
    wait_for(lambda: (n1.mount / "victim").exists() and os.path.getsize(n1.mount / "victim") > 0, 10,
             what="the client to write")
    p.send_signal(signal.SIGKILL)
    p.wait()
    write_file(n1.mount / "after-kill", b"fine")
    assert (cluster["n2"].mount / "after-kill").read_bytes() == b"fine"


def test_rename_exchange_not_supported_cleanly(n1):
    import ctypes

    write_file(n1.mount / "ra", b"a")
    write_file(n1.mount / "rb", b"b")
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.renameat2(-100, os.fsencode(str(n1.mount / "ra")), -100, os.fsencode(str(n1.mount / "rb")), 2)
    assert rc == -1 and ctypes.get_errno() == errno.EINVAL
    assert (n1.mount / "ra").read_bytes() == b"a" and (n1.mount / "rb").read_bytes() == b"b"


def test_lazy_unmount_leaves_the_daemon_serving(tmp_path):
    c = Cluster(tmp_path, 2, replicas=2)
    try:
        n1, n2 = c["n1"], c["n2"]
        write_file(n1.mount / "f", b"data")
        subprocess.run(["umount", "-l", str(n1.mount)], check=True)
        wait_for(lambda: not os.path.ismount(n1.mount), 5, what="the unmount")
        assert n1.proc.poll() is None
        assert n1.where("f")["master"] == "n1"  # control socket and metadata still served
        assert (n2.mount / "f").read_bytes() == b"data"  # and peers still get the data
    finally:
        c.close()
