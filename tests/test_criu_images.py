"""The strict protobuf decoder (gfvm.migrate.pbwire) and the CRIU image reader
(gfvm.migrate.images): synthetic and malformed input, and real images from real CRIU whose dumped
pages must equal the process's memory captured before the dump."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from criu_support import cluster2, criu_env, make_workload, workload_bin  # noqa: F401 (fixtures)
from gfvm.migrate import criu
from gfvm.migrate.images import (
    IMG_COMMON_MAGIC,
    MM_MAGIC,
    PAGE_SIZE,
    PAGEMAP_MAGIC,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    PSTREE_MAGIC,
    ImageDir,
    ImageError,
    read_entries,
)
from gfvm.migrate.pbwire import F, Schema, WireError, decode, read_varint

# --- a tiny encoder for test input ----------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return varint(number << 3 | 2) + varint(len(value)) + value
    return varint(number << 3) + varint(value)


def image(magic: int, *payloads: bytes) -> bytes:
    return struct.pack("<II", IMG_COMMON_MAGIC, magic) + b"".join(
        struct.pack("<I", len(p)) + p for p in payloads
    )


def pagemap_entry(vaddr: int, nr: int, flags: int) -> bytes:
    return field(1, vaddr) + field(2, nr) + field(4, flags)


def vma(start: int, end: int, flags: int = 0x22) -> bytes:  # MAP_PRIVATE|MAP_ANONYMOUS
    return (field(1, start) + field(2, end) + field(3, 0) + field(4, 0) + field(5, 3) + field(6, flags)
            + field(7, 1) + field(8, 1))  # sint64 fd = -1 (zigzag 1)


def mm(*vmas: bytes) -> bytes:
    required = b"".join(field(n, 0) for n in range(1, 13))
    return required + b"".join(field(14, v) for v in vmas)


def make_task_dir(path, runs, vmas, pages: bytes | None = None, pid: int = 1):
    path.mkdir(exist_ok=True)
    (path / "pstree.img").write_bytes(image(PSTREE_MAGIC, field(1, pid) + field(2, 0) + field(3, pid) + field(4, pid)))
    (path / f"mm-{pid}.img").write_bytes(image(MM_MAGIC, mm(*[vma(s, e) for s, e in vmas])))
    (path / f"pagemap-{pid}.img").write_bytes(image(PAGEMAP_MAGIC, field(1, 7), *[pagemap_entry(*r) for r in runs]))
    stored = sum(n for _, n, f in runs if f & PE_PRESENT) * PAGE_SIZE
    (path / "pages-7.img").write_bytes(pages if pages is not None else bytes(range(256)) * (stored // 256))
    return ImageDir(path)


# --- pbwire ----------------------------------------------------------------------------------------

S = Schema("t", F(1, "a", "uint32", "required"), F(2, "b", "uint64"), F(3, "c", "uint32", "repeated"),
           F(4, "d", "string"), F(5, "e", "bool"), F(6, "f", "sint64"), F(7, "g", "int32"))


def test_decode_fields_and_defaults():
    msg = decode(S, field(1, 5) + field(3, 1) + field(3, 2) + field(4, "hé".encode()) + field(6, 3))
    assert msg == {"a": 5, "b": None, "c": [1, 2], "d": "hé", "e": None, "f": -2, "g": None}


def test_packed_repeated_and_negative_int32():
    packed = field(3, varint(1) + varint(300))
    msg = decode(S, field(1, 0) + packed + field(7, (1 << 64) - 1))
    assert msg["c"] == [1, 300] and msg["g"] == -1


def test_unknown_fields_are_skipped():
    assert decode(S, field(1, 1) + field(99, 12345) + field(98, b"xyz"))["a"] == 1


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "required field a"),
        (field(1, 1) + field(1, 2), "appears twice"),
        (field(1, 1 << 32), "does not fit in uint32"),
        (field(1, 1) + field(5, 2), "bool must be 0 or 1"),
        (field(1, 1) + field(4, b"\xff\xfe"), "UTF-8"),
        (field(1, 1) + varint(2 << 3 | 2) + varint(10) + b"abc", "runs past the end"),
        (b"\x08", "truncated varint"),
        (b"\x08" + b"\x80" * 9 + b"\x81\x00", "does not fit in 64 bits"),
        (b"\x08" + b"\xff" * 9 + b"\x02", "does not fit in 64 bits"),
        (varint(1 << 3 | 3), "unsupported wire type 3"),
        (varint(1 << 3 | 7), "unsupported wire type 7"),
        (varint(0 << 3), "field number 0"),
        (varint(1 << 3 | 2) + varint(1) + b"\x00", "wire type 2"),
        (field(1, 1) + varint(4 << 3 | 0) + varint(1), "string field sent with wire type 0"),
        (field(1, 1) + varint(2 << 3 | 1) + b"\x00" * 4, "truncated 64-bit"),
    ],
)
def test_malformed_messages_are_refused(data, message):
    with pytest.raises(WireError, match=message):
        decode(S, data)


@given(st.binary(max_size=64))
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes_only_ever_raise_wire_error(data):
    try:
        decode(S, data)
    except WireError:
        pass


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_varint_round_trip(n):
    assert read_varint(varint(n), 0) == (n, len(varint(n)))


# --- image files -----------------------------------------------------------------------------------


def test_synthetic_task_offsets_and_reads(tmp_path):
    base = 0x7F0000000000
    runs = [(base, 2, PE_PRESENT | PE_LAZY), (base + 4 * PAGE_SIZE, 1, PE_LAZY), (base + 6 * PAGE_SIZE, 1, PE_PRESENT)]
    pages = b"A" * PAGE_SIZE + b"B" * PAGE_SIZE + b"C" * PAGE_SIZE
    d = make_task_dir(tmp_path, runs, [(base, base + 8 * PAGE_SIZE)], pages)
    mem = d.task_memory(1)
    assert [(r.vaddr, r.offset) for r in mem.runs] == [(base, 0), (base + 4 * PAGE_SIZE, None), (base + 6 * PAGE_SIZE, 2 * PAGE_SIZE)]
    assert mem.read(base + PAGE_SIZE) == b"B" * PAGE_SIZE
    assert mem.read(base + 6 * PAGE_SIZE) == b"C" * PAGE_SIZE
    assert mem.find(base + 3 * PAGE_SIZE) is None
    assert mem.file_offset(base + 4 * PAGE_SIZE) is None  # listed, but its bytes are elsewhere
    assert mem.lazy_ranges == [(base, base + 8 * PAGE_SIZE)]
    with pytest.raises(ImageError, match="not stored here"):
        mem.read(base + 4 * PAGE_SIZE)


@pytest.mark.parametrize(
    "runs, vmas, pages, message",
    [
        ([(0x10000, 2, PE_PRESENT)], [(0x10000, 0x20000)], b"x" * PAGE_SIZE, "holds 4096 bytes but"),
        ([(0x10000, 1, PE_PARENT)], [(0x10000, 0x20000)], b"", "incremental dumps are not supported"),
        ([(0x10000, 1, 1 << 5)], [(0x10000, 0x20000)], b"", "unknown flags"),
        ([(0x10001, 1, PE_PRESENT)], [(0x10000, 0x20000)], b"x" * PAGE_SIZE, "not page-aligned"),
        ([(0x20000, 1, PE_PRESENT), (0x10000, 1, PE_PRESENT)], [(0x10000, 0x30000)], b"x" * 2 * PAGE_SIZE, "out of order"),
        ([(0x10000, 0, PE_PRESENT)], [(0x10000, 0x20000)], b"", "has no pages"),
        ([(0x40000, 1, PE_PRESENT)], [(0x10000, 0x20000)], b"x" * PAGE_SIZE, "outside every VMA"),
        ([(0x10000, 1, PE_PRESENT)], [(0x20000, 0x10000)], b"x" * PAGE_SIZE, "empty or inverted VMA"),
    ],
)
def test_inconsistent_images_are_refused(tmp_path, runs, vmas, pages, message):
    d = make_task_dir(tmp_path, runs, vmas, pages)
    with pytest.raises(ImageError, match=message):
        d.task_memory(1)


def test_framing_errors_name_the_file(tmp_path):
    path = tmp_path / "pagemap-1.img"
    good = image(PAGEMAP_MAGIC, field(1, 7), pagemap_entry(0x10000, 1, PE_PRESENT))
    cases = {
        good[:6]: "truncated image header",
        struct.pack("<II", IMG_COMMON_MAGIC, MM_MAGIC) + good[8:]: "bad magic",
        good[:-3]: "is truncated",
        good + b"\x01\x02": "truncated entry length",
        good[:8] + struct.pack("<I", 1 << 30): "limit",
    }
    for data, message in cases.items():
        path.write_bytes(data)
        with pytest.raises(ImageError, match=message) as info:
            read_entries(path, PAGEMAP_MAGIC)
        assert str(path) in str(info.value)
    with pytest.raises(ImageError, match="missing"):
        read_entries(tmp_path / "nope.img", PAGEMAP_MAGIC)


def test_malformed_entry_is_an_image_error(tmp_path):
    d = make_task_dir(tmp_path, [(0x10000, 1, PE_PRESENT)], [(0x10000, 0x20000)], b"x" * PAGE_SIZE)
    (tmp_path / "pagemap-1.img").write_bytes(image(PAGEMAP_MAGIC, field(1, 7), b"\x08\xff"))
    with pytest.raises(ImageError, match=r"pagemap-1.img: entry 1: .*truncated varint"):
        d.task_memory(1)


# --- real images --------------------------------------------------------------------------------------


def _wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Waits until every thread of `pid` is in group stop (SIGSTOP is delivered asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(s == "T" for s in states):
            return
        assert time.monotonic() < deadline, f"threads of {pid} did not stop: {states}"
        time.sleep(0.005)


def _capture_memory(pid: int) -> dict[int, bytes]:
    """Every readable page of process `pid` (which must be stopped), read through /proc/PID/mem.
    Not only present pages: CRIU itself touches some (the vdso, the page where it injects its
    parasite's syscall, restoring the original bytes afterwards) and dumps them."""
    pages = {}
    with open(f"/proc/{pid}/maps") as f:
        maps = [line.split() for line in f]
    mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for fields in maps:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if "r" not in fields[1] or fields[-1] in ("[vvar]", "[vvar_vclock]", "[vsyscall]"):
                continue
            try:
                data = os.pread(mem, end - start, start)
            except OSError:
                continue
            for off in range(0, len(data), PAGE_SIZE):
                pages[start + off] = data[off : off + PAGE_SIZE]
    finally:
        os.close(mem)
    return pages


def test_dumped_pages_equal_memory_captured_before_the_dump(cluster2, make_workload, tmp_path):
    # Without rseq: the kernel rewrites each thread's struct rseq (cpu ids) whenever the thread
    # runs, e.g. while CRIU's parasite runs in it, so those bytes legitimately change.
    w = make_workload("n1", mib=8, child=True, env={"GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    hosts = {inner: w.host_pid(inner) for inner in (1, 2, 3)}
    for pid in hosts.values():
        os.kill(pid, signal.SIGSTOP)
    for pid in hosts.values():
        _wait_stopped(pid)
    captured = {inner: _capture_memory(pid) for inner, pid in hosts.items()}
    images = tmp_path / "img"
    criu.dump_blocking(w.root, images, wrap=lambda argv: cluster2.exec_argv("n1", argv))
    d = ImageDir(images)
    assert [t.pid for t in d.pstree] == [1, 2, 3]
    assert len(d.pstree[1].threads) == 4  # main + 3 workers
    compared = 0
    for t in d.pstree:
        mem = d.task_memory(t.pid)
        with open(mem.pages_path, "rb") as f:
            for run in mem.runs:
                if not run.present:
                    continue
                for i in range(run.nr_pages):
                    addr = run.vaddr + i * PAGE_SIZE
                    f.seek(run.offset + i * PAGE_SIZE)
                    dumped = f.read(PAGE_SIZE)
                    assert addr in captured[t.pid], f"task {t.pid}: dumped page {addr:#x} was not readable"
                    assert dumped == captured[t.pid][addr], f"task {t.pid}: page {addr:#x} differs"
                    compared += 1
    assert compared >= 8 * 256


def test_truncated_real_pages_image_is_refused(cluster2, make_workload, tmp_path):
    w = make_workload("n1", mib=4, child=False)
    images = tmp_path / "img"
    criu.dump_blocking(w.root, images, wrap=lambda argv: cluster2.exec_argv("n1", argv))
    bad = tmp_path / "bad"
    shutil.copytree(images, bad)
    mem = ImageDir(bad).task_memory(2)
    with open(mem.pages_path, "r+b") as f:
        f.truncate(os.path.getsize(mem.pages_path) - PAGE_SIZE)
    with pytest.raises(ImageError, match="holds"):
        ImageDir(bad).task_memory(2)
    pagemap = bad / "pagemap-2.img"
    pagemap.write_bytes(pagemap.read_bytes()[:-5])
    with pytest.raises(ImageError, match="truncated"):
        ImageDir(bad).task_memory(2)
    assert ImageDir(images).dump_stats().pages_written > 4 * 256
