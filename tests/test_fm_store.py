"""The local store: copies, page sums verified on read, intent log, crash leftovers."""

from __future__ import annotations

import errno
import os
import struct
import zlib

import pytest

from gfvm.fm.store import (
    CHUNK,
    HOT_SHIFT,
    PAGE,
    CorruptData,
    IntentLog,
    LocalStore,
    MissingCopy,
    page_sum,
    page_sums,
)


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path)


def test_create_write_read_roundtrip(store):
    store.create(5, "g1")
    lf = store.open(5)
    data = os.urandom(3 * PAGE + 123)
    lf.write(1000, data)
    assert lf.size == 1000 + len(data)
    assert lf.read(1000, len(data)) == data
    assert lf.read(0, 1000) == bytes(1000)  # the hole before the write reads as zeros


def test_copy_and_store_files_are_private(store):
    store.create(5, "g1")
    path = store.path_of(5)
    assert os.stat(path).st_mode & 0o777 == 0o700
    for name in ("data", "sums", "hot", "info.json"):
        assert os.stat(path / name).st_mode & 0o777 == 0o600, name


def test_write_pages_scattered(store):
    store.create(1, "g")
    lf = store.open(1)
    pages = os.urandom(3 * PAGE)
    lf.write_pages([PAGE * 10, PAGE * 11, PAGE * 500], pages)
    assert lf.read(PAGE * 10, 2 * PAGE) == pages[: 2 * PAGE]
    assert lf.read(PAGE * 500, PAGE) == pages[2 * PAGE :]
    assert lf.read(PAGE * 12, PAGE) == bytes(PAGE)
    with pytest.raises(OSError):
        lf.write_pages([123], bytes(PAGE))  # unaligned


def test_bit_flip_is_detected_not_returned(store):
    store.create(1, "g")
    lf = store.open(1)
    lf.write(0, b"a" * (4 * PAGE))
    lf.flush()
    with open(store.path_of(1) / "data", "r+b") as f:  # rot one bit behind our back
        f.seek(PAGE * 2 + 17)
        b = f.read(1)
        f.seek(PAGE * 2 + 17)
        f.write(bytes([b[0] ^ 0x10]))
    assert lf.read(0, PAGE) == b"a" * PAGE  # other pages still fine
    with pytest.raises(CorruptData) as info:
        lf.read(0, 4 * PAGE)
    assert info.value.pages == [2]


def test_garbage_in_a_hole_is_detected(store):
    store.create(1, "g")
    lf = store.open(1)
    lf.write(8 * PAGE, b"x" * PAGE)
    with open(store.path_of(1) / "data", "r+b") as f:
        f.seek(PAGE)
        f.write(b"junk")
    with pytest.raises(CorruptData):
        lf.read(0, 2 * PAGE)


def _truncated_behind_our_back(store):
    """Copy 1, flushed at 10 pages, then cut to 3 by someone else, opened again."""
    store.create(1, "g")
    lf = store.open(1)
    lf.write(0, os.urandom(10 * PAGE))
    lf.flush()
    store.release(lf)
    os.truncate(store.path_of(1) / "data", 3 * PAGE)
    return store.open(1)


def test_external_truncation_marks_copy_damaged(store):
    lf = _truncated_behind_our_back(store)
    assert lf.damaged
    with pytest.raises(MissingCopy):
        lf.read(0, PAGE)


def test_truncate_and_partial_tail_page(store):
    store.create(1, "g")
    lf = store.open(1)
    lf.write(0, b"z" * (2 * PAGE))
    lf.truncate(PAGE + 10)
    assert lf.read(0, 3 * PAGE) == b"z" * (PAGE + 10)
    lf.truncate(5 * PAGE)
    assert lf.read(0, 5 * PAGE) == b"z" * (PAGE + 10) + bytes(4 * PAGE - 10)
    store.release(lf)
    lf = store.open(1)  # sums survive a reopen
    assert lf.read(0, 5 * PAGE) == b"z" * (PAGE + 10) + bytes(4 * PAGE - 10)


def test_intent_log_records_before_writing_and_clears_after_flush(store):
    store.create(1, "g")
    lf = store.open(1)
    lf.write(3 << HOT_SHIFT, b"x")
    log2 = IntentLog(store.path_of(1) / "hot")  # what a crash right now would find
    assert log2.extents == {3}
    log2.close()
    lf.flush()
    log3 = IntentLog(store.path_of(1) / "hot")
    assert log3.empty
    log3.close()


def test_intent_log_keeps_writes_after_the_flush_point(store):
    store.create(1, "g")
    lf = store.open(1)
    lf.write(0, b"x")
    covered = lf.flush(clear=False)
    lf.write(5 << HOT_SHIFT, b"y")  # after the flush point
    lf.clear_hot(covered)
    assert lf.hot.extents == {5}


def test_intent_log_torn_slot_falls_back_to_previous(tmp_path):
    log1 = IntentLog(tmp_path / "hot")
    log1.mark({1, 2})  # slot 1
    log1.mark({7})  # slot 0
    log1.close()
    with open(tmp_path / "hot", "r+b") as f:  # tear the newest slot
        f.seek(30)
        f.write(b"\xff" * 8)
    log2 = IntentLog(tmp_path / "hot")
    assert log2.extents == {1, 2}


def test_intent_log_unreadable_means_everything_hot(tmp_path):
    (tmp_path / "hot").write_bytes(b"garbage" * 2000)
    log2 = IntentLog(tmp_path / "hot")
    assert log2.all


def test_unclean_copy_is_flagged_at_open(store):
    store.create(1, "g")
    lf = store.open(1)
    lf.write(0, b"x" * 100)
    store.release(lf)  # "crash": no flush
    lf = store.open(1)
    assert lf.unclean_at_open
    assert lf.hot_chunks() == set(range(16))  # one 16 MiB extent = 16 resync chunks
    lf.flush()
    store.release(lf)
    assert not store.open(1).unclean_at_open


def test_chunk_transfer_verifies_sums(store):
    store.create(1, "g")
    store.create(2, "g")
    src, dst = store.open(1), store.open(2)
    src.write(0, os.urandom(CHUNK + 5000))
    data, sums = src.read_chunk(1)
    dst.write_chunk(1, data, sums, src.size)
    assert dst.read(CHUNK, 5000) == src.read(CHUNK, 5000)
    bad = bytearray(data)
    bad[10] ^= 1
    with pytest.raises(CorruptData):
        dst.write_chunk(1, bytes(bad), sums, src.size)


def test_resync_source_refuses_to_send_corrupt_chunk(store):
    store.create(1, "g")
    lf = store.open(1)
    lf.write(0, os.urandom(2 * PAGE))
    with open(store.path_of(1) / "data", "r+b") as f:
        f.write(b"\0\0\0")
    with pytest.raises(CorruptData):
        lf.read_chunk(0)


def test_incarnation_increases_per_start(tmp_path):
    a = LocalStore(tmp_path).incarnation
    b = LocalStore(tmp_path).incarnation
    assert b == a + 1


def test_half_built_copy_is_discarded_at_start(tmp_path):
    s = LocalStore(tmp_path)
    (s.tmp_dir / "9.1.2").mkdir()
    (s.tmp_dir / "9.1.2" / "data").write_bytes(b"partial")
    LocalStore(tmp_path)
    assert not any(s.tmp_dir.iterdir())
    assert not s.exists(9)


def test_delete_keeps_open_handles_working(store):
    store.create(1, "g")
    lf = store.open(1)
    lf.write(0, b"still here")
    store.delete(1)
    assert not store.exists(1)
    assert lf.read(0, 10) == b"still here"
    with pytest.raises(MissingCopy):
        store.open(1)


def test_zero_crc_never_collides_with_hole_marker():
    assert page_sum(bytes(PAGE)) != 0
    assert struct.calcsize("I") == 4


def _page_with_crc_zero(seed: bytes) -> bytes:
    """A 4 KiB page whose zlib CRC-32 is 0: its last 4 bytes solve the (affine, GF(2)) CRC."""
    prefix = (seed * PAGE)[: PAGE - 4]
    base = zlib.crc32(prefix + bytes(4))
    # column i: how bit i of the last 4 bytes flips the CRC
    cols = [zlib.crc32(prefix + (1 << i).to_bytes(4, "little")) ^ base for i in range(32)]
    rows = [(cols[i], 1 << i) for i in range(32)]  # (effect on the CRC, bits of x producing it)
    basis: dict[int, tuple[int, int]] = {}
    for effect, x in rows:
        for bit in sorted(basis, reverse=True):
            if effect >> bit & 1:
                effect ^= basis[bit][0]
                x ^= basis[bit][1]
        if effect:
            basis[effect.bit_length() - 1] = (effect, x)
    target, x = base, 0
    for bit in sorted(basis, reverse=True):
        if target >> bit & 1:
            target ^= basis[bit][0]
            x ^= basis[bit][1]
    assert target == 0
    page = prefix + x.to_bytes(4, "little")
    assert zlib.crc32(page) == 0
    return page


@pytest.mark.parametrize("npages", [1, 3, 4, 256])
def test_page_sums_equal_page_sum_of_each_page(npages):
    pages = [os.urandom(PAGE) for _ in range(npages - 1)] + [_page_with_crc_zero(b"x")]
    got = page_sums(b"".join(pages))
    assert list(got) == [page_sum(p) for p in pages]
    assert got[-1] == 0xFFFFFFFF  # a real CRC of 0 never reads as "hole"


def test_a_page_whose_crc_is_zero_is_stored_and_read_back(store):
    store.create(5, "g1")
    lf = store.open(5)
    pages = [_page_with_crc_zero(b"a"), os.urandom(PAGE), _page_with_crc_zero(b"b"), bytes(PAGE)]
    lf.write(0, b"".join(pages))
    lf.write_pages([8 * PAGE], pages[0])
    assert lf.read(0, 4 * PAGE) == b"".join(pages)
    assert lf.read(8 * PAGE, PAGE) == pages[0]
    assert 0 not in lf.sums[:4]


def test_write_pages_in_runs_and_out_of_order(store):
    store.create(5, "g1")
    lf = store.open(5)
    slots = [7, 8, 9, 3, 100, 101, 2, (1 << 12) * 5]  # runs, a step back, a far page (2nd extent)
    data = os.urandom(len(slots) * PAGE)
    lf.write_pages([s * PAGE for s in slots], data)
    for i, s in enumerate(slots):
        assert lf.read(s * PAGE, PAGE) == data[i * PAGE : (i + 1) * PAGE]
    assert lf.read(4 * PAGE, PAGE) == bytes(PAGE)  # untouched pages stay holes
    assert lf.hot.extents == {0, 5 * PAGE * (1 << 12) >> HOT_SHIFT}
    with pytest.raises(OSError):
        lf.write_pages([PAGE + 1], bytes(PAGE))


# --- the per-page verified read (LocalFile.read_page: the same-node API's and the fault path's) ---


def test_read_page_gives_pages_tail_zero_padded_and_zeros_past_the_end(store):
    store.create(1, "g")
    lf = store.open(1)
    data = os.urandom(2 * PAGE + 100)
    lf.write(0, data)
    assert lf.read_page(0) == data[:PAGE]
    assert lf.read_page(1) == data[PAGE : 2 * PAGE]
    assert lf.read_page(2) == data[2 * PAGE :] + bytes(PAGE - 100)  # the tail: a short pread
    assert lf.read_page(3) == bytes(PAGE)  # past the end
    assert lf.read_page(1 << 30) == bytes(PAGE)
    assert lf.read(2 * PAGE + 50, PAGE) == data[2 * PAGE + 50 :]  # one-page read() goes there too
    assert lf.read(PAGE + 1, 10) == data[PAGE + 1 : PAGE + 11]


def test_read_page_of_a_hole_is_zeros(store):
    store.create(1, "g")
    lf = store.open(1)
    lf.write(5 * PAGE, b"x" * PAGE)
    assert lf.sums[2] == 0
    assert lf.read_page(2) == bytes(PAGE)


def _rot(store, fid: int, offset: int, data: bytes) -> None:
    """Changes the data file behind the store's back (bit rot, a stray write)."""
    with open(store.path_of(fid) / "data", "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_read_page_refuses_a_flipped_bit(store):
    store.create(1, "g")
    lf = store.open(1)
    data = os.urandom(4 * PAGE)
    lf.write(0, data)
    _rot(store, 1, 2 * PAGE + 17, bytes([data[2 * PAGE + 17] ^ 0x10]))
    with pytest.raises(CorruptData) as info:
        lf.read_page(2)
    assert info.value.pages == [2]
    with pytest.raises(CorruptData):
        lf.read(2 * PAGE + 100, 10)  # a one-page read() refuses it too
    assert lf.read_page(3) == data[3 * PAGE :]  # the other pages still read


def test_read_page_refuses_garbage_in_a_hole(store):
    store.create(1, "g")
    lf = store.open(1)
    lf.write(8 * PAGE, b"x" * PAGE)
    _rot(store, 1, PAGE + PAGE - 1, b"\x01")  # the hole's last byte
    with pytest.raises(CorruptData) as info:
        lf.read_page(1)
    assert info.value.pages == [1]


def test_read_page_refuses_a_damaged_tail(store):
    store.create(1, "g")
    lf = store.open(1)
    lf.write(0, b"t" * (PAGE + 10))
    _rot(store, 1, PAGE + 3, b"u")
    with pytest.raises(CorruptData):
        lf.read_page(1)


def test_read_page_of_a_damaged_copy_is_missing(store):
    lf = _truncated_behind_our_back(store)
    with pytest.raises(MissingCopy):
        lf.read_page(0)


def test_read_page_racing_a_writer_retries_under_the_lock_instead_of_failing(store):
    """A writer holds the lock between changing the data and its sum: the reader's first check
    fails, its second (under the lock, after the writer) returns the new page."""
    import threading

    store.create(1, "g")
    lf = store.open(1)
    lf.write(0, b"o" * PAGE)
    got = []
    with lf.lock:  # the "writer": new data on disk, its sum not yet updated
        os.pwrite(lf.fd, b"n" * PAGE, 0)
        reader = threading.Thread(target=lambda: got.append(lf.read_page(0)))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive()  # the reader saw the mismatch and waits for the lock
        lf.sums[0] = page_sum(b"n" * PAGE)
    reader.join(10)
    assert got == [b"n" * PAGE]


def test_read_page_after_a_concurrent_truncation_reads_zeros(store):
    """The page was there when the reader looked at the size, gone by its retry under the lock."""
    import threading

    store.create(1, "g")
    lf = store.open(1)
    lf.write(0, os.urandom(3 * PAGE))
    got = []
    with lf.lock:
        os.pwrite(lf.fd, b"junk", 2 * PAGE)  # a mismatch sends the reader to the lock
        reader = threading.Thread(target=lambda: got.append(lf.read_page(2)))
        reader.start()
        reader.join(0.5)
        lf.truncate(PAGE)  # (the lock is reentrant: this thread plays the writer)
    reader.join(10)
    assert got == [bytes(PAGE)]


def test_read_page_of_a_closed_copy_raises_instead_of_returning_zeros(tmp_path):
    store = LocalStore(tmp_path)
    store.create(1, "g")
    lf = store.open(1)
    lf.write(0, b"c" * PAGE)
    store.release(lf)  # the last reference: closes the copy's files
    with pytest.raises(OSError) as info:
        lf.read_page(0)
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize("check", ["page_matches", "_page_matches_py"])
def test_page_matches_with_and_without_the_native_layer(check):
    from gfvm.fm import store as store_mod

    matches = getattr(store_mod, check)
    tail = os.urandom(10)
    full = os.urandom(PAGE)
    assert matches(full, page_sum(full))
    assert not matches(full, page_sum(full) ^ 1)
    assert matches(bytes(PAGE), 0)
    assert not matches(b"\0" * 9 + b"\1", 0)  # a hole with a byte set
    assert matches(tail, page_sum(tail + bytes(PAGE - 10)))  # the tail, zero-padded
    assert not matches(tail, page_sum(tail))
    assert matches(memoryview(_page_with_crc_zero(b"z")), 0xFFFFFFFF)


# --- large writes bypass the page cache (O_DIRECT) ---------------------------------------------


def _resident_pages(path, length: int) -> int:
    """How many of the first `length` bytes' pages of `path` are in the page cache (mincore of a
    shared mapping: mapping a file does not read it in)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    npages = (length + PAGE - 1) // PAGE
    fd = os.open(path, os.O_RDWR)
    try:
        m = mmap.mmap(fd, length)
    finally:
        os.close(fd)
    try:
        anchor = ctypes.c_char.from_buffer(m)
        vec = ctypes.create_string_buffer(npages)
        rc = libc.mincore(ctypes.addressof(anchor), length, vec)
        del anchor
        assert rc == 0, os.strerror(ctypes.get_errno())
        return sum(b & 1 for b in vec.raw)
    finally:
        m.close()


@pytest.fixture
def disk_store():
    """A store on a disk-backed directory (/var/tmp): what O_DIRECT bypasses is only visible
    there (on tmpfs the page cache is the storage)."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="gfvm-test-", dir="/var/tmp")
    try:
        yield LocalStore(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_large_aligned_write_leaves_no_copy_in_the_page_cache(disk_store):
    store = disk_store
    from gfvm.fm.store import DIRECT_MIN

    store.create(9, "g1")
    lf = store.open(9)
    assert lf.direct_fd is not None, "the test directory's filesystem has no O_DIRECT"
    data = os.urandom(4 * DIRECT_MIN)
    lf.write(0, data)
    assert _resident_pages(store.path_of(9) / "data", len(data)) == 0
    assert lf.read(0, len(data)) == data  # and reads see it (from disk)


def test_unaligned_large_write_splits_into_cached_edges_and_direct_middle(disk_store):
    store = disk_store
    from gfvm.fm.store import DIRECT_MIN

    store.create(9, "g1")
    lf = store.open(9)
    offset = 3 * PAGE + 100
    data = os.urandom(2 * DIRECT_MIN + 2 * PAGE + 7)
    lf.write(offset, data)
    end = offset + len(data)
    assert lf.size == end
    resident = _resident_pages(store.path_of(9) / "data", end)
    assert 1 <= resident <= 2  # the partial head and tail pages only
    assert lf.read(0, end) == bytes(offset) + data


def test_direct_write_over_cached_dirty_pages_keeps_the_newest_bytes(store):
    store.create(9, "g1")
    lf = store.open(9)
    lf.write(PAGE + 10, b"old bytes, cached and dirty")  # small: through the page cache
    new = os.urandom(64 * PAGE)
    lf.write(0, new)  # direct, over the dirty cached page
    lf.write(5 * PAGE + 1, b"small again")  # cached, inside the direct range
    want = bytearray(new)
    want[5 * PAGE + 1 : 5 * PAGE + 12] = b"small again"
    assert lf.read(0, len(new)) == bytes(want)
    lf.flush()
    assert (store.path_of(9) / "data").read_bytes() == bytes(want)


def test_write_pages_runs_go_direct_and_read_back(disk_store):
    store = disk_store
    store.create(9, "g1")
    lf = store.open(9)
    offsets = [p * PAGE for p in range(100, 164)] + [7 * PAGE]  # a 64-page run and a lone page
    data = os.urandom(len(offsets) * PAGE)
    lf.write_pages(offsets, data)
    assert _resident_pages(store.path_of(9) / "data", 164 * PAGE) == 1  # the lone page only
    for i, off in enumerate(offsets):
        assert lf.read(off, PAGE) == data[i * PAGE : (i + 1) * PAGE]


def test_a_replicas_write_stays_in_the_page_cache(store):
    store.create(9, "g1")
    lf = store.open(9)
    data = os.urandom(64 * PAGE)
    lf.write(0, data, cached=True)
    lf.write_pages([p * PAGE for p in range(64, 128)], data, cached=True)
    assert _resident_pages(store.path_of(9) / "data", 128 * PAGE) == 128
    assert lf.read(0, 64 * PAGE) == data and lf.read(64 * PAGE, 64 * PAGE) == data


def test_without_o_direct_writes_go_through_the_page_cache(tmp_path):
    from gfvm.fm.store import write_data

    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        data = os.urandom(1 << 20)
        write_data(fd, None, data, 4096)
        assert os.pread(fd, len(data), 4096) == data
        assert _resident_pages(path, 4096 + len(data)) >= 256
    finally:
        os.close(fd)


# --- read_pages: a batch of verified pages in one native call ----------------------------------


def test_read_pages_gives_pages_in_the_order_asked_tail_padded_zeros_past_the_end(store):
    store.create(1, "g")
    lf = store.open(1)
    data = os.urandom(6 * PAGE + 100)
    lf.write(0, data)
    lf.write(20 * PAGE, b"z" * PAGE)  # pages 7..19 a hole
    pages = [5, 0, 6, 9, 5, 40, 20]
    got = lf.read_pages(pages)
    want = [data[5 * PAGE : 6 * PAGE], data[:PAGE], data[6 * PAGE :] + bytes(PAGE - 100),
            bytes(PAGE), data[5 * PAGE : 6 * PAGE], bytes(PAGE), b"z" * PAGE]
    assert bytes(got) == b"".join(want)


def test_read_pages_fills_the_buffer_given(store):
    store.create(1, "g")
    lf = store.open(1)
    data = os.urandom(4 * PAGE)
    lf.write(0, data)
    out = bytearray(5 * PAGE)
    assert lf.read_pages([3, 1], out) is out
    assert out[: 2 * PAGE] == data[3 * PAGE :] + data[PAGE : 2 * PAGE]
    with pytest.raises(ValueError):
        lf.read_pages([0] * 6, out)


def test_read_pages_refuses_a_damaged_page_and_garbage_in_a_hole(store):
    store.create(1, "g")
    lf = store.open(1)
    data = os.urandom(4 * PAGE)
    lf.write(0, data)
    lf.write(8 * PAGE, b"x" * PAGE)
    _rot(store, 1, 2 * PAGE + 9, bytes([data[2 * PAGE + 9] ^ 1]))
    with pytest.raises(CorruptData) as info:
        lf.read_pages([0, 1, 2, 3])
    assert info.value.pages == [2]
    _rot(store, 1, 5 * PAGE, b"\x01")
    with pytest.raises(CorruptData) as info:
        lf.read_pages([3, 5])
    assert info.value.pages == [5]
    assert bytes(lf.read_pages([3, 1])) == data[3 * PAGE :] + data[PAGE : 2 * PAGE]


def test_read_pages_racing_a_writer_never_fails(store):
    # Pages rewritten while batches read them: a page read between its data and its sum
    # mismatches in the batch and is read again under the lock (never CorruptData).
    import threading

    store.create(1, "g")
    lf = store.open(1)
    lf.write(0, os.urandom(64 * PAGE))
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            lf.write_pages([p * PAGE for p in range(0, 64, 3)], os.urandom(22 * PAGE))

    t = threading.Thread(target=writer)
    t.start()
    try:
        out = bytearray(64 * PAGE)
        for _ in range(300):
            lf.read_pages(range(64), out)
    finally:
        stop.set()
        t.join()


def test_read_pages_of_a_damaged_copy_is_missing(store):
    store.create(1, "g")
    lf = store.open(1)
    lf.write(0, os.urandom(2 * PAGE))
    lf.damaged = "test"
    with pytest.raises(MissingCopy):
        lf.read_pages([0])
