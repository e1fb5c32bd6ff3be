"""The File Manager's local store: this node's copies of files, under `<state>/fm/`.

Layout (all files 0600, directories 0700):
    fm/node.json              this node's incarnation counter (bumped at every daemon start)
    fm/files/<fid>/data       the bytes of the copy; sparse; its length is the file size
    fm/files/<fid>/sums       one u32 per 4 KiB page: crc32 of the page (0 = never written: a hole)
    fm/files/<fid>/info.json  per-copy metadata: fid, data generation, epoch/seq, size at last flush
    fm/files/<fid>/hot        the intent log: extents that may have changed since the last flush
    fm/files/<fid>/bitmap.<n> (masters only) chunks peer <n> missed while out of sync
    fm/tmp/, fm/trash/        copies being built / copies deleted but not yet purged

Crash discipline (why not a write-ahead log of data): copies are GiB-sized paging files written in
batches of 4 KiB pages, and every byte already has other copies on other nodes. A data WAL would
double every write for nothing those copies do not already give. So, as DRBD's activity log:
- data and sums are written in place; before any byte of a 16 MiB extent changes, the extent is
  recorded in `hot` (two checksummed 4 KiB slots written alternately and fdatasync'd, so a torn
  write leaves the previous slot valid). A flush (fsync of data and sums) then empties `hot`.
  After a crash, only hot extents can differ between data, sums and the other copies: they are
  re-fetched from an in-sync copy (or, when this is the only copy, re-checksummed).
- info.json is replaced atomically (write tmp, fsync, rename, fsync dir), as is node.json.
- a copy comes into existence atomically: built under tmp/, fsynced, renamed into files/.
- deletion is a rename into trash/ (atomic), purged later; nothing else ever removes a copy.
- the size is the data file's length; info.json keeps the size at the last flush or truncate, so
  an external truncation (the data file shorter than that) is detected as damage at open.

The master's large writes bypass the page cache (O_DIRECT) when they carry at least `DIRECT_MIN`
bytes of whole pages; a replica's writes go through it (`cached=True`). Why: the master's copy is
the paging file of a process that runs on this node and already holds those pages in its own
memory, so caching them again takes as much RAM again for nothing, and allocating those cache pages
was the largest CPU cost of a replicated write (measured: 0.6-1.5 ms per MiB for buffered writes
into fresh page cache on our VMs, 0.1 ms for O_DIRECT from a reused aligned buffer). A replica's
cached copy is the opposite: a warm standby, so that after a migration to that node its faults
are served from memory (the kernel drops it when memory is needed). Smaller and unaligned pieces
go through the page cache (the kernel keeps the two coherent: a direct write first writes back and
drops cached pages of its range), and so do resync and repair chunks. Nothing else changes:
durability still comes from the fsyncs of `flush`, and reads use the page cache. A filesystem
without O_DIRECT (EINVAL at open) gets buffered writes only.

Checksums are verified on every read (`LocalFile.read`, `LocalFile.read_page`): a page whose crc
differs from its sum raises CorruptData naming the pages; it is never returned. A sum of 0 means
"never written", and the page must then read as zeros. crc32 values of 0 are stored as 0xFFFFFFFF
so 0 stays free.

Threads: every method here blocks (file I/O) and is safe to call from several threads at once;
call them from worker threads (trio.to_thread.run_sync), never from the trio thread.
"""

from __future__ import annotations

import array
import errno
import json
import logging
import mmap
import os
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gfvm.errors import GfvmError, NotFound

log = logging.getLogger(__name__)

PAGE = 4096
PAGE_SHIFT = 12
#: granularity of the intent log (hot extents)
HOT_SHIFT = 24  # 16 MiB
#: granularity of resync (bitmaps, resync transfers)
CHUNK_SHIFT = 20  # 1 MiB
CHUNK = 1 << CHUNK_SHIFT
#: largest file size a copy may have (the sums array must stay small enough to keep in memory)
MAX_FILE_SIZE = 1 << 40  # 1 TiB -> 1 GiB of sums at most
ZERO_PAGE = bytes(PAGE)
_HOLE = 0


class StoreError(GfvmError):
    """The local store cannot do what was asked (I/O error, damaged copy)."""


class CorruptData(StoreError):
    """A page's checksum does not match its data: the copy must not be read there."""

    def __init__(self, fid: int, pages: list[int]):
        shown = ", ".join(str(p) for p in pages[:8]) + (" ..." if len(pages) > 8 else "")
        super().__init__(f"file {fid}: checksum mismatch on page(s) {shown} of the local copy")
        self.fid = fid
        self.pages = pages


class MissingCopy(StoreError):
    """This node has no (usable) local copy of the file."""

    errno = errno.EIO


def page_sum(page: bytes | memoryview) -> int:
    """The stored checksum of one full page: crc32, with 0 remapped so that 0 means 'hole'."""
    return zlib.crc32(page) or 0xFFFFFFFF


def _page_matches_py(page: bytes | memoryview, want: int) -> bool:
    if want == _HOLE:
        return page == ZERO_PAGE[: len(page)]
    if len(page) < PAGE:  # the file's tail page: its sum covers it zero-padded
        page = bytes(page).ljust(PAGE, b"\0")
    return page_sum(page) == want


try:  # the native layer checksums pages in C (PCLMULQDQ folding), without holding the GIL
    from gfvm.native import crc32_pages as _crc32_pages
    from gfvm.native import page_bytes_match as _page_bytes_match
    from gfvm.native import page_matches as _page_matches
    from gfvm.native import pread_pages as _pread_pages
except (ImportError, AttributeError):  # not built here, or an older native layer
    _crc32_pages = None
    _pread_pages = None
    _page_matches = _page_matches_py

    def _page_bytes_match(page: bytes, length: int, want: int) -> int:
        return length <= PAGE and _page_matches_py(page, want)


def page_matches(page: bytes | memoryview, want: int) -> bool:
    """Whether one page (at most PAGE bytes; a shorter one is the file's tail, checked
    zero-padded) matches its stored sum `want` (0: a hole, all zeros). Blocks for the
    computation only (~0.1 us with the native layer, ~0.7 us with zlib)."""
    return _page_matches(page, want)

#: below this many pages one zlib call per page is cheaper than a call into the native layer
_NATIVE_MIN_PAGES = 4


def page_sums(buf: bytes | bytearray | memoryview, n: int | None = None) -> array.array:
    """The stored checksums (see `page_sum`) of the first `n` whole pages of `buf` (default:
    all of its whole pages), as array('I'). Blocks for the computation; with the native layer
    it runs without the GIL, so the trio thread is not held up by a worker checksumming a MiB."""
    mv = memoryview(buf)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    if n is None:
        n = len(mv) >> PAGE_SHIFT
    if _crc32_pages is not None and n >= _NATIVE_MIN_PAGES:
        out = _crc32_pages(mv, n)
        if 0 in out:  # about one page in 4 billion
            for i, v in enumerate(out):
                if v == 0:
                    out[i] = 0xFFFFFFFF
        return out
    return array.array("I", [zlib.crc32(mv[i << PAGE_SHIFT : (i + 1) << PAGE_SHIFT]) or 0xFFFFFFFF
                             for i in range(n)])


#: a write with at least this many bytes of whole pages sends them with O_DIRECT (module header)
DIRECT_MIN = 64 * 1024
#: largest piece one direct pwrite sends (the size of a thread's bounce buffer)
_DIRECT_PIECE = 8 << 20


class _BounceBuffer(threading.local):
    """One page-aligned buffer per thread for O_DIRECT writes (Python's bytes are not aligned).
    It is reused for the thread's life on purpose: memory that stays touched is cheap to copy
    into, fresh memory is not."""

    buf: mmap.mmap | None = None

    def get(self, n: int) -> mmap.mmap:
        if self.buf is None or len(self.buf) < n:
            if self.buf is not None:
                self.buf.close()
            self.buf = mmap.mmap(-1, max(n, 1 << 20))
        return self.buf


_bounce = _BounceBuffer()


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    written = os.pwrite(fd, data, offset)
    if written != len(data):
        raise OSError(errno.EIO, f"short write ({written} of {len(data)} bytes)")


def _pwrite_direct(fd: int, data: memoryview, offset: int) -> None:
    """Writes `data` (whole pages, `offset` page-aligned) through the O_DIRECT descriptor `fd`,
    copied through this thread's bounce buffer up to `_DIRECT_PIECE` bytes at a time."""
    for start in range(0, len(data), _DIRECT_PIECE):
        piece = data[start : start + _DIRECT_PIECE]
        n = len(piece)
        with memoryview(_bounce.get(n)) as aligned:
            aligned[:n] = piece
            _pwrite_all(fd, aligned[:n], offset + start)


def open_direct(path: Path | str) -> int | None:
    """A read-write O_DIRECT descriptor of `path`, or None where the filesystem has no O_DIRECT."""
    try:
        return os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return None


def write_data(fd: int, direct_fd: int | None, data: bytes | memoryview, offset: int) -> None:
    """Writes all of `data` at `offset` of a data file (blocks): the whole pages in the middle
    with O_DIRECT through `direct_fd` when they are at least DIRECT_MIN bytes, the rest (and
    everything when `direct_fd` is None) through `fd` and the page cache."""
    mv = memoryview(data)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    end = offset + len(mv)
    lo = (offset + PAGE - 1) & ~(PAGE - 1)  # the aligned middle: [lo, hi)
    hi = end & ~(PAGE - 1)
    if direct_fd is None or hi - lo < DIRECT_MIN:
        _pwrite_all(fd, mv, offset)
        return
    if lo > offset:
        _pwrite_all(fd, mv[: lo - offset], offset)
    _pwrite_direct(direct_fd, mv[lo - offset : hi - offset], lo)
    if end > hi:
        _pwrite_all(fd, mv[hi - offset :], hi)


def hot_extent(offset: int) -> int:
    return offset >> HOT_SHIFT


def chunks_of(offset: int, length: int) -> range:
    """The resync chunks a byte range touches."""
    if length <= 0:
        return range(0)
    return range(offset >> CHUNK_SHIFT, ((offset + length - 1) >> CHUNK_SHIFT) + 1)


def _runs(offsets) -> list[tuple[int, int]]:
    """Index ranges [i, j) of `offsets` (page-aligned) whose pages are adjacent on disk, in order."""
    n = len(offsets)
    first = offsets[0]
    if offsets[-1] == first + (n - 1) * PAGE and list(offsets) == list(range(first, first + n * PAGE, PAGE)):
        return [(0, n)]  # the pager's usual batch: consecutive slots
    runs = []
    i = 0
    while i < n:
        j = i + 1
        while j < n and offsets[j] == offsets[j - 1] + PAGE:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replaces `path` with `data` so that a crash leaves the old or the new content (blocks)."""
    # A name of our own: two writers of one path must not rename each other's temporary file.
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# --- the intent log ------------------------------------------------------------------------------

_HOT_MAGIC = b"GFHI"
_HOT_HEAD = struct.Struct("<4sHHQI")  # magic, version, flags, counter, n
_HOT_SLOT = 4096
_HOT_MAX = (_HOT_SLOT - _HOT_HEAD.size - 4) // 4
_HOT_ALL = 1  # flag: everything may be hot (overflow, or unknown)


class IntentLog:
    """The persistent set of hot extents of one copy (see the module header). Blocking, locked by
    the caller (LocalFile holds its lock around every call)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.counter = 0
        self.all = False
        self.extents: set[int] = set()
        #: extent -> write number that last touched it (in memory: what `clear_upto` may drop)
        self.touched: dict[int, int] = {}
        self._load()

    def _load(self) -> None:
        best = None
        for slot in (0, 1):
            raw = os.pread(self.fd, _HOT_SLOT, slot * _HOT_SLOT)
            if len(raw) < _HOT_HEAD.size + 4:
                continue
            magic, version, flags, counter, n = _HOT_HEAD.unpack_from(raw)
            if magic != _HOT_MAGIC or version != 1 or n > _HOT_MAX:
                continue
            end = _HOT_HEAD.size + 4 * n
            (crc,) = struct.unpack_from("<I", raw, end)
            if zlib.crc32(raw[:end]) != crc:
                continue
            if best is None or counter > best[0]:
                ext = set(struct.unpack_from(f"<{n}I", raw, _HOT_HEAD.size))
                best = (counter, bool(flags & _HOT_ALL), ext)
        if best is not None:
            self.counter, self.all, self.extents = best
            # loaded extents were touched before this run: any flush of this run may drop them
            self.touched = dict.fromkeys(self.extents, 0)
            if self.all:
                self.touched_all_at = 0
        elif os.fstat(self.fd).st_size > 0:
            # Both slots unreadable: we cannot know what changed, so assume everything did.
            log.warning("%s: intent log unreadable, treating the whole copy as hot", self.path)
            self.all = True
            self.touched_all_at = 0

    @property
    def empty(self) -> bool:
        return not self.all and not self.extents

    def _persist(self) -> None:
        self.counter += 1
        ext = sorted(self.extents)
        flags = _HOT_ALL if (self.all or len(ext) > _HOT_MAX) else 0
        if flags:
            ext = []
        body = _HOT_HEAD.pack(_HOT_MAGIC, 1, flags, self.counter, len(ext))
        body += struct.pack(f"<{len(ext)}I", *ext)
        body += struct.pack("<I", zlib.crc32(body))
        os.pwrite(self.fd, body.ljust(_HOT_SLOT, b"\0"), (self.counter % 2) * _HOT_SLOT)
        os.fdatasync(self.fd)

    def mark(self, extents: set[int], wnum: int = 0) -> None:
        """Records `extents` as hot, durably, before the caller modifies them (write `wnum`)."""
        for e in extents:
            self.touched[e] = wnum
        new = extents - self.extents
        if new and not self.all:
            self.extents |= new
            self._persist()

    def clear_upto(self, wnum: int) -> None:
        """Forgets the extents last touched by writes numbered <= `wnum` (they are durable
        everywhere that matters); keeps those touched later, and 'all' if it was set before."""
        keep = {e for e in self.extents if self.touched.get(e, wnum + 1) > wnum}
        if self.all and self.touched_all_at > wnum:
            return
        if keep != self.extents or self.all:
            self.extents = keep
            self.all = False
            self.touched = {e: w for e, w in self.touched.items() if e in keep}
            self._persist()

    touched_all_at = 1 << 62  # the write number that set 'all' (loaded 'all': never cleared early)

    def mark_all(self, wnum: int = 0) -> None:
        self.touched_all_at = wnum
        if not self.all:
            self.all = True
            self._persist()

    def clear(self) -> None:
        """Empties the log; call only after data and sums are fsynced."""
        if not self.empty:
            self.extents = set()
            self.all = False
            self._persist()

    def close(self) -> None:
        os.close(self.fd)


# --- one local copy ------------------------------------------------------------------------------


@dataclass
class CopyInfo:
    """What info.json holds about a copy (persisted at flush, truncate and state changes)."""

    fid: int
    gen: str  # the data generation this copy belongs to ("" = unknown / being built)
    epoch: int = 0
    seq: int = 0  # last write sequence number applied when info was last persisted
    size: int = 0  # file size at the last flush or truncate
    #: generation history this copy has seen (newest last); used to validate resync bitmaps
    history: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "CopyInfo":
        d = json.loads(raw)
        return cls(
            fid=int(d["fid"]), gen=str(d["gen"]), epoch=int(d.get("epoch", 0)),
            seq=int(d.get("seq", 0)), size=int(d.get("size", 0)),
            history=[str(g) for g in d.get("history", [])],
        )


class LocalFile:
    """An open local copy: data, sums, info, intent log. All methods block; thread-safe.

    Writers (write, truncate, write_chunk) hold `lock`; readers do not, and retry under the
    lock when a page looks corrupt, so a read racing a write is never mistaken for damage.
    """

    def __init__(self, store: "LocalStore", fid: int, path: Path):
        self.store = store
        self.fid = fid
        self.path = path
        self.lock = threading.RLock()
        self.info = CopyInfo.from_json((path / "info.json").read_bytes())
        if self.info.fid != fid:
            raise StoreError(f"{path}: info.json names file {self.info.fid}, expected {fid}")
        self.fd = os.open(path / "data", os.O_RDWR)
        #: the same data file for large page-aligned writes (None: no O_DIRECT here)
        self.direct_fd = open_direct(path / "data")
        self.sums_fd = os.open(path / "sums", os.O_RDWR)
        self.hot = IntentLog(path / "hot")
        raw = os.pread(self.sums_fd, os.fstat(self.sums_fd).st_size, 0)
        self.sums = array.array("I")
        self.sums.frombytes(raw[: len(raw) - len(raw) % 4])
        self.size = os.fstat(self.fd).st_size
        #: set when the copy is known damaged (externally truncated...): never read from it
        self.damaged: str | None = None
        #: the copy was deleted (moved to trash) while open: handles still read and write it
        self.deleted = False
        if self.size < self.info.size:
            self.damaged = f"data is {self.size} bytes, {self.info.size} expected"
        self.refs = 0  # open handles (LocalStore.open/close)
        self.wnum = 0  # numbers every change; a flush returns the number it covers
        #: the intent log was not empty when the copy was opened: a crash left it unclean
        self.unclean_at_open = not self.hot.empty

    # -- reading --

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset`, verified against the sums (blocks).

        Raises CorruptData if a page does not match. Short only at end of file.
        """
        if self.damaged:
            raise MissingCopy(f"file {self.fid}: local copy damaged ({self.damaged})")
        if offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        first = offset >> PAGE_SHIFT
        last = (offset + length - 1) >> PAGE_SHIFT
        if first == last:  # within one page (the fault path, most FUSE reads): the fast path
            page = self.read_page(first)
            skip = offset - (first << PAGE_SHIFT)
            return page if length == PAGE else page[skip : skip + length]
        start = first << PAGE_SHIFT
        raw = os.pread(self.fd, ((last + 1) << PAGE_SHIFT) - start, start)
        bad = self._verify(raw, first, last)
        if bad:
            with self.lock:  # a concurrent writer may have been between data and sums: retry
                raw = os.pread(self.fd, ((last + 1) << PAGE_SHIFT) - start, start)
                bad = self._verify(raw, first, last)
            if bad:
                raise CorruptData(self.fid, bad)
        skip = offset - start
        if skip == 0 and len(raw) == length:
            return raw
        return raw[skip : skip + length]

    def read_page(self, page: int) -> bytes:
        """Page `page` of the copy, verified: PAGE bytes, zeros past the end of the file (blocks).

        Raises CorruptData if the page does not match its sum (a hole: if it is not all zeros).
        This is LocalReader.read_page (the same-node API's verified per-page read) and one-page
        `read`s: one pread and one direct call into C for the check, with as little Python
        around them as possible (this runs at ~1.5 us per page, Python's own pread at ~1). See
        `read` for the locking rule.
        """
        # Measured alternatives (random reads of a 64-256 MiB copy in the page cache, thread CPU
        # time): pread and check in one C call into a per-thread buffer, then a copy into bytes,
        # costs ~0.1 us more than os.pread (which makes its bytes directly) plus this check.
        # Copying from a mapping of the data file saves the system call, but with each page read
        # once it pays page faults and a TLB miss per page (4 KiB PTEs, where the kernel's copy
        # goes through its huge-page direct map): ~0.1-0.2 us gained in all, not enough for
        # pread's speed, for a process-wide SIGBUS guard (a file shrinking under the mapping, a
        # disk error) and a GiB of address space per open copy. What is left above pread is the
        # check (~0.1 us), the cffi call and this function's Python (~0.1-0.2 us each).
        if self.damaged:
            raise MissingCopy(f"file {self.fid}: local copy damaged ({self.damaged})")
        offset = page << PAGE_SHIFT
        if offset >= self.size:
            return ZERO_PAGE
        try:  # (no length check first: writers may shrink the array between the two)
            want = self.sums[page]
        except IndexError:
            want = _HOLE
        data = os.pread(self.fd, PAGE, offset)
        if not _page_bytes_match(data, len(data), want):
            data = self._read_page_locked(page)
        return data if len(data) == PAGE else data.ljust(PAGE, b"\0")

    def read_pages(self, pages: Sequence[int], out: bytearray | memoryview | None = None
                   ) -> bytearray | memoryview:
        """Pages `pages` of the copy (any order, repeats allowed), verified, one after the other:
        len(pages) * PAGE bytes, zeros past the end of the file, into `out` when given (a
        writable buffer of at least that size; reuse one across calls: fresh memory costs a fault
        per page) or a new bytearray. Returns the buffer. Blocks on disk I/O.

        Raises CorruptData for a page that does not match its sum. The batch is read and checked
        in one native call (a pread and a check per page, ~0.1 us above the plain pread, where a
        Python call per page costs more than the check); a page it stops at (the end of the file,
        a mismatch) goes through `read_page`, which retries under the lock."""
        if self.damaged:
            raise MissingCopy(f"file {self.fid}: local copy damaged ({self.damaged})")
        n = len(pages)
        if out is None:
            out = bytearray(n * PAGE)
        view = memoryview(out)
        if view.nbytes < n * PAGE:
            raise ValueError(f"{n} pages need {n * PAGE} bytes, the buffer has {view.nbytes}")
        if _pread_pages is None:
            for i, p in enumerate(pages):
                view[i * PAGE : (i + 1) * PAGE] = self.read_page(p)
            return out
        where = array.array("Q", pages)
        with self.lock:  # the sums as no writer is halfway (a read racing a write: see `read`)
            sums, nsums = self.sums, len(self.sums)
            wants = array.array("I", [sums[p] if p < nsums else _HOLE for p in where])
        done = 0
        while done < n:
            done += _pread_pages(self.fd, where[done:] if done else where, view[done * PAGE :],
                                 wants[done:] if done else wants)
            if done < n:  # the end of the file, a page written meanwhile, or damage
                view[done * PAGE : (done + 1) * PAGE] = self.read_page(where[done])
                done += 1
        return out

    def _read_page_locked(self, page: int) -> bytes:
        """read_page's second attempt, under the lock: a writer may have been between data and
        sums. Raises CorruptData if the page still does not match."""
        with self.lock:
            offset = page << PAGE_SHIFT
            if offset >= self.size:  # truncated meanwhile
                return ZERO_PAGE
            want = self.sums[page] if page < len(self.sums) else _HOLE
            data = os.pread(self.fd, PAGE, offset)
            if _page_matches(data, want):
                return data
        raise CorruptData(self.fid, [page])

    def _verify(self, raw: bytes, first: int, last: int) -> list[int]:
        """The pages in [first, last] whose bytes in `raw` (read from page `first` on) do not
        match their sums. Whole pages are checksummed in one call and compared as arrays; only
        pages that differ (holes, the tail page, damage) are looked at one by one."""
        sums = self.sums
        nsums = len(sums)
        mv = memoryview(raw)
        whole = len(raw) >> PAGE_SHIFT
        suspects = range(first, last + 1)
        if whole >= _NATIVE_MIN_PAGES:
            got = page_sums(mv, whole)
            if sums[first : first + whole] == got:
                suspects = range(first + whole, last + 1)
            else:
                want = sums[first : first + whole]
                want.extend([_HOLE] * (whole - len(want)))
                suspects = [first + i for i in range(whole) if got[i] != want[i]]
                suspects += range(first + whole, last + 1)
        bad = []
        for page in suspects:
            i = page - first
            want = sums[page] if page < nsums else _HOLE
            if not _page_matches(mv[i << PAGE_SHIFT : (i + 1) << PAGE_SHIFT], want):
                bad.append(page)
        return bad

    def read_chunk(self, chunk: int) -> tuple[bytes, list[int]]:
        """One resync chunk (up to CHUNK bytes, shorter at EOF) with its page sums, verified.

        Used at the resync source: a corrupt page raises CorruptData instead of being sent on.
        """
        offset = chunk << CHUNK_SHIFT
        data = self.read(offset, CHUNK)
        first = offset >> PAGE_SHIFT
        npages = (len(data) + PAGE - 1) >> PAGE_SHIFT
        sums = [self.sums[p] if p < len(self.sums) else _HOLE for p in range(first, first + npages)]
        return data, sums

    # -- writing --

    def _ensure_sums(self, npages: int) -> None:
        if len(self.sums) < npages:
            self.sums.extend([_HOLE] * (npages - len(self.sums)))

    def write(self, offset: int, data: bytes | memoryview, *, cached: bool = False) -> None:
        """Writes `data` at `offset` (any alignment) and updates the sums (blocks). `cached`:
        keep the bytes in the page cache (a replica's write; see the module header).

        The touched extents are recorded in the intent log first.
        """
        n = len(data)
        if n == 0:
            return
        if offset < 0 or offset + n > MAX_FILE_SIZE:
            raise OSError(errno.EFBIG, f"write past the {MAX_FILE_SIZE}-byte limit")
        end = offset + n
        first_whole = (offset + PAGE - 1) >> PAGE_SHIFT
        end_whole = end >> PAGE_SHIFT  # pages [first_whole, end_whole) lie entirely in data
        whole = None
        if end_whole > first_whole:
            skip = (first_whole << PAGE_SHIFT) - offset
            whole = page_sums(memoryview(data)[skip:], end_whole - first_whole)
        with self.lock:
            self.wnum += 1
            self.hot.mark(set(range(hot_extent(offset), hot_extent(end - 1) + 1)), self.wnum)
            write_data(self.fd, None if cached else self.direct_fd, data, offset)
            if end > self.size:
                self.size = end
            self._update_sums(offset, end, whole)

    def write_pages(self, offsets: list[int] | tuple[int, ...], data: bytes | memoryview, *,
                    cached: bool = False) -> None:
        """Writes len(offsets) whole pages: page i of `data` at byte offset offsets[i] (blocks).
        `cached` as in `write`.

        Offsets must be page-aligned; adjacent pages are written with one pwrite."""
        mv = memoryview(data)
        n = len(offsets)
        if len(mv) != n * PAGE:
            raise OSError(errno.EINVAL, f"{n} pages need {n * PAGE} bytes")
        if not offsets:
            return
        lo_off, hi_off = min(offsets), max(offsets)
        if lo_off < 0 or hi_off + PAGE > MAX_FILE_SIZE or any(off & (PAGE - 1) for off in offsets):
            bad = next(o for o in offsets if o % PAGE or o < 0 or o + PAGE > MAX_FILE_SIZE)
            raise OSError(errno.EINVAL, f"page offset {bad} is not page-aligned or too large")
        new_sums = page_sums(mv, n)
        runs = _runs(offsets)
        with self.lock:
            self.wnum += 1
            hot = set()
            for i, j in runs:
                hot.update(range(hot_extent(offsets[i]), hot_extent(offsets[j - 1]) + 1))
            self.hot.mark(hot, self.wnum)
            for i, j in runs:  # one pwrite per run of adjacent pages
                write_data(self.fd, None if cached else self.direct_fd, mv[i * PAGE : j * PAGE], offsets[i])
            end = hi_off + PAGE
            if end > self.size:
                self.size = end
            self._ensure_sums(end >> PAGE_SHIFT)
            sums = self.sums
            for i, j in runs:
                p = offsets[i] >> PAGE_SHIFT
                sums[p : p + j - i] = new_sums[i:j]
            lo = lo_off >> PAGE_SHIFT
            hi = (hi_off >> PAGE_SHIFT) + 1
            if hi - lo <= 4 * n:  # one write of the covering span of sums
                os.pwrite(self.sums_fd, sums[lo:hi].tobytes(), lo * 4)
            else:
                for i, j in runs:
                    p = offsets[i] >> PAGE_SHIFT
                    os.pwrite(self.sums_fd, sums[p : p + j - i].tobytes(), p * 4)

    def _update_sums(self, start: int, end: int, whole: array.array | None) -> None:
        """Recomputes the sums of the pages in [start, end) after a write there, and writes them.

        `whole`: the sums of the pages lying entirely inside [start, end), computed from the
        written bytes (None: none given); the others (partial pages at either end, or all when
        nothing is given) are checksummed as they now are on disk. Call with the lock held."""
        first = start >> PAGE_SHIFT
        last = (end - 1) >> PAGE_SHIFT
        self._ensure_sums(last + 1)
        sums = self.sums
        first_whole = (start + PAGE - 1) >> PAGE_SHIFT
        end_whole = end >> PAGE_SHIFT
        if whole is not None:
            sums[first_whole:end_whole] = whole
            for page in sorted({p for p in (first, last) if not first_whole <= p < end_whole}):
                self._sum_from_disk(page, page + 1)
        else:
            self._sum_from_disk(first, last + 1)
        os.pwrite(self.sums_fd, sums[first : last + 1].tobytes(), first * 4)

    def _sum_from_disk(self, first: int, end: int) -> None:
        """Sets the sums of pages [first, end) from the data file as it is (zero-padded past
        its end), reading up to a chunk at a time."""
        step = CHUNK >> PAGE_SHIFT
        for p in range(first, end, step):
            n = min(step, end - p)
            raw = os.pread(self.fd, n << PAGE_SHIFT, p << PAGE_SHIFT)
            if len(raw) < n << PAGE_SHIFT:
                raw = raw.ljust(n << PAGE_SHIFT, b"\0")
            self.sums[p : p + n] = page_sums(raw, n)

    def write_chunk(self, chunk: int, data: bytes | memoryview, sums: list[int], size: int) -> None:
        """Installs one resync chunk received from the resync source (blocks).

        `sums` are the source's page sums; each page is checked against them before it is
        written, so a chunk damaged in transit is refused (CorruptData) and nothing is stored.
        `size` is the file size at the source when the chunk was read.
        """
        offset = chunk << CHUNK_SHIFT
        mv = memoryview(data)
        whole = min(len(data) >> PAGE_SHIFT, len(sums))
        got = page_sums(mv, whole)
        for i, want in enumerate(sums):
            if i < whole and got[i] == want:
                continue
            page = mv[i << PAGE_SHIFT : (i + 1) << PAGE_SHIFT]
            ok = (page == ZERO_PAGE[: len(page)]) if want == _HOLE else (
                page_sum(bytes(page).ljust(PAGE, b"\0")) == want)
            if not ok:
                raise CorruptData(self.fid, [(offset >> PAGE_SHIFT) + i])
        with self.lock:
            self.wnum += 1
            self.hot.mark({hot_extent(offset)}, self.wnum)
            if len(data):
                _pwrite_all(self.fd, data, offset)
            chunk_end = offset + len(data)
            first = offset >> PAGE_SHIFT
            npages = (chunk_end - offset + PAGE - 1) >> PAGE_SHIFT
            self._ensure_sums(first + npages)
            for i in range(npages):
                self.sums[first + i] = sums[i] if i < len(sums) else _HOLE
            os.pwrite(self.sums_fd, self.sums[first : first + npages].tobytes(), first * 4)
            self._set_size(size)

    def truncate(self, size: int) -> None:
        """Sets the file size (blocks); persists info so the new size survives a crash."""
        if size < 0 or size > MAX_FILE_SIZE:
            raise OSError(errno.EFBIG if size > 0 else errno.EINVAL, f"bad size {size}")
        with self.lock:
            self.wnum += 1
            self.hot.mark({hot_extent(min(size, self.size))}, self.wnum)
            self._set_size(size)
            os.fsync(self.fd)
            os.fsync(self.sums_fd)
            self.info.size = size
            self.save_info()

    def _set_size(self, size: int) -> None:
        if size == self.size and os.fstat(self.fd).st_size == size:
            return
        os.ftruncate(self.fd, size)
        npages = (size + PAGE - 1) >> PAGE_SHIFT
        if len(self.sums) > npages:
            del self.sums[npages:]
        self._ensure_sums(npages)
        if size % PAGE:  # the tail page's sum covers its zero padding
            last = size >> PAGE_SHIFT
            raw = os.pread(self.fd, PAGE, last << PAGE_SHIFT).ljust(PAGE, b"\0")
            self.sums[last] = _HOLE if raw == ZERO_PAGE else page_sum(raw)
        os.ftruncate(self.sums_fd, npages * 4)
        if npages:
            os.pwrite(self.sums_fd, self.sums[npages - 1 :].tobytes(), (npages - 1) * 4)
        self.size = size

    def flush(self, *, gen: str | None = None, epoch: int | None = None, seq: int | None = None,
              clear: bool = True) -> int:
        """Makes data, sums and info durable (blocks: fsyncs). Returns the number of the last
        write it covers. With `clear`, also forgets the intent log up to there (a copy whose
        peers do not matter); replication calls `clear_hot` once the other copies flushed too."""
        with self.lock:
            covered = self.wnum
        os.fsync(self.fd)
        os.fsync(self.sums_fd)
        with self.lock:
            changed = False
            if covered == self.wnum and self.info.size != self.size:
                self.info.size = self.size
                changed = True
            if gen is not None and gen != self.info.gen:
                self.set_gen(gen, save=False)
                changed = True
            if epoch is not None and epoch != self.info.epoch:
                self.info.epoch = epoch
                changed = True
            if seq is not None and seq != self.info.seq:
                self.info.seq = seq
                changed = True
            if changed:
                self.save_info()
            if clear:
                self.hot.clear_upto(covered)
        return covered

    def clear_hot(self, covered: int) -> None:
        """Forgets the intent log up to write number `covered` (from `flush`). Blocks."""
        with self.lock:
            self.hot.clear_upto(covered)

    def reset(self, size: int) -> None:
        """Drops all data and sums (a full resync follows); the copy becomes `size` bytes of
        holes. Blocks."""
        with self.lock:
            self.wnum += 1
            self.hot.mark_all(self.wnum)
            os.ftruncate(self.fd, 0)
            os.ftruncate(self.sums_fd, 0)
            self.sums = array.array("I")
            self.size = 0
            self._set_size(size)
            os.fsync(self.fd)
            os.fsync(self.sums_fd)
            self.info.size = size
            self.damaged = None
            self.save_info()

    def set_gen(self, gen: str, *, save: bool = True) -> None:
        """Records that this copy now belongs to data generation `gen` (blocks if save)."""
        with self.lock:
            if gen != self.info.gen:
                if self.info.gen:
                    self.info.history = (self.info.history + [self.info.gen])[-16:]
                self.info.gen = gen
            if save:
                self.save_info()

    def save_info(self) -> None:
        atomic_write(self.path / "info.json", self.info.to_json())

    def recompute_hot_sums(self) -> None:
        """Only copy of a file after a crash: accept the data of the hot extents as it is and
        recompute their sums, then flush (blocks)."""
        with self.lock:
            if self.hot.all:
                ranges = [(0, self.size)]
            else:
                ranges = [(e << HOT_SHIFT, min((e + 1) << HOT_SHIFT, self.size))
                          for e in sorted(self.hot.extents)]
            for start, end in ranges:
                if end > start:
                    self._update_sums(start, end, None)
        self.flush()

    def hot_chunks(self) -> set[int]:
        """The resync chunks covered by the intent log (every chunk when it says 'all')."""
        if self.hot.all:
            return set(range((self.size + CHUNK - 1) >> CHUNK_SHIFT))
        # not bounded by our size: after a power loss our copy may be shorter than the others
        per = 1 << (HOT_SHIFT - CHUNK_SHIFT)
        return {c for e in self.hot.extents for c in range(e * per, (e + 1) * per)}

    def used_bytes(self) -> int:
        st = os.fstat(self.fd)
        return st.st_blocks * 512

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd, self.sums_fd):
            if fd is None:
                continue
            try:
                os.close(fd)
            except OSError:
                pass
        self.hot.close()


# --- the store -----------------------------------------------------------------------------------


class LocalStore:
    """This node's copies. Blocking and thread-safe; see the module header for the layout."""

    def __init__(self, state_dir: Path):
        self.root = Path(state_dir) / "fm"
        self.files_dir = self.root / "files"
        self.tmp_dir = self.root / "tmp"
        self.trash_dir = self.root / "trash"
        for d in (self.root, self.files_dir, self.tmp_dir, self.trash_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        self._lock = threading.Lock()
        self._open: dict[int, LocalFile] = {}
        # leftovers of a crash while building a copy are incomplete by definition
        for leftover in self.tmp_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        self.incarnation = self._bump_incarnation()

    def _bump_incarnation(self) -> int:
        path = self.root / "node.json"
        try:
            n = int(json.loads(path.read_bytes()).get("incarnation", 0))
        except FileNotFoundError:
            n = 0
        except (ValueError, json.JSONDecodeError):
            raise StoreError(f"{path} is damaged; move it away to start a new incarnation") from None
        n += 1
        atomic_write(path, json.dumps({"incarnation": n}).encode())
        return n

    def path_of(self, fid: int) -> Path:
        return self.files_dir / str(fid)

    def exists(self, fid: int) -> bool:
        """A copy of `fid` is here (all its files present; their content is checked on use)."""
        p = self.path_of(fid)
        return all((p / name).exists() for name in ("info.json", "data", "sums"))

    def fids(self) -> list[int]:
        """Every file id with a local copy."""
        out = []
        for p in self.files_dir.iterdir():
            if p.name.isdigit():
                out.append(int(p.name))
        return sorted(out)

    def create(self, fid: int, gen: str, *, size: int = 0, epoch: int = 0) -> None:
        """Creates an empty copy of `fid` atomically (blocks). An existing complete copy is kept
        as is; an incomplete one (a file of it deleted behind our back) is moved to trash/."""
        if self.path_of(fid).exists() and not self.exists(fid):
            log.warning("file %d: local copy incomplete; replacing it", fid)
            self.delete(fid)
        with self._lock:
            final = self.path_of(fid)
            if final.exists():
                return
            tmp = self.tmp_dir / f"{fid}.{os.getpid()}.{time.monotonic_ns()}"
            tmp.mkdir(mode=0o700)
            for name in ("data", "sums", "hot"):
                fd = os.open(tmp / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                if name == "data" and size:
                    os.ftruncate(fd, size)
                if name == "sums" and size:
                    os.ftruncate(fd, ((size + PAGE - 1) >> PAGE_SHIFT) * 4)
                os.fsync(fd)
                os.close(fd)
            info = CopyInfo(fid=fid, gen=gen, epoch=epoch, size=size)
            atomic_write(tmp / "info.json", info.to_json())
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(self.files_dir)

    def open(self, fid: int) -> LocalFile:
        """The open copy of `fid` (shared; pair with `release`). Raises MissingCopy."""
        with self._lock:
            lf = self._open.get(fid)
            if lf is None:
                path = self.path_of(fid)
                if not (path / "info.json").exists():
                    raise MissingCopy(f"file {fid}: no local copy on this node")
                try:
                    lf = LocalFile(self, fid, path)
                except FileNotFoundError as exc:
                    raise MissingCopy(f"file {fid}: local copy incomplete ({exc.filename})") from None
                except (ValueError, KeyError, json.JSONDecodeError) as exc:
                    raise MissingCopy(f"file {fid}: local copy metadata unreadable ({exc})") from None
                self._open[fid] = lf
            lf.refs += 1
            return lf

    def release(self, lf: LocalFile) -> None:
        """Drops one reference taken by `open`; the last one closes the copy."""
        with self._lock:
            lf.refs -= 1
            if lf.refs <= 0:
                if self._open.get(lf.fid) is lf:
                    del self._open[lf.fid]
                lf.close()

    def delete(self, fid: int, *, keep_as: str | None = None) -> None:
        """Removes the copy of `fid` (rename into trash/, atomic). With `keep_as`, the copy is
        moved aside under that name instead (split brain: never destroy a diverged copy)."""
        with self._lock:
            path = self.path_of(fid)
            if not path.exists():
                return
            lf = self._open.pop(fid, None)
            if lf is not None:
                lf.deleted = True
            dest_dir = self.root / "kept" if keep_as else self.trash_dir
            dest_dir.mkdir(mode=0o700, exist_ok=True)
            dest = dest_dir / (keep_as or f"{fid}.{time.monotonic_ns()}")
            os.rename(path, dest)
            _fsync_dir(self.files_dir)
        if lf is not None and lf.refs <= 0:
            lf.close()

    def purge_trash(self) -> None:
        """Frees the space of deleted copies (blocks)."""
        for p in self.trash_dir.iterdir():
            shutil.rmtree(p, ignore_errors=True)

    def usage(self) -> dict:
        """Disk use of the store and free space of its filesystem (blocks: walks the store)."""
        used = 0
        for p in self.files_dir.iterdir():
            for f in ("data", "sums"):
                try:
                    used += os.stat(p / f).st_blocks * 512
                except FileNotFoundError:
                    pass
        st = os.statvfs(self.root)
        return {"used": used, "free": st.f_bavail * st.f_frsize, "total": st.f_blocks * st.f_frsize}
