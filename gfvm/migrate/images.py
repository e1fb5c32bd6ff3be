"""Reading a CRIU image directory: which tasks it holds and, per task, which virtual pages were
dumped and where their bytes are, so that a lazy-pages server can serve a page of task P straight
from CRIU's own `pages-*.img`.

CRIU's on-disk format (see its `criu/image.c`, `criu/protobuf.c`, `criu/pagemap.c`, `images/*.proto`):
  - every image but `inventory.img` starts with two little-endian u32: IMG_COMMON_MAGIC (or
    IMG_SERVICE_MAGIC for `stats-*`) and the image type's magic; `inventory.img` has only its magic;
  - then entries: a u32 length followed by one protobuf message of that length, up to EOF;
  - `pagemap-<pid>.img` holds a `pagemap_head` (which `pages-<id>.img` goes with it) and then
    `pagemap_entry`s (vaddr, nr_pages, flags). The bytes of the entries flagged PE_PRESENT are
    stored back to back, in entry order, in `pages-<id>.img`; entries without PE_PRESENT (only
    PE_LAZY: a `dump --lazy-pages`) have their bytes elsewhere (a page server).
  - PE_LAZY marks pages a `restore --lazy-pages` leaves for the lazy-pages daemon to serve.

Invariants checked on load (violations raise ImageError naming the file): magics, entry framing,
the wire format (gfvm.migrate.pbwire), page alignment, pagemap entries sorted and disjoint and
inside the task's VMAs, and the pages file holding exactly the bytes the pagemap promises.
Incremental images (PE_PARENT, `--prev-images-dir`) are refused: gfvm never makes them.

Everything here blocks on file reads; images other than pages-*.img are small.
"""

from __future__ import annotations

import bisect
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from gfvm.errors import GfvmError
from gfvm.migrate.pbwire import F, Schema, WireError, decode

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
INVENTORY_MAGIC = 0x58313116
PSTREE_MAGIC = 0x50273030
PAGEMAP_MAGIC = 0x56084025
MM_MAGIC = 0x57492820
STATS_MAGIC = 0x57093306

#: pagemap entry flags (criu/include/pagemap.h)
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

#: vma_entry.status bits (criu/include/image.h) and mmap flags that decide laziness
VMA_AREA_VSYSCALL = 1 << 2
VMA_AREA_VDSO = 1 << 3
VMA_AREA_VVAR = 1 << 12
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_LOCKED = 0x2000
MAP_HUGETLB = 0x40000

#: refuse single entries above this size (a corrupt length must not allocate gigabytes)
MAX_ENTRY_BYTES = 64 << 20


class ImageError(GfvmError):
    """A CRIU image is missing, truncated or malformed; the message names the file."""

    kind = "bad-image"


# --- message schemas (from CRIU's images/*.proto) ------------------------------------------------

INVENTORY = Schema(
    "inventory_entry",
    F(1, "img_version", "uint32", "required"),
    F(2, "fdinfo_per_id", "bool"),
    F(3, "root_ids", "bytes"),  # task_kobj_ids_entry, not needed: kept opaque
    F(4, "ns_per_id", "bool"),
    F(5, "root_cg_set", "uint32"),
    F(6, "lsmtype", "enum"),
    F(8, "dump_uptime", "uint64"),
    F(9, "pre_dump_mode", "uint32"),
    F(10, "tcp_close", "bool"),
    F(11, "network_lock_method", "uint32"),
    F(12, "plugins_entry", "bytes"),
    F(13, "dump_criu_run_id", "string"),
)
PSTREE = Schema(
    "pstree_entry",
    F(1, "pid", "uint32", "required"),
    F(2, "ppid", "uint32", "required"),
    F(3, "pgid", "uint32", "required"),
    F(4, "sid", "uint32", "required"),
    F(5, "threads", "uint32", "repeated"),
)
VMA = Schema(
    "vma_entry",
    F(1, "start", "uint64", "required"),
    F(2, "end", "uint64", "required"),
    F(3, "pgoff", "uint64", "required"),
    F(4, "shmid", "uint64", "required"),
    F(5, "prot", "uint32", "required"),
    F(6, "flags", "uint32", "required"),
    F(7, "status", "uint32", "required"),
    F(8, "fd", "sint64", "required"),
    F(9, "madv", "uint64"),
    F(10, "fdflags", "uint32"),
)
MM = Schema(
    "mm_entry",
    F(1, "mm_start_code", "uint64", "required"),
    F(2, "mm_end_code", "uint64", "required"),
    F(3, "mm_start_data", "uint64", "required"),
    F(4, "mm_end_data", "uint64", "required"),
    F(5, "mm_start_stack", "uint64", "required"),
    F(6, "mm_start_brk", "uint64", "required"),
    F(7, "mm_brk", "uint64", "required"),
    F(8, "mm_arg_start", "uint64", "required"),
    F(9, "mm_arg_end", "uint64", "required"),
    F(10, "mm_env_start", "uint64", "required"),
    F(11, "mm_env_end", "uint64", "required"),
    F(12, "exe_file_id", "uint32", "required"),
    F(13, "mm_saved_auxv", "uint64", "repeated"),
    F(14, "vmas", VMA, "repeated"),
    F(15, "dumpable", "int32"),
    F(16, "aios", "bytes", "repeated"),
    F(17, "thp_disabled", "bool"),
)
PAGEMAP_HEAD = Schema("pagemap_head", F(1, "pages_id", "uint32", "required"))
PAGEMAP_ENTRY = Schema(
    "pagemap_entry",
    F(1, "vaddr", "uint64", "required"),
    F(2, "nr_pages", "uint32", "required"),
    F(3, "in_parent", "bool"),
    F(4, "flags", "uint32"),
)
DUMP_STATS = Schema(
    "dump_stats_entry",
    F(1, "freezing_time", "uint32", "required"),
    F(2, "frozen_time", "uint32", "required"),
    F(3, "memdump_time", "uint32", "required"),
    F(4, "memwrite_time", "uint32", "required"),
    F(5, "pages_scanned", "uint64", "required"),
    F(6, "pages_skipped_parent", "uint64", "required"),
    F(7, "pages_written", "uint64", "required"),
    F(8, "irmap_resolve", "uint32"),
    F(9, "pages_lazy", "uint64", "required"),
    F(10, "page_pipes", "uint64"),
    F(11, "page_pipe_bufs", "uint64"),
    F(12, "shpages_scanned", "uint64"),
    F(13, "shpages_skipped_parent", "uint64"),
    F(14, "shpages_written", "uint64"),
)
RESTORE_STATS = Schema(
    "restore_stats_entry",
    F(1, "pages_compared", "uint64", "required"),
    F(2, "pages_skipped_cow", "uint64", "required"),
    F(3, "forking_time", "uint32", "required"),
    F(4, "restore_time", "uint32", "required"),
    F(5, "pages_restored", "uint64"),
)
STATS = Schema("stats_entry", F(1, "dump", DUMP_STATS), F(2, "restore", RESTORE_STATS))


# --- low level: image files --------------------------------------------------------------------


def read_entries(path: Path, magic: int, *, service: bool = False, inventory: bool = False) -> list[bytes]:
    """The protobuf payloads of every entry of the image at `path` (blocking read).

    Checks the head magic(s) and the u32-length framing; raises ImageError on a missing file,
    a wrong magic or a truncated entry.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: image file is missing") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read: {exc.strerror}") from None
    heads = [magic] if inventory else [IMG_SERVICE_MAGIC if service else IMG_COMMON_MAGIC, magic]
    pos = 0
    for want in heads:
        if len(data) < pos + 4:
            raise ImageError(f"{path}: truncated image header ({len(data)} bytes)")
        (got,) = struct.unpack_from("<I", data, pos)
        if got != want:
            raise ImageError(f"{path}: bad magic {got:#010x} at byte {pos} (expected {want:#010x})")
        pos += 4
    entries = []
    while pos < len(data):
        if len(data) - pos < 4:
            raise ImageError(f"{path}: truncated entry length at byte {pos}")
        (size,) = struct.unpack_from("<I", data, pos)
        if size > MAX_ENTRY_BYTES:
            raise ImageError(f"{path}: entry at byte {pos} claims {size} bytes (limit {MAX_ENTRY_BYTES})")
        pos += 4
        if len(data) - pos < size:
            raise ImageError(
                f"{path}: entry at byte {pos - 4} is truncated ({len(data) - pos} of {size} bytes)"
            )
        entries.append(data[pos : pos + size])
        pos += size
    return entries


def _decode(path: Path, schema: Schema, payload: bytes, index: int) -> dict:
    try:
        return decode(schema, payload)
    except WireError as exc:
        raise ImageError(f"{path}: entry {index}: {exc}") from None


def _check_page_aligned(path: Path, what: str, value: int) -> None:
    if value % PAGE_SIZE:
        raise ImageError(f"{path}: {what} {value:#x} is not page-aligned")


# --- typed results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inventory:
    img_version: int
    tcp_close: bool
    dump_uptime: int | None


@dataclass(frozen=True)
class PstreeEntry:
    """One task (process) of the dumped tree. Pids are as the tree saw them (its own PID namespace)."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    threads: tuple[int, ...]


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    pgoff: int
    prot: int
    flags: int
    status: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def lazy(self) -> bool:
        """True when `restore --lazy-pages` registers this VMA with the task's userfaultfd (CRIU's
        vma_entry_can_be_lazy): private anonymous, not locked, not hugetlb, not vdso/vvar/vsyscall."""
        return (
            bool(self.flags & MAP_ANONYMOUS)
            and bool(self.flags & MAP_PRIVATE)
            and not self.flags & (MAP_LOCKED | MAP_HUGETLB)
            and not self.status & (VMA_AREA_VDSO | VMA_AREA_VVAR | VMA_AREA_VSYSCALL)
        )


@dataclass(frozen=True)
class PageRun:
    """A pagemap entry: `nr_pages` pages from `vaddr`; when `present`, their bytes are at
    `offset` in the task's pages file."""

    vaddr: int
    nr_pages: int
    flags: int
    offset: int | None

    @property
    def end(self) -> int:
        return self.vaddr + self.nr_pages * PAGE_SIZE

    @property
    def present(self) -> bool:
        return bool(self.flags & PE_PRESENT)

    @property
    def lazy(self) -> bool:
        return bool(self.flags & PE_LAZY)


@dataclass(frozen=True)
class DumpStats:
    """CRIU's own dump statistics (`stats-dump`); times in microseconds."""

    freezing_time: int
    frozen_time: int
    memdump_time: int
    memwrite_time: int
    pages_scanned: int
    pages_written: int
    pages_lazy: int


class TaskMemory:
    """The memory image of one task: VMAs, dumped page runs, and reads from its pages file."""

    def __init__(self, pid: int, vmas: tuple[Vma, ...], runs: tuple[PageRun, ...], pages_path: Path):
        self.pid = pid
        self.vmas = vmas
        self.runs = runs
        self.pages_path = pages_path
        self._starts = [r.vaddr for r in runs]

    @property
    def lazy_ranges(self) -> list[tuple[int, int]]:
        """[start, end) of every VMA a lazy restore registers with this task's userfaultfd."""
        return [(v.start, v.end) for v in self.vmas if v.lazy]

    def find(self, vaddr: int) -> PageRun | None:
        """The run holding page `vaddr`, or None when that page was not dumped."""
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i >= 0 and vaddr < self.runs[i].end:
            return self.runs[i]
        return None

    def next_run_start(self, vaddr: int) -> int | None:
        """Start of the first run beginning after `vaddr`, or None."""
        i = bisect.bisect_right(self._starts, vaddr)
        return self._starts[i] if i < len(self._starts) else None

    def file_offset(self, vaddr: int) -> int | None:
        """Offset of page `vaddr`'s bytes in the pages file, or None if they are not stored there."""
        run = self.find(vaddr)
        if run is None or run.offset is None:
            return None
        return run.offset + (vaddr - run.vaddr)

    def read(self, vaddr: int, nr_pages: int = 1) -> bytes:
        """The stored bytes of `nr_pages` pages from `vaddr`, which must lie in one present run
        (blocking pread). Raises ImageError otherwise or on a short read."""
        run = self.find(vaddr)
        if run is None or run.offset is None or vaddr + nr_pages * PAGE_SIZE > run.end:
            raise ImageError(f"{self.pages_path}: pages {vaddr:#x}+{nr_pages} are not stored here")
        want = nr_pages * PAGE_SIZE
        with open(self.pages_path, "rb") as f:
            data = os.pread(f.fileno(), want, run.offset + (vaddr - run.vaddr))
        if len(data) != want:
            raise ImageError(f"{self.pages_path}: short read ({len(data)} of {want} bytes)")
        return data

    @property
    def present_pages(self) -> int:
        return sum(r.nr_pages for r in self.runs if r.present)


# --- the directory --------------------------------------------------------------------------------


class ImageDir:
    """A CRIU image directory, read lazily and validated as it is read (blocking)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ImageError(f"{self.path}: not a directory of CRIU images")

    @cached_property
    def inventory(self) -> Inventory:
        path = self.path / "inventory.img"
        entries = read_entries(path, INVENTORY_MAGIC, inventory=True)
        if len(entries) != 1:
            raise ImageError(f"{path}: expected one entry, found {len(entries)}")
        inv = _decode(path, INVENTORY, entries[0], 0)
        return Inventory(
            img_version=inv["img_version"],
            tcp_close=bool(inv["tcp_close"]),
            dump_uptime=inv["dump_uptime"],
        )

    @cached_property
    def pstree(self) -> tuple[PstreeEntry, ...]:
        """Every task of the tree, root first (CRIU writes the tree depth-first from the root)."""
        path = self.path / "pstree.img"
        tasks = []
        for i, payload in enumerate(read_entries(path, PSTREE_MAGIC)):
            e = _decode(path, PSTREE, payload, i)
            tasks.append(PstreeEntry(e["pid"], e["ppid"], e["pgid"], e["sid"], tuple(e["threads"])))
        if not tasks:
            raise ImageError(f"{path}: the tree has no task")
        pids = [t.pid for t in tasks]
        if len(set(pids)) != len(pids):
            raise ImageError(f"{path}: a pid appears twice")
        return tuple(tasks)

    @property
    def root_pid(self) -> int:
        """The root task's pid as the tree saw it (1 when the tree is its own PID namespace)."""
        return self.pstree[0].pid

    def vmas(self, pid: int) -> tuple[Vma, ...]:
        """The VMAs of task `pid` at the dump, sorted and checked to be disjoint and aligned."""
        path = self.path / f"mm-{pid}.img"
        entries = read_entries(path, MM_MAGIC)
        if len(entries) != 1:
            raise ImageError(f"{path}: expected one entry, found {len(entries)}")
        mm = _decode(path, MM, entries[0], 0)
        vmas = []
        prev_end = 0
        for v in mm["vmas"]:
            _check_page_aligned(path, "VMA start", v["start"])
            _check_page_aligned(path, "VMA end", v["end"])
            if v["end"] <= v["start"]:
                raise ImageError(f"{path}: empty or inverted VMA {v['start']:#x}-{v['end']:#x}")
            if v["start"] < prev_end:
                raise ImageError(f"{path}: VMA {v['start']:#x} overlaps or is out of order")
            prev_end = v["end"]
            vmas.append(Vma(v["start"], v["end"], v["pgoff"], v["prot"], v["flags"], v["status"]))
        return tuple(vmas)

    def page_runs(self, pid: int) -> tuple[int, tuple[PageRun, ...]]:
        """(pages file id, runs) from `pagemap-<pid>.img`, with each present run's file offset."""
        path = self.path / f"pagemap-{pid}.img"
        entries = read_entries(path, PAGEMAP_MAGIC)
        if not entries:
            raise ImageError(f"{path}: no pagemap head")
        pages_id = _decode(path, PAGEMAP_HEAD, entries[0], 0)["pages_id"]
        runs = []
        offset = 0
        prev_end = 0
        for i, payload in enumerate(entries[1:], start=1):
            e = _decode(path, PAGEMAP_ENTRY, payload, i)
            flags = e["flags"]
            if flags is None:  # images from before the flags field existed
                flags = PE_PARENT if e["in_parent"] else PE_PRESENT
            if flags & PE_PARENT:
                raise ImageError(f"{path}: entry {i} is in a parent image (incremental dumps are not supported)")
            if flags & ~(PE_LAZY | PE_PRESENT):
                raise ImageError(f"{path}: entry {i} has unknown flags {flags:#x}")
            vaddr, nr = e["vaddr"], e["nr_pages"]
            _check_page_aligned(path, f"entry {i} vaddr", vaddr)
            if nr == 0:
                raise ImageError(f"{path}: entry {i} has no pages")
            if vaddr < prev_end:
                raise ImageError(f"{path}: entry {i} at {vaddr:#x} overlaps or is out of order")
            prev_end = vaddr + nr * PAGE_SIZE
            run = PageRun(vaddr, nr, flags, offset if flags & PE_PRESENT else None)
            if run.present:
                offset += nr * PAGE_SIZE
            runs.append(run)
        return pages_id, tuple(runs)

    def task_memory(self, pid: int) -> TaskMemory:
        """Everything needed to serve task `pid`'s pages from the images (blocking)."""
        if pid not in {t.pid for t in self.pstree}:
            raise ImageError(f"{self.path}: task {pid} is not in the dumped tree")
        vmas = self.vmas(pid)
        pages_id, runs = self.page_runs(pid)
        pages_path = self.path / f"pages-{pages_id}.img"
        stored = sum(r.nr_pages for r in runs if r.present) * PAGE_SIZE
        try:
            size = pages_path.stat().st_size
        except FileNotFoundError:
            if stored:
                raise ImageError(f"{pages_path}: pages file is missing") from None
            size = 0
        if size != stored:
            raise ImageError(
                f"{pages_path}: holds {size} bytes but pagemap-{pid}.img describes {stored}"
            )
        starts = [v.start for v in vmas]
        for r in runs:
            # A run may span adjacent VMAs; every page of it must be inside some VMA.
            addr = r.vaddr
            while addr < r.end:
                i = bisect.bisect_right(starts, addr) - 1
                if i < 0 or addr >= vmas[i].end:
                    raise ImageError(f"{self.path}: task {pid}: dumped page {addr:#x} is outside every VMA")
                addr = min(r.end, vmas[i].end)
        return TaskMemory(pid, vmas, runs, pages_path)

    def dump_stats(self) -> DumpStats | None:
        """CRIU's `stats-dump`, or None when the directory has none."""
        path = self.path / "stats-dump"
        if not path.exists():
            return None
        entries = read_entries(path, STATS_MAGIC, service=True)
        if len(entries) != 1:
            raise ImageError(f"{path}: expected one entry, found {len(entries)}")
        d = _decode(path, STATS, entries[0], 0)["dump"]
        if d is None:
            raise ImageError(f"{path}: no dump statistics in it")
        return DumpStats(
            freezing_time=d["freezing_time"],
            frozen_time=d["frozen_time"],
            memdump_time=d["memdump_time"],
            memwrite_time=d["memwrite_time"],
            pages_scanned=d["pages_scanned"],
            pages_written=d["pages_written"],
            pages_lazy=d["pages_lazy"],
        )
