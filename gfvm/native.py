"""The only user of gfvm._native (the cffi extension built from csrc/).

C functions return >= 0 or -errno; this module turns negative returns into OSError (errno set,
message naming the operation) so callers never see raw error codes. Everything here is
synchronous; each docstring says what blocks. From trio, run blocking calls in a worker thread
(`trio.to_thread.run_sync` with a CapacityLimiter); the few that never block are marked so.

Parts (one per C module in csrc/):
- userfaultfd: `Userfaultfd` (api/register/copy/zeropage/writeprotect/wake/poison/read_events).
- PAGEMAP_SCAN: `open_pagemap`, `scan_written` (dirty pages, re-protected atomically),
  `scan_present`, `pagemap_scan` (general), results as compact `PageRegions`.
- process memory: `read_pages`, `read_ranges`, `read_regions`, `write_pages`, `write_ranges`.
- pidfd: `pidfd_open`, `pidfd_getfd`, `pidfd_send_signal`.
- ptrace: `Tracer` (own OS thread; stop all threads of a process, inject syscalls, helpers for
  userfaultfd/madvise/close/mmap/munmap).
- `crc32_pages` (zlib's CRC-32 of each page, without the GIL), `page_matches` (one page against
  a File Manager page sum: the same-node verified read's check).
- `PageIndex` (virtual page -> paging-file slot and page CRC-32, in C, shared with the fault
  loop) and `FaultLoop` (native fault service on its own pthread, no GIL); `evict_pages` (drop pages
  that are safely in the paging file, with everything a pager must get right about it).
- `frozen_cgroup` (is a process frozen by a cgroup freezer: what that means for ptrace).

Memory addresses are plain ints; lengths in bytes; pages are 4 KiB.
"""

from __future__ import annotations

import array
import concurrent.futures
import contextlib
import errno
import functools
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Self

try:
    from gfvm._native import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "gfvm's compiled part (gfvm._native) is missing: reinstall gfvm with deploy/install, "
        "or build it in place with `python gfvm/_build_native.py`"
    ) from exc

PAGE_SIZE = 4096


def check(rc: int, what: str) -> int:
    """Returns rc when it is >= 0, raises OSError(-rc) naming `what` otherwise. Never blocks."""
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def _check_page_aligned(value: int, what: str) -> None:
    if value % PAGE_SIZE:
        raise ValueError(f"{what} {value:#x} is not page-aligned")


def _u64_array(values: Iterable[int]) -> Any:
    """A uint64_t[] for C: zero-copy for an array('Q')/8-byte buffer, else a fresh copy."""
    if isinstance(values, array.array) and values.itemsize == 8 and values.typecode in "QL":
        return ffi.from_buffer("uint64_t[]", values)
    return ffi.new("uint64_t[]", list(values))


def _u32_array(values: Iterable[int]) -> Any:
    """A uint32_t[] for C: zero-copy for an array('I') (4-byte items), else a fresh copy
    (OverflowError for values outside [0, 2**32))."""
    if isinstance(values, array.array) and values.itemsize == 4 and values.typecode in "IL":
        return ffi.from_buffer("uint32_t[]", values)
    return ffi.new("uint32_t[]", list(values))


def _writable_buffer(buf: Any, need: int, what: str) -> Any:
    cbuf = ffi.from_buffer(buf, require_writable=True)
    if len(cbuf) < need:
        raise ValueError(f"{what}: buffer holds {len(cbuf)} bytes, {need} needed")
    return cbuf


# --------------------------------------------------------------------------- probes (doctor)


def probe_uffd_features() -> int:
    """Every userfaultfd feature bit the running kernel offers; OSError if uffd is unusable."""
    features = ffi.new("uint64_t *")
    check(lib.gfvm_probe_uffd_features(features), "userfaultfd")
    return int(features[0])


def probe_pagemap_scan() -> None:
    """Raises OSError when the PAGEMAP_SCAN ioctl is not available."""
    check(lib.gfvm_probe_pagemap_scan(), "PAGEMAP_SCAN")


def probe_pidfd_getfd() -> None:
    """Raises OSError when pidfd_open or pidfd_getfd is not available."""
    check(lib.gfvm_probe_pidfd_getfd(), "pidfd_getfd")


# --------------------------------------------------------------------------- userfaultfd

UFFD_FEATURE_PAGEFAULT_FLAG_WP = lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
UFFD_FEATURE_EVENT_FORK = lib.UFFD_FEATURE_EVENT_FORK
UFFD_FEATURE_EVENT_REMAP = lib.UFFD_FEATURE_EVENT_REMAP
UFFD_FEATURE_EVENT_REMOVE = lib.UFFD_FEATURE_EVENT_REMOVE
UFFD_FEATURE_EVENT_UNMAP = lib.UFFD_FEATURE_EVENT_UNMAP
UFFD_FEATURE_MISSING_SHMEM = lib.UFFD_FEATURE_MISSING_SHMEM
UFFD_FEATURE_SIGBUS = lib.UFFD_FEATURE_SIGBUS
UFFD_FEATURE_THREAD_ID = lib.UFFD_FEATURE_THREAD_ID
UFFD_FEATURE_EXACT_ADDRESS = lib.UFFD_FEATURE_EXACT_ADDRESS
UFFD_FEATURE_WP_UNPOPULATED = lib.UFFD_FEATURE_WP_UNPOPULATED
UFFD_FEATURE_POISON = lib.UFFD_FEATURE_POISON
UFFD_FEATURE_WP_ASYNC = lib.UFFD_FEATURE_WP_ASYNC
UFFD_FEATURE_MOVE = lib.UFFD_FEATURE_MOVE
#: What the pager asks for: every event, thread ids, asynchronous write-protect dirty tracking.
PAGER_FEATURES = (
    UFFD_FEATURE_EVENT_FORK
    | UFFD_FEATURE_EVENT_REMAP
    | UFFD_FEATURE_EVENT_REMOVE
    | UFFD_FEATURE_EVENT_UNMAP
    | UFFD_FEATURE_THREAD_ID
    | UFFD_FEATURE_WP_ASYNC
    | UFFD_FEATURE_WP_UNPOPULATED
)

UFFD_PAGEFAULT_FLAG_WRITE = lib.UFFD_PAGEFAULT_FLAG_WRITE
UFFD_PAGEFAULT_FLAG_WP = lib.UFFD_PAGEFAULT_FLAG_WP
UFFD_PAGEFAULT_FLAG_MINOR = lib.UFFD_PAGEFAULT_FLAG_MINOR

#: Bits of the `ioctls` masks returned by api()/register(): which range ioctls are allowed.
UFFDIO_COPY_BIT = 1 << lib._UFFDIO_COPY
UFFDIO_ZEROPAGE_BIT = 1 << lib._UFFDIO_ZEROPAGE
UFFDIO_WAKE_BIT = 1 << lib._UFFDIO_WAKE
UFFDIO_WRITEPROTECT_BIT = 1 << lib._UFFDIO_WRITEPROTECT
UFFDIO_POISON_BIT = 1 << lib._UFFDIO_POISON


class PartialCopy(BlockingIOError):
    """UFFDIO_COPY / ZEROPAGE / POISON stopped early with EAGAIN.

    `copy` (alias `done`) is the number of bytes installed from the start of the range. 0 means
    the process's memory map is changing: read the uffd's pending events, then retry. > 0 means
    the ioctl stopped in front of a page that already exists (the next one gives EEXIST).
    """

    def __init__(self, what: str, done: int):
        super().__init__(errno.EAGAIN, f"{what}: stopped after {done} bytes", done)
        self.copy = done

    @property
    def done(self) -> int:
        return self.copy


class UffdApi(NamedTuple):
    features: int  #: every feature bit the kernel supports (the requested ones are now enabled)
    ioctls: int  #: ioctl bits available on this uffd


@dataclass(frozen=True)
class PageFault:
    """A missing-page (or write-protect / minor) fault. `tid` is 0 without FEATURE_THREAD_ID."""

    address: int
    flags: int
    tid: int

    @property
    def write(self) -> bool:
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_WRITE)

    @property
    def wp(self) -> bool:
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_WP)


@dataclass
class ForkEvent:
    """The process forked; `uffd` is the child's new uffd, now owned by the receiver. The
    message carries no child pid (find it among the parent's children)."""

    uffd: Userfaultfd


@dataclass(frozen=True)
class RemapEvent:
    """mremap moved [start, end) to `to` (an UnmapEvent for the old range may follow)."""

    start: int
    end: int
    to: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class RemoveEvent:
    """MADV_DONTNEED/REMOVE/FREE by the process: [start, end) reads zeros from now on."""

    start: int
    end: int


@dataclass(frozen=True)
class UnmapEvent:
    """munmap (or the old range of a mremap): [start, end) is gone."""

    start: int
    end: int


UffdEvent = PageFault | ForkEvent | RemapEvent | RemoveEvent | UnmapEvent


class Userfaultfd:
    """One userfaultfd, owned by this object (closed by close() or on leaving a `with`).

    Invariant: the fd is O_NONBLOCK|O_CLOEXEC and was never created with UFFD_USER_MODE_ONLY.
    A uffd may belong to another process's memory (created there by injection, or received from
    CRIU or a fork event): every ioctl acts on the memory of the process that created it.
    None of the methods block except as noted; ioctls take the target's mmap lock briefly.
    """

    def __init__(self, fd: int):
        self._fd = fd

    @classmethod
    def create(cls) -> Userfaultfd:
        """A new uffd for *this* process's memory. Never blocks."""
        return cls(check(lib.gfvm_uffd_create(), "userfaultfd"))

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("userfaultfd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Closes the fd (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def detach(self) -> int:
        """Gives up ownership: returns the fd, which this object will no longer close."""
        fd, self._fd = self.fileno(), -1
        return fd

    def dup(self) -> Userfaultfd:
        """Another fd for the same uffd (e.g. for a keeper process)."""
        return Userfaultfd(os.dup(self.fileno()))

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Userfaultfd(fd={self._fd})"

    def api(self, features: int) -> UffdApi:
        """UFFDIO_API: enables `features` (EINVAL if the kernel lacks one of them). The kernel
        answers with its whole feature set, not just the requested bits, and the ioctls
        available. Allowed once per uffd (a second call fails with EINVAL)."""
        granted = ffi.new("uint64_t *")
        ioctls = ffi.new("uint64_t *")
        check(lib.gfvm_uffd_api(self.fileno(), features, granted, ioctls), "UFFDIO_API")
        return UffdApi(int(granted[0]), int(ioctls[0]))

    def register(
        self,
        start: int,
        length: int,
        *,
        missing: bool = True,
        wp: bool = False,
        minor: bool = False,
    ) -> int:
        """UFFDIO_REGISTER [start, start + length) in MISSING and/or WP (and/or MINOR) mode;
        returns the ioctl bits allowed on the range.

        With WP_ASYNC dirty tracking, pages that were never protected count as WRITTEN: arm the
        range with writeprotect(protect=True) (or one reprotecting scan) right after registering.
        """
        mode = (
            (lib.UFFDIO_REGISTER_MODE_MISSING if missing else 0)
            | (lib.UFFDIO_REGISTER_MODE_WP if wp else 0)
            | (lib.UFFDIO_REGISTER_MODE_MINOR if minor else 0)
        )
        ioctls = ffi.new("uint64_t *")
        check(
            lib.gfvm_uffd_register(self.fileno(), start, length, mode, ioctls),
            f"UFFDIO_REGISTER {start:#x}+{length:#x}",
        )
        return int(ioctls[0])

    def unregister(self, start: int, length: int) -> None:
        """UFFDIO_UNREGISTER: faults in the range are no longer reported (waiters are woken)."""
        check(
            lib.gfvm_uffd_unregister(self.fileno(), start, length),
            f"UFFDIO_UNREGISTER {start:#x}+{length:#x}",
        )

    def writeprotect(
        self, start: int, length: int, *, protect: bool = True, wake: bool = True
    ) -> None:
        """UFFDIO_WRITEPROTECT: protect (arm dirty tracking) or unprotect the range."""
        mode = (lib.UFFDIO_WRITEPROTECT_MODE_WP if protect else 0) | (
            0 if wake else lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
        )
        check(
            lib.gfvm_uffd_writeprotect(self.fileno(), start, length, mode),
            f"UFFDIO_WRITEPROTECT {start:#x}+{length:#x}",
        )

    def _range_op(self, fn: Callable[..., int], what: str, *args: Any) -> int:
        done = ffi.new("int64_t *")
        rc = fn(self.fileno(), *args, done)
        if rc == -errno.EAGAIN:
            raise PartialCopy(what, int(done[0]))
        check(rc, what)
        return int(done[0])

    def copy(self, dst: int, src: Any, *, wp: bool = False, wake: bool = True) -> int:
        """UFFDIO_COPY of the bytes of `src` (any buffer, whole pages) to `dst`; returns bytes
        installed. wp=True installs the pages write-protected (they do not count as written for
        WP_ASYNC dirty tracking; needs a WP-registered range). Raises FileExistsError (EEXIST)
        if the first page exists, PartialCopy (EAGAIN) when it stopped early."""
        cbuf = ffi.from_buffer(src)
        mode = (lib.UFFDIO_COPY_MODE_WP if wp else 0) | (
            0 if wake else lib.UFFDIO_COPY_MODE_DONTWAKE
        )
        return self._range_op(
            lib.gfvm_uffd_copy, f"UFFDIO_COPY {dst:#x}+{len(cbuf):#x}", dst, cbuf, len(cbuf), mode
        )

    def zeropage(self, start: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_ZEROPAGE: maps the zero page over missing pages; returns bytes done. It has no
        WP mode and the pages count as WRITTEN for dirty tracking (see csrc/uffd.c): for tracked
        ranges copy() a zero buffer with wp=True instead."""
        mode = 0 if wake else lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE
        return self._range_op(
            lib.gfvm_uffd_zeropage, f"UFFDIO_ZEROPAGE {start:#x}+{length:#x}", start, length, mode
        )

    def poison(self, start: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_POISON: accesses to the missing pages raise SIGBUS (a page that cannot be served
        truthfully). Needs UFFD_FEATURE_POISON. Returns bytes done."""
        mode = 0 if wake else lib.UFFDIO_POISON_MODE_DONTWAKE
        return self._range_op(
            lib.gfvm_uffd_poison, f"UFFDIO_POISON {start:#x}+{length:#x}", start, length, mode
        )

    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE: wakes threads waiting on faults in the range (they retry the access)."""
        check(
            lib.gfvm_uffd_wake(self.fileno(), start, length), f"UFFDIO_WAKE {start:#x}+{length:#x}"
        )

    def read_events(self, max_events: int = 64) -> list[UffdEvent]:
        """Reads up to `max_events` (<= 64) pending messages without blocking ([] when none).
        Wait for readability with select/poll or trio.lowlevel.wait_readable(uffd.fileno()).
        Fork messages carry a new uffd, owned by the returned ForkEvent."""
        out = ffi.new("struct gfvm_uffd_event[]", max(1, min(max_events, 64)))
        n = check(lib.gfvm_uffd_read_events(self.fileno(), out, len(out)), "read(userfaultfd)")
        return [_decode_uffd_event(out[i]) for i in range(n)]


def _decode_uffd_event(ev: Any) -> UffdEvent:
    kind = ev.event
    if kind == lib.UFFD_EVENT_PAGEFAULT:
        return PageFault(int(ev.address), int(ev.flags), int(ev.tid))
    if kind == lib.UFFD_EVENT_FORK:
        return ForkEvent(Userfaultfd(int(ev.fd)))
    if kind == lib.UFFD_EVENT_REMAP:
        return RemapEvent(int(ev.start), int(ev.end), int(ev.to))
    if kind == lib.UFFD_EVENT_REMOVE:
        return RemoveEvent(int(ev.start), int(ev.end))
    if kind == lib.UFFD_EVENT_UNMAP:
        return UnmapEvent(int(ev.start), int(ev.end))
    raise OSError(errno.EPROTO, f"unknown userfaultfd event {kind:#x}")


# --------------------------------------------------------------------------- PAGEMAP_SCAN

PM_SCAN_WP_MATCHING = lib.PM_SCAN_WP_MATCHING
PM_SCAN_CHECK_WPASYNC = lib.PM_SCAN_CHECK_WPASYNC
PAGE_IS_WPALLOWED = lib.PAGE_IS_WPALLOWED
PAGE_IS_WRITTEN = lib.PAGE_IS_WRITTEN
PAGE_IS_FILE = lib.PAGE_IS_FILE
PAGE_IS_PRESENT = lib.PAGE_IS_PRESENT
PAGE_IS_SWAPPED = lib.PAGE_IS_SWAPPED
PAGE_IS_PFNZERO = lib.PAGE_IS_PFNZERO
PAGE_IS_HUGE = lib.PAGE_IS_HUGE
PAGE_IS_ALL = (
    PAGE_IS_WPALLOWED
    | PAGE_IS_WRITTEN
    | PAGE_IS_FILE
    | PAGE_IS_PRESENT
    | PAGE_IS_SWAPPED
    | PAGE_IS_PFNZERO
    | PAGE_IS_HUGE
)


class Region(NamedTuple):
    start: int
    end: int
    categories: int


class PageRegions(Sequence[Region]):
    """The result of one scan: a C array of (start, end, categories), sorted by address.

    Compact (24 bytes per region whatever its length) and passable to read_regions() without
    conversion. `walk_end` is where the scan stopped (== the requested end unless max_pages
    cut it short). Never blocks.
    """

    __slots__ = ("_n", "_ptr", "walk_end")

    def __init__(self, ptr: Any, n: int, walk_end: int):
        self._ptr = ptr
        self._n = n
        self.walk_end = walk_end

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Region:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._n))]  # type: ignore[return-value]
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(i)
        r = self._ptr[i]
        return Region(int(r.start), int(r.end), int(r.categories))

    def __iter__(self) -> Iterator[Region]:
        for i in range(self._n):
            r = self._ptr[i]
            yield Region(int(r.start), int(r.end), int(r.categories))

    def __repr__(self) -> str:
        return f"PageRegions({len(self)} regions, {self.page_count} pages)"

    @property
    def page_count(self) -> int:
        return sum((r.end - r.start) for r in self) // PAGE_SIZE

    def pages(self) -> Iterator[int]:
        """Every page address, in order."""
        for r in self:
            yield from range(r.start, r.end, PAGE_SIZE)

    def ranges(self) -> list[tuple[int, int]]:
        return [(r.start, r.end) for r in self]

    @property
    def cdata(self) -> Any:
        """The underlying `struct page_region *` (for gfvm.native's C calls)."""
        return self._ptr


def open_pagemap(pid: int) -> int:
    """Opens /proc/PID/pagemap read-only (close-on-exec); the fd for the scan functions."""
    return check(lib.gfvm_pagemap_open(pid), f"open /proc/{pid}/pagemap")


def pagemap_scan(
    pagemap_fd: int,
    start: int,
    end: int,
    *,
    flags: int = 0,
    category_mask: int = 0,
    category_inverted: int = 0,
    category_anyof_mask: int = 0,
    return_mask: int | None = None,
    max_pages: int = 0,
) -> PageRegions:
    """PAGEMAP_SCAN over [start, end) (start page-aligned) with the kernel's filter semantics:
    a page matches when (categories ^ category_inverted) has every bit of category_mask and, if
    category_anyof_mask is set, one of its bits. Regions report categories & return_mask
    (default: the bits of both masks, or every category when both are 0). Loops on walk_end
    until the range is done or max_pages (0: no limit) pages matched.

    Blocks for the walk (about 1 ms per GiB scanned) and takes the target's mmap lock for read.
    """
    _check_page_aligned(start, "scan start")
    if return_mask is None:
        return_mask = (category_mask | category_anyof_mask) or PAGE_IS_ALL
    spec = ffi.new(
        "struct gfvm_scan_spec *",
        {
            "flags": flags,
            "category_inverted": category_inverted,
            "category_mask": category_mask,
            "category_anyof_mask": category_anyof_mask,
            "return_mask": return_mask,
            "max_pages": max_pages,
        },
    )
    out = ffi.new("struct page_region **")
    walk_end = ffi.new("uint64_t *")
    n = lib.gfvm_pagemap_scan(pagemap_fd, start, end, spec, out, walk_end)
    check(n, f"PAGEMAP_SCAN {start:#x}-{end:#x}")
    return PageRegions(ffi.gc(out[0], lib.gfvm_free), n, int(walk_end[0]))


def scan_written(
    pagemap_fd: int,
    start: int,
    end: int,
    *,
    reprotect: bool = True,
    check_wpasync: bool = True,
    return_mask: int = PAGE_IS_WRITTEN,
) -> PageRegions:
    """The pages written since they were last protected, in [start, end).

    reprotect=True write-protects every reported page again in the same walk (atomic: a write
    racing with the scan is either reported now or by the next scan), so a second scan right
    after returns nothing. check_wpasync=True fails with EPERM if part of the range is not
    registered WP with WP_ASYNC (instead of silently skipping it). Add PAGE_IS_PFNZERO to
    return_mask to tell zero-page-backed pages apart. If the scan fails after reprotecting some
    pages, treat the whole range as dirty. Blocks like pagemap_scan.
    """
    flags = (PM_SCAN_WP_MATCHING if reprotect else 0) | (
        PM_SCAN_CHECK_WPASYNC if check_wpasync else 0
    )
    return pagemap_scan(
        pagemap_fd,
        start,
        end,
        flags=flags,
        category_mask=PAGE_IS_WRITTEN,
        return_mask=return_mask | PAGE_IS_WRITTEN,
    )


def scan_present(pagemap_fd: int, start: int, end: int) -> PageRegions:
    """The pages present in memory in [start, end). Blocks like pagemap_scan."""
    return pagemap_scan(
        pagemap_fd, start, end, category_mask=PAGE_IS_PRESENT, return_mask=PAGE_IS_PRESENT
    )


# --------------------------------------------------------------------------- process memory


def read_pages(pid: int, addresses: Iterable[int], buf: Any, *, page_size: int = PAGE_SIZE) -> int:
    """process_vm_readv of one `page_size` block per address into `buf` (filled in order; up to
    1024 iovecs per call, adjacent addresses joined). Returns bytes read: less than asked means
    it stopped at the first unreadable block (whole blocks before it are valid). Raises OSError
    only when nothing could be read (ESRCH: no such process, EFAULT: first block unmapped).

    Blocks on the copy; reading a page that is *missing* in a uffd-registered range waits until
    the fault is served (check PAGE_IS_PRESENT first, or keep the fault loop running).
    """
    addrs = _u64_array(addresses)
    cbuf = _writable_buffer(buf, len(addrs) * page_size, "read_pages")
    return check(
        lib.gfvm_vm_read_pages(pid, addrs, len(addrs), page_size, cbuf),
        f"process_vm_readv pid {pid}",
    )


def write_pages(pid: int, addresses: Iterable[int], buf: Any, *, page_size: int = PAGE_SIZE) -> int:
    """process_vm_writev, the mirror of read_pages. Returns bytes written. Blocks on the copy."""
    addrs = _u64_array(addresses)
    cbuf = ffi.from_buffer(buf)
    if len(cbuf) < len(addrs) * page_size:
        raise ValueError(
            f"write_pages: buffer holds {len(cbuf)} bytes, {len(addrs) * page_size} needed"
        )
    return check(
        lib.gfvm_vm_write_pages(pid, addrs, len(addrs), page_size, cbuf),
        f"process_vm_writev pid {pid}",
    )


def _ranges_arrays(ranges: Iterable[tuple[int, int]]) -> tuple[Any, Any, int]:
    pairs = list(ranges)
    starts = ffi.new("uint64_t[]", [s for s, _ in pairs])
    lens = ffi.new("uint64_t[]", [e - s for s, e in pairs])
    return starts, lens, sum(e - s for s, e in pairs)


def read_ranges(pid: int, ranges: Iterable[tuple[int, int]], buf: Any) -> int:
    """process_vm_readv of each [start, end) into `buf`, back to back. Returns bytes read
    (partial like read_pages). Blocks on the copy (see read_pages about missing pages)."""
    starts, lens, total = _ranges_arrays(ranges)
    cbuf = _writable_buffer(buf, total, "read_ranges")
    return check(
        lib.gfvm_vm_transfer_ranges(pid, 0, starts, lens, len(starts), cbuf),
        f"process_vm_readv pid {pid}",
    )


def write_ranges(pid: int, ranges: Iterable[tuple[int, int]], buf: Any) -> int:
    """process_vm_writev of `buf` into each [start, end), back to back. Returns bytes written."""
    starts, lens, total = _ranges_arrays(ranges)
    cbuf = ffi.from_buffer(buf)
    if len(cbuf) < total:
        raise ValueError(f"write_ranges: buffer holds {len(cbuf)} bytes, {total} needed")
    return check(
        lib.gfvm_vm_transfer_ranges(pid, 1, starts, lens, len(starts), cbuf),
        f"process_vm_writev pid {pid}",
    )


def read_regions(pid: int, regions: PageRegions, buf: Any) -> int:
    """process_vm_readv of every region of a scan result into `buf` (regions.page_count pages),
    without building Python lists. Returns bytes read (partial like read_pages)."""
    cbuf = _writable_buffer(buf, regions.page_count * PAGE_SIZE, "read_regions")
    return check(
        lib.gfvm_vm_read_regions(pid, regions.cdata, len(regions), cbuf),
        f"process_vm_readv pid {pid}",
    )


# --------------------------------------------------------------------------- pidfd


PIDFD_THREAD = lib.PIDFD_THREAD


def pidfd_open(pid: int, flags: int = 0) -> int:
    """A pidfd (close-on-exec) for `pid`; ESRCH if there is no such process. Readable (poll)
    once the process has exited. flags=PIDFD_THREAD: a pidfd for one thread (any tid). Never
    blocks."""
    return check(lib.gfvm_pidfd_open(pid, flags), f"pidfd_open({pid})")


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A copy (close-on-exec) of fd `target_fd` of the process behind `pidfd` (root: any
    process). EBADF if it has no such fd. Never blocks."""
    return check(lib.gfvm_pidfd_getfd(pidfd, target_fd), f"pidfd_getfd(fd {target_fd})")


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    """Sends `sig` to the process behind `pidfd` (no PID-reuse race). Never blocks."""
    check(lib.gfvm_pidfd_send_signal(pidfd, sig), f"pidfd_send_signal({sig})")


# --------------------------------------------------------------------------- checksums


def crc32_pages(buf: Any, n: int | None = None) -> array.array:
    """CRC-32 of each 4 KiB page of `buf` (any buffer; n pages, default all whole pages of it),
    as zlib.crc32(page) computes it, as array("I"). Runs without the GIL (about 0.1 us per page
    here), so other Python threads go on meanwhile. Blocks for the computation only."""
    cbuf = ffi.from_buffer(buf)
    if n is None:
        n = len(cbuf) // PAGE_SIZE
    if n < 0 or n * PAGE_SIZE > len(cbuf):
        raise ValueError(f"crc32_pages: buffer holds {len(cbuf)} bytes, {n} pages asked")
    out = array.array("I", bytes(4 * n))
    if n:
        lib.gfvm_crc32_pages(cbuf, n, ffi.from_buffer("uint32_t[]", out))
    return out


#: CRC-32 implementations in csrc/checksum.c, by number (crc32_pages uses the best one the CPU has)
CRC32_IMPLS = {lib.GFVM_CRC32_ZLIB: "zlib", lib.GFVM_CRC32_PCLMUL: "pclmul",
               lib.GFVM_CRC32_VPCLMUL512: "vpclmul512"}


def crc32_impls() -> list[str]:
    """Names of the CRC-32 implementations this CPU can run, slowest first; the last is the one
    crc32_pages and page_matches use. Never blocks."""
    best = lib.gfvm_crc32_best_impl()
    return [name for n, name in sorted(CRC32_IMPLS.items()) if n <= best]


def crc32_page_using(page: Any, impl: str) -> int:
    """CRC-32 of one 4 KiB page with implementation `impl` (a name from crc32_impls; for tests
    that check each against zlib). OSError(ENOTSUP) if this CPU cannot run it. Never blocks."""
    cbuf = ffi.from_buffer(page)
    if len(cbuf) != PAGE_SIZE:
        raise ValueError(f"crc32_page_using: a page is {PAGE_SIZE} bytes, not {len(cbuf)}")
    number = {name: n for n, name in CRC32_IMPLS.items()}[impl]
    out = ffi.new("uint32_t *")
    check(lib.gfvm_crc32_page_using(cbuf, number, out), f"crc32 ({impl})")
    return out[0]


#: page_matches for a `bytes` page, as a direct call into C (no Python frame around it: the
#: same-node verified read calls it once per page, where a wrapper costs a tenth of the read):
#: page_bytes_match(page: bytes, len(page), want) -> 1 if it matches, else 0 (also for more
#: than 4096 bytes). The length must be len(page) itself: C reads that many bytes. About 0.1 us
#: without the GIL; never blocks otherwise.
page_bytes_match: Callable[[bytes, int, int], int] = lib.gfvm_page_matches


def pread_pages(fd: int, pages: array.array, out: Any, wants: array.array | None = None) -> int:
    """Reads 4 KiB page pages[i] of `fd` into out[i*4096 : (i+1)*4096] for each i, checking it
    against wants[i] (File Manager page sums; see `page_matches`) when `wants` is given.
    `pages`: array("Q"); `wants`: array("I") of the same length; `out`: a writable buffer of at
    least len(pages) pages. Returns len(pages) when every page was read whole (and matched);
    else the index of the first page that was short (end of file) or did not match. Raises
    OSError if a pread fails. One call for the whole batch, without the GIL; blocks on disk
    I/O."""
    n = len(pages)
    if pages.typecode != "Q" or (wants is not None and (wants.typecode != "I" or len(wants) != n)):
        raise ValueError("pread_pages: pages must be array('Q'), wants array('I') of the same length")
    cout = ffi.from_buffer(out, require_writable=True)
    if len(cout) < n * PAGE_SIZE:
        raise ValueError(f"pread_pages: {n} pages need {n * PAGE_SIZE} bytes, the buffer has {len(cout)}")
    cwants = ffi.NULL if wants is None else ffi.from_buffer("uint32_t[]", wants)
    rc = lib.gfvm_pread_pages(fd, ffi.from_buffer("uint64_t[]", pages), n, cwants, cout)
    return check(rc, "pread of pages")


def page_matches(page: Any, want: int) -> bool:
    """Whether one page matches `want`, a page sum as the File Manager stores them: 0 = a hole
    (every byte must be zero), else zlib's CRC-32 of the page with 0 stored as 0xFFFFFFFF.
    `page`: any buffer of at most 4096 bytes (longer never matches); a shorter one is the file's
    tail page and is checked zero-filled to 4096. About 0.1 us in C without the GIL; never
    blocks otherwise."""
    if type(page) is not bytes:
        page = ffi.from_buffer(page)
    return bool(lib.gfvm_page_matches(page, len(page), want))


# --------------------------------------------------------------------------- page index


class PageIndex:
    """Virtual page address -> paging-file slot, implemented in C (csrc/pageindex.c).

    Thread-safe (one mutex, taken once per call, batch calls included) and readable by the
    FaultLoop's native thread without the GIL; the loop itself applies the process's REMOVE,
    UNMAP (drop) and REMAP (move) events to it. Keys are page-aligned addresses (ValueError
    otherwise), slots ints in [0, 2**63). No call blocks beyond the mutex.

    Flushing while the process runs races with those events (the process may discard a page
    after the pager read it). Take `seq = index.change_seq` before reading the pages, then
    `index.set_many(addrs, slots, unless_changed_since=seq)`: pages removed or moved meanwhile
    are skipped (and returned), so a discarded page never gets stale data back.
    """

    def __init__(self, capacity_hint: int = 0, *, _ptr: Any = None):
        if _ptr is None:
            _ptr = lib.gfvm_pageindex_new(capacity_hint)
            if _ptr == ffi.NULL:
                raise MemoryError("PageIndex")
        self._ptr = ffi.gc(_ptr, lib.gfvm_pageindex_unref)

    @property
    def cdata(self) -> Any:
        return self._ptr

    def clone(self) -> PageIndex:
        """An independent copy (a forked child starts with a copy of its parent's index)."""
        ptr = lib.gfvm_pageindex_clone(self._ptr)
        if ptr == ffi.NULL:
            raise MemoryError("PageIndex.clone")
        return PageIndex(_ptr=ptr)

    def __len__(self) -> int:
        return int(lib.gfvm_pageindex_count(self._ptr))

    def __repr__(self) -> str:
        return f"PageIndex({len(self)} pages)"

    def get(self, address: int, default: int | None = None) -> int | None:
        slot = ffi.new("uint64_t *")
        rc = lib.gfvm_pageindex_get(self._ptr, address, slot, ffi.NULL)
        if rc == -errno.ENOENT:
            return default
        if rc == -errno.EINVAL:
            raise ValueError(f"page address {address:#x} is not page-aligned")
        return int(slot[0])

    def __getitem__(self, address: int) -> int:
        slot = self.get(address)
        if slot is None:
            raise KeyError(address)
        return slot

    def __contains__(self, address: object) -> bool:
        return isinstance(address, int) and self.get(address) is not None

    def __setitem__(self, address: int, slot: int) -> None:
        self.set(address, slot)

    def get_crc(self, address: int) -> int | None:
        """The CRC-32 stored with the page's entry; None when it has none (or no entry)."""
        slot = ffi.new("uint64_t *")
        crc = ffi.new("int64_t *")
        rc = lib.gfvm_pageindex_get(self._ptr, address, slot, crc)
        if rc == -errno.EINVAL:
            raise ValueError(f"page address {address:#x} is not page-aligned")
        return None if rc < 0 or crc[0] < 0 else int(crc[0])

    def set(self, address: int, slot: int, crc: int | None = None) -> None:
        """Maps the page to `slot`; with `crc` (the CRC-32 of the slot's 4096 bytes, as
        zlib.crc32 / crc32_pages compute it) the fault loop verifies the bytes before serving."""
        if not 0 <= slot < 2**63:
            raise ValueError(f"slot {slot} out of range")
        if crc is not None and not 0 <= crc < 2**32:
            raise ValueError(f"crc {crc} out of range")
        rc = lib.gfvm_pageindex_set(self._ptr, address, slot, -1 if crc is None else crc)
        if rc == -errno.EINVAL:
            raise ValueError(f"page address {address:#x} is not page-aligned")
        check(rc, "PageIndex.set")

    def __delitem__(self, address: int) -> None:
        if not self.remove(address):
            raise KeyError(address)

    def remove(self, address: int) -> bool:
        """Drops the entry; False if there was none."""
        rc = lib.gfvm_pageindex_remove(self._ptr, address)
        if rc == -errno.EINVAL:
            raise ValueError(f"page address {address:#x} is not page-aligned")
        return rc == 1

    def remove_range(self, start: int, end: int) -> int:
        """Drops every entry in [start, end); returns how many."""
        return check(
            lib.gfvm_pageindex_remove_range(self._ptr, start, end), "PageIndex.remove_range"
        )

    def move_range(self, src: int, dst: int, length: int) -> int:
        """Moves the entries of [src, src + length) to dst (as mremap does); returns how many."""
        _check_page_aligned(src, "src")
        _check_page_aligned(dst, "dst")
        return check(
            lib.gfvm_pageindex_move_range(self._ptr, src, dst, length), "PageIndex.move_range"
        )

    def clear(self) -> None:
        lib.gfvm_pageindex_clear(self._ptr)

    @property
    def change_seq(self) -> int:
        """Sequence number of range removals/moves so far (see set_many)."""
        return int(lib.gfvm_pageindex_seq(self._ptr))

    def set_many(
        self,
        addresses: Iterable[int],
        slots: Iterable[int],
        *,
        crcs: Iterable[int] | None = None,
        unless_changed_since: int | None = None,
    ) -> list[int]:
        """Bulk load. `crcs`: the CRC-32 of each slot's bytes (zlib's; e.g. from crc32_pages),
        which the fault loop then verifies before serving (without: served unchecked).
        Without `unless_changed_since`: all entries or none (ValueError for a bad address/slot),
        returns []. With it (a change_seq taken before the pages were read): skips every
        address removed or moved by a change after that point and returns the skipped
        addresses; OSError(ESTALE), setting nothing, if too many changes happened since to tell
        (more than 256: read again)."""
        a, s = _u64_array(addresses), _u64_array(slots)
        if len(a) != len(s):
            raise ValueError("set_many: addresses and slots differ in length")
        c = ffi.NULL
        if crcs is not None:
            c = _u32_array(crcs)
            if len(c) != len(a):
                raise ValueError("set_many: addresses and crcs differ in length")
        if unless_changed_since is None:
            rc = lib.gfvm_pageindex_set_many(self._ptr, a, s, c, len(a))
            skipped = None
        else:
            skipped = ffi.new("uint8_t[]", max(1, len(a)))
            rc = lib.gfvm_pageindex_set_many_if(
                self._ptr, a, s, c, len(a), unless_changed_since, skipped
            )
        if rc == -errno.EINVAL:
            raise ValueError("set_many: unaligned address, slot out of range or unknown change_seq")
        check(rc, "PageIndex.set_many")
        if not skipped or rc == 0:
            return []
        return [int(a[i]) for i in range(len(a)) if skipped[i]]

    def update(self, items: Iterable[tuple[int, int]] | dict[int, int]) -> None:
        pairs = list(items.items() if isinstance(items, dict) else items)
        self.set_many([a for a, _ in pairs], [s for _, s in pairs])

    def get_many(self, addresses: Iterable[int]) -> list[int | None]:
        a = _u64_array(addresses)
        out = ffi.new("int64_t[]", len(a))
        lib.gfvm_pageindex_get_many(self._ptr, a, len(a), out)
        return [None if v < 0 else int(v) for v in out]

    def export(self, start: int = 0, end: int = 2**64 - 1) -> tuple[array.array, array.array]:
        """Entries in [start, end), sorted by address: (addresses, slots) as array('Q')."""
        cap = 0
        while True:
            addrs = array.array("Q", bytes(8 * cap))
            slots = array.array("Q", bytes(8 * cap))
            n = check(
                lib.gfvm_pageindex_export(
                    self._ptr,
                    start,
                    end,
                    ffi.from_buffer("uint64_t[]", addrs),
                    ffi.from_buffer("uint64_t[]", slots),
                    ffi.NULL,
                    cap,
                ),
                "PageIndex.export",
            )
            if n <= cap:
                return addrs[:n], slots[:n]
            cap = n + 64  # it may grow between the calls

    def items(self, start: int = 0, end: int = 2**64 - 1) -> list[tuple[int, int]]:
        addrs, slots = self.export(start, end)
        return list(zip(addrs, slots))

    def __iter__(self) -> Iterator[int]:
        return iter(self.export()[0])


# --------------------------------------------------------------------------- fault loop


@dataclass(frozen=True)
class Source:
    """Where a FaultLoop reads pages from: `index` maps a page to a slot, the page's bytes are
    at slot * 4096 of `fd` (pread) or of `mapping` (any buffer, e.g. an mmap of the file; slots
    beyond it fall back to `fd`). The loop dups `fd`; it keeps `mapping` exported (so it cannot
    be closed) until FaultLoop.close(), since forked children inherit their parent's sources.
    A Source returned by FaultLoop.sources() owns its `fd` (closed when the Source goes away)."""

    index: PageIndex
    fd: int = -1
    mapping: Any = None
    _fd_owner: Any = field(default=None, repr=False, compare=False)


class _OwnedFd:
    """Closes an fd when garbage-collected (the fd of a Source from FaultLoop.sources())."""

    def __init__(self, fd: int):
        self.fd = fd

    def __del__(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class FaultLoopCounters:
    faults: int  #: page-fault messages read
    windows: int  #: windows served
    pages_copied: int  #: pages installed from a source
    pages_zero: int  #: pages installed as zeros
    eexist: int  #: pages skipped because already present
    eagain: int  #: retries after EAGAIN (pending events read first)
    enoent: int  #: windows cut back to the faulting page (VMA edge moved, range unmapped)
    events: int  #: fork/remap/remove/unmap messages
    deferred: int  #: faults handed to Python (LoopEvent kind "fault")
    errors: int  #: fatal errors
    pages_poisoned: int  #: pages that failed their checksum: poisoned, never served
    pages_prefetched: int  #: pages installed by prefetch() (also in pages_copied)
    from_source: tuple[int, ...]  #: pages_copied per source (index = position in the sources)


@dataclass(frozen=True)
class LatencyHistogram:
    """Window service times: buckets[b] counts windows that took [2**b, 2**(b+1)) ns from
    reading the fault message to the pages being installed."""

    buckets: tuple[int, ...]

    @property
    def count(self) -> int:
        return sum(self.buckets)

    def quantile(self, q: float) -> int | None:
        """Upper bound (ns) of the bucket holding the q-quantile; None when empty."""
        total = self.count
        if not total:
            return None
        seen = 0
        for b, n in enumerate(self.buckets):
            seen += n
            if seen >= q * total:
                return 2 ** (b + 1)
        return 2 ** len(self.buckets)

    @property
    def p50_ns(self) -> int | None:
        return self.quantile(0.50)

    @property
    def p99_ns(self) -> int | None:
        return self.quantile(0.99)


@dataclass
class LoopEvent:
    """Something the FaultLoop tells Python.

    kind:
      "fork"   a process forked. `uffd` = the child's uffd (owned by the receiver; hand it to a
               keeper). child_id != 0: the loop already serves the child with clones of the
               parent's sources (give it a pidfd/pid with set_process); child_id == 0: it could
               not (`error`), Python must serve `uffd`.
      "remap"  [start, end) moved to `to`  } already applied to every source index
      "remove" [start, end) dropped        }   of that uffd (a remove inside an announced
      "unmap"  [start, end) unmapped       }   eviction keeps its entries: `evicted`)
      "fault"  a fault the loop leaves to Python (`start` = address, flags, tid): WP/minor
               faults, or (defer_missing) a page found in no source. Serve it and wake it.
      "exit"   the process is gone; the loop no longer reads this uffd
      "error"  fatal errno `error`: the loop no longer reads this uffd; faults it had read but
               not served were woken and wait in the uffd again. Python decides (fail-stop).
               Except error == EBADMSG (`corrupt`): page [start, end) failed its checksum:
               `slot` of source number `source` holds bytes that do not match the index's
               CRC-32. The page was poisoned instead (an access raises SIGBUS, never wrong
               data); the loop goes on serving the uffd.
      "prefetched" every range given to prefetch() for this uffd is done; `count` = pages
               installed.
    """

    kind: str
    uffd_id: int
    start: int = 0
    end: int = 0
    to: int = 0
    flags: int = 0
    tid: int = 0
    error: int = 0
    child_id: int = 0
    uffd: Userfaultfd | None = None
    slot: int = 0
    source: int = 0
    count: int = 0

    @property
    def corrupt(self) -> bool:
        """An "error" that is a page failing its checksum (poisoned; the uffd is still served)."""
        return self.kind == "error" and self.error == errno.EBADMSG

    @property
    def evicted(self) -> bool:
        """A "remove" caused by the pager's own announced eviction (index entries kept)."""
        return self.kind == "remove" and bool(self.flags & lib.GFVM_FL_EVICTED)


_LOOP_EVENT_KINDS = {
    lib.GFVM_FL_FORK: "fork",
    lib.GFVM_FL_REMAP: "remap",
    lib.GFVM_FL_REMOVE: "remove",
    lib.GFVM_FL_UNMAP: "unmap",
    lib.GFVM_FL_FAULT: "fault",
    lib.GFVM_FL_EXIT: "exit",
    lib.GFVM_FL_ERROR: "error",
    lib.GFVM_FL_PREFETCHED: "prefetched",
}
_LOOP_STATES = {
    lib.GFVM_FL_ACTIVE: "active",
    lib.GFVM_FL_EXITED: "exited",
    lib.GFVM_FL_FAILED: "failed",
}


class FaultLoop:
    """Native fault service for one or more uffds, on its own pthread (no GIL).

    On a MISSING fault at page A of a uffd, it serves the window of `window_pages` pages aligned
    around A, cut to A's VMA: pages found in the uffd's sources are read from them, the others
    are installed as zeros (or, with defer_missing, left to Python). A page whose index entry
    has a CRC-32 is verified after it is read; one that fails is poisoned (SIGBUS on access,
    never wrong data) and reported ("error" event, `corrupt`). With wp=True pages go in
    write-protected (UFFDIO_COPY MODE_WP; zeros as a copy of zeros), so dirty tracking stays
    exact. Events (fork, remap, remove, unmap) are read promptly, applied to the indexes and
    queued as LoopEvents; `notify_fd` (an eventfd) is readable while some are queued, so a trio
    task can `await loop.wait_events()`.

    Stopping contract: the loop never reads a fault it neither serves nor wakes; unread faults
    stay queued in the uffd and their threads stay blocked. They never get zeros as long as some
    process keeps each uffd open: the kernel resolves faults with zeros when the last reference
    to a uffd goes away, so keep a duplicate of every uffd (LoopEvent.uffd of forks included) in
    a keeper process. A successor taking over after a crash must wake() all ranges (faults read
    by the dead server are not sent again). Once added, only the loop may read() the uffd.

    start()/stop()/close() block briefly (thread start/join); the others never block beyond a
    mutex (set_sources/set_process wait for the window being served, microseconds).
    """

    def __init__(self, window_pages: int = 64):
        out = ffi.new("struct gfvm_faultloop **")
        check(lib.gfvm_faultloop_create(out, window_pages), "FaultLoop")
        self._loop = out[0]
        self._keep: list[Any] = []  # mappings exported to the C side
        self._window = window_pages

    def _ptr(self) -> Any:
        if self._loop is None:
            raise ValueError("FaultLoop is closed")
        return self._loop

    @property
    def notify_fd(self) -> int:
        """eventfd, readable while events are queued (pop_events() resets it)."""
        return int(lib.gfvm_faultloop_notify_fd(self._ptr()))

    @property
    def window_pages(self) -> int:
        return self._window

    @window_pages.setter
    def window_pages(self, pages: int) -> None:
        check(lib.gfvm_faultloop_set_window(self._ptr(), pages), f"FaultLoop window {pages}")
        self._window = pages

    def start(self) -> None:
        """Starts the service thread."""
        check(lib.gfvm_faultloop_start(self._ptr()), "FaultLoop.start")

    def stop(self) -> None:
        """Stops the thread after the batch it is serving (blocks until it has exited). Entries
        stay; start() resumes service."""
        check(lib.gfvm_faultloop_stop(self._ptr()), "FaultLoop.stop")

    def close(self) -> None:
        """stop(), then drops every entry and queued event (closing their fds). Idempotent."""
        if self._loop is not None:
            loop, self._loop = self._loop, None
            lib.gfvm_faultloop_destroy(loop)
            self._keep.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _source_array(self, sources: Sequence[Source]) -> tuple[Any, int]:
        if len(sources) > lib.GFVM_FL_MAX_SOURCES:
            raise ValueError(f"at most {lib.GFVM_FL_MAX_SOURCES} sources per uffd")
        arr = ffi.new("struct gfvm_fl_source[]", max(1, len(sources)))
        for i, src in enumerate(sources):
            if src.fd < 0 and src.mapping is None:
                raise ValueError("a Source needs an fd or a mapping")
            arr[i].index = src.index.cdata
            arr[i].fd = src.fd
            arr[i].map = ffi.NULL
            arr[i].map_len = 0
            if src.mapping is not None:
                view = ffi.from_buffer(src.mapping)
                self._keep.append((view, src.mapping))
                arr[i].map = view
                arr[i].map_len = len(view)
        return arr, len(sources)

    def add(
        self,
        uffd: Userfaultfd | int,
        sources: Sequence[Source],
        *,
        wp: bool,
        defer_missing: bool = False,
        pid: int = 0,
        pidfd: int = -1,
    ) -> int:
        """Starts serving `uffd` (the loop keeps its own dup, sets O_NONBLOCK); returns its id.

        wp: the uffd tracks dirty pages (ranges registered WP with WP_ASYNC): install pages
        write-protected. Must be False for a uffd without WP registration (e.g. CRIU's).
        defer_missing: a page in no source is not installed; its fault goes to Python.
        pid: clamp windows to the faulting VMA (PROCMAP_QUERY on /proc/PID/maps).
        pidfd: notice the process's death ("exit" event) -- uffds say nothing on exit.
        Sources are searched in order (e.g. the paging file, then CRIU's page images).
        """
        fd = uffd.fileno() if isinstance(uffd, Userfaultfd) else uffd
        arr, n = self._source_array(sources)
        spec = ffi.new("struct gfvm_fl_uffd_spec *")
        spec.uffd = fd
        spec.pidfd = pidfd
        spec.pid = pid
        spec.flags = (lib.GFVM_FL_WP if wp else 0) | (
            lib.GFVM_FL_DEFER_MISSING if defer_missing else 0
        )
        spec.nsources = n
        for i in range(n):
            spec.sources[i] = arr[i]
        out = ffi.new("uint32_t *")
        check(lib.gfvm_faultloop_add(self._ptr(), spec, out), "FaultLoop.add")
        return int(out[0])

    def set_sources(self, uffd_id: int, sources: Sequence[Source]) -> None:
        """Replaces the sources of an entry (takes effect from the next window)."""
        arr, n = self._source_array(sources)
        check(lib.gfvm_faultloop_set_sources(self._ptr(), uffd_id, arr, n), "FaultLoop.set_sources")

    def sources(self, uffd_id: int) -> list[Source]:
        """The sources the loop serves entry `uffd_id` from, in order. For a forked child these
        are the clones of its parent's indexes the loop made at the fork: the very PageIndex
        objects the loop reads, so the caller can update them (set_many after its own flushes)
        or evict with them (evict_pages). Each Source owns a new dup of the loop's fd and keeps
        the mapping object the parent's Source was given. Never blocks beyond a mutex (waits for
        the window being served). KeyError for an unknown id."""
        out = ffi.new("struct gfvm_fl_source[]", lib.GFVM_FL_MAX_SOURCES)
        rc = lib.gfvm_faultloop_sources(self._ptr(), uffd_id, out, lib.GFVM_FL_MAX_SOURCES)
        if rc == -errno.ENOENT:
            raise KeyError(uffd_id)
        n = check(rc, "FaultLoop.sources")
        mappings = {int(ffi.cast("uintptr_t", view)): obj for view, obj in self._keep}
        result = []
        for i in range(n):
            fd = int(out[i].fd)
            mapping = None
            if out[i].map != ffi.NULL:
                mapping = mappings.get(int(ffi.cast("uintptr_t", out[i].map)))
            result.append(
                Source(
                    PageIndex(_ptr=out[i].index),  # the reference C gave us
                    fd,
                    mapping,
                    _OwnedFd(fd) if fd >= 0 else None,
                )
            )
        return result

    def set_process(self, uffd_id: int, pid: int = 0, pidfd: int = -1) -> None:
        """Tells the loop which process an entry serves (a forked child's, typically)."""
        check(
            lib.gfvm_faultloop_set_process(self._ptr(), uffd_id, pid, pidfd),
            "FaultLoop.set_process",
        )

    def remove(self, uffd_id: int) -> None:
        """Stops serving an entry (after the batch being served, if any). KeyError if unknown."""
        rc = lib.gfvm_faultloop_remove(self._ptr(), uffd_id)
        if rc == -errno.ENOENT:
            raise KeyError(uffd_id)
        check(rc, "FaultLoop.remove")

    def expect_eviction(self, uffd_id: int, ranges: Iterable[tuple[int, int]]) -> None:
        """Announces that the pager is about to drop [start, end) ranges itself (injected
        MADV_DONTNEED): REMOVE events inside them keep their index entries (the pages live on in
        the paging file) instead of being treated as the process discarding its data. Replaces
        any earlier announcement; an empty list ends it. Use evict_pages() rather than this."""
        pairs = list(ranges)
        starts = ffi.new("uint64_t[]", [a for a, _ in pairs] or [0])
        ends = ffi.new("uint64_t[]", [e for _, e in pairs] or [0])
        rc = lib.gfvm_faultloop_expect_remove(self._ptr(), uffd_id, starts, ends, len(pairs))
        if rc == -errno.ENOENT:
            raise KeyError(uffd_id)
        check(rc, "FaultLoop.expect_eviction")

    def prefetch(self, uffd_id: int, ranges: Iterable[tuple[int, int]]) -> None:
        """Queues a background push of the pages the entry's sources have within `ranges`
        ([start, end), rounded out to pages): the loop thread installs them between faults
        (faults and events always first), in chunks of up to 256 pages inside one VMA, with the
        same checksum verification and WP mode as faults; pages in no source are skipped (never
        zero-filled ahead), pages already present are left alone. Every copy stays on the loop
        thread, ordered with the events it reads. When the entry's queue is done (or given up:
        process gone, entry removed or failed) a "prefetched" LoopEvent says how many pages it
        installed (`count`; `error` 0, or why it stopped). Calls add to the queue. Never blocks
        beyond a mutex. KeyError for an unknown id, ProcessLookupError if the entry no longer
        serves (its process exited, or it failed)."""
        pairs = list(ranges)
        for a, e in pairs:
            if e < a:
                raise ValueError(f"prefetch range {a:#x}-{e:#x} ends before it starts")
        starts = ffi.new("uint64_t[]", [a for a, _ in pairs] or [0])
        ends = ffi.new("uint64_t[]", [e for _, e in pairs] or [0])
        rc = lib.gfvm_faultloop_prefetch(self._ptr(), uffd_id, starts, ends, len(pairs))
        if rc == -errno.ENOENT:
            raise KeyError(uffd_id)
        if rc == -errno.ESRCH:
            raise ProcessLookupError(errno.ESRCH, f"fault loop entry {uffd_id} no longer serves")
        check(rc, "FaultLoop.prefetch")

    def sync(self, uffd_id: int = 0) -> None:
        """Returns once the loop has finished with every message it has read so far from that
        uffd (0: from every uffd): events applied to the indexes and queued, faults served.

        Why: the kernel lets a process return from madvise/munmap/mremap/fork as soon as the loop
        *reads* the event, a moment before the loop has applied it and queued it. So "the process
        said its munmap returned" does not yet mean "pop_events() has it"; after sync() it does
        (and with every thread of the process stopped, the indexes then reflect every event the
        process completed). Blocks for at most the batch being served (microseconds, or a
        window's reads). KeyError for an unknown id."""
        rc = lib.gfvm_faultloop_sync(self._ptr(), uffd_id)
        if rc == -errno.ENOENT:
            raise KeyError(uffd_id)
        check(rc, "FaultLoop.sync")

    def state(self, uffd_id: int) -> tuple[str, int]:
        """("active" | "exited" | "failed", errno of the failure or 0)."""
        st, err = ffi.new("int *"), ffi.new("int *")
        rc = lib.gfvm_faultloop_state(self._ptr(), uffd_id, st, err)
        if rc == -errno.ENOENT:
            raise KeyError(uffd_id)
        return _LOOP_STATES[st[0]], int(err[0])

    def dup_uffd(self, uffd_id: int) -> Userfaultfd:
        """A new fd for the uffd an entry serves."""
        rc = lib.gfvm_faultloop_dup_uffd(self._ptr(), uffd_id)
        if rc == -errno.ENOENT:
            raise KeyError(uffd_id)
        return Userfaultfd(check(rc, "FaultLoop.dup_uffd"))

    def counters(self, uffd_id: int = 0) -> FaultLoopCounters:
        """Counters of one entry, or (0) totals over every uffd served so far."""
        c = ffi.new("struct gfvm_fl_counters *")
        rc = lib.gfvm_faultloop_counters(self._ptr(), uffd_id, c)
        if rc == -errno.ENOENT:
            raise KeyError(uffd_id)
        values: dict[str, Any] = {}
        for name, _ in ffi.typeof(c[0]).fields:
            v = getattr(c, name)
            values[name] = int(v) if isinstance(v, int) else tuple(int(x) for x in v)
        return FaultLoopCounters(**values)

    def latency(self) -> LatencyHistogram:
        buckets = ffi.new("uint64_t[]", lib.GFVM_FL_HIST_BUCKETS)
        n = lib.gfvm_faultloop_latency(self._ptr(), buckets, len(buckets))
        return LatencyHistogram(tuple(int(b) for b in buckets[0:n]))

    def pop_events(self, max_events: int = 256) -> list[LoopEvent]:
        """Takes queued events (oldest first) without blocking; resets notify_fd first, so an
        event queued meanwhile leaves it readable."""
        try:
            os.eventfd_read(self.notify_fd)
        except BlockingIOError:
            pass
        out = ffi.new("struct gfvm_fl_event[]", max_events)
        n = lib.gfvm_faultloop_pop_events(self._ptr(), out, max_events)
        if n == max_events:
            os.eventfd_write(self.notify_fd, 1)  # more may be queued: stay readable
        events = []
        for i in range(n):
            ev = out[i]
            events.append(
                LoopEvent(
                    kind=_LOOP_EVENT_KINDS[ev.kind],
                    uffd_id=int(ev.uffd_id),
                    start=int(ev.start),
                    end=int(ev.end),
                    to=int(ev.to),
                    flags=int(ev.flags),
                    tid=int(ev.tid),
                    error=int(ev.error),
                    child_id=int(ev.child_id),
                    uffd=Userfaultfd(int(ev.fd)) if ev.fd >= 0 else None,
                    slot=int(ev.slot),
                    source=int(ev.source),
                    count=int(ev.count),
                )
            )
        return events

    async def wait_events(self, max_events: int = 256) -> list[LoopEvent]:
        """Waits (trio checkpoint) until events are queued, then pops them."""
        import trio

        while True:
            events = self.pop_events(max_events)
            if events:
                return events
            await trio.lowlevel.wait_readable(self.notify_fd)


# --------------------------------------------------------------------------- ptrace

REG_NAMES = (
    "r15",
    "r14",
    "r13",
    "r12",
    "rbp",
    "rbx",
    "r11",
    "r10",
    "r9",
    "r8",
    "rax",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "orig_rax",
    "rip",
    "cs",
    "eflags",
    "rsp",
    "ss",
    "fs_base",
    "gs_base",
    "ds",
    "es",
    "fs",
    "gs",
)
assert len(REG_NAMES) == lib.GFVM_NREGS

Registers = NamedTuple("Registers", [(n, int) for n in REG_NAMES])  # type: ignore[misc]

SYS_userfaultfd = lib.SYS_userfaultfd
SYS_madvise = lib.SYS_madvise
SYS_close = lib.SYS_close
SYS_mmap = lib.SYS_mmap
SYS_munmap = lib.SYS_munmap
SYS_getpid = lib.SYS_getpid
MADV_DONTNEED = lib.MADV_DONTNEED


def frozen_cgroup(pid: int) -> str | None:
    """The freezer control that keeps `pid` frozen, or None: a cgroup v2 `cgroup.freeze` = 1 on
    its cgroup or an ancestor, or a cgroup v1 `freezer.state` other than THAWED. Never blocks
    beyond reading a few /proc and /sys files. See Tracer about what that means for injection."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"no process {pid}") from None
    mounts = _cgroup_mounts()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and "cgroup2" in mounts:
            parts = [p for p in path.split("/") if p]
            for depth in range(len(parts), 0, -1):
                ctl = os.path.join(mounts["cgroup2"], *parts[:depth], "cgroup.freeze")
                with contextlib.suppress(OSError), open(ctl) as f:
                    if f.read().strip() == "1":
                        return ctl
        elif "freezer" in controllers.split(",") and "freezer" in mounts:
            ctl = os.path.join(mounts["freezer"], path.lstrip("/"), "freezer.state")
            with contextlib.suppress(OSError), open(ctl) as f:
                if f.read().strip() != "THAWED":
                    return ctl
    return None


@functools.lru_cache(maxsize=1)
def _cgroup_mounts() -> dict[str, str]:
    """Where the cgroup2 and v1 freezer hierarchies are mounted (read once)."""
    found: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _, opts = (right.split() + ["", "", ""])[:3]
            mountpoint = left.split()[4]
            if fstype == "cgroup2":
                found.setdefault("cgroup2", mountpoint)
            elif fstype == "cgroup" and "freezer" in opts.split(","):
                found.setdefault("freezer", mountpoint)
    return found


class Tracer:
    """ptrace on one dedicated OS thread: stop every thread of a process, inject syscalls.

    Every method runs its ptrace work on the tracer's own thread (ptrace requests must come from
    the thread that attached) and blocks the caller until done; from trio use
    `trio.to_thread.run_sync(tracer.method, ...)`. Tracees are released when the Tracer is
    closed (and, by the kernel, if its thread ends). No other thread of this process may wait for
    a traced task (os.waitpid/Popen.wait/poll on it would steal its ptrace stops).

    Stopping: stop_process(pid) seizes (PTRACE_SEIZE: no signal sent) and interrupts every
    thread in /proc/PID/task, repeating until no new thread appears; each then sits in a ptrace
    stop. A thread that was in a group stop (SIGSTOP) stays stopped after resume_process();
    a thread blocked in a syscall restarts it (read() on a pipe, nanosleep, ...) unchanged.

    Injection (csrc/inject.c has the details): the syscall runs on an existing `syscall`
    instruction of the target's [vdso]; no code is modified. Registers and signal mask are put
    back exactly, on every error path too; while a session is open the target has
    PTRACE_O_EXITKILL, so if this process dies mid-injection the target is killed (fail-stop)
    instead of running with foreign registers. An injected call that blocks longer than
    `syscall_timeout` (e.g. madvise waiting for a uffd REMOVE event nobody reads) raises
    TimeoutError and leaves the session open; call finish(tid) later to complete the rollback.

    Frozen cgroups: a task frozen by the cgroup v2 freezer can be stopped (it then sits in a
    ptrace stop; the cgroup still reads frozen) but cannot run an injected syscall while frozen.
    Sequence: stop_process() -> write 0 to cgroup.freeze (the traced threads stay in their
    ptrace stops; untraced tasks of the cgroup do run) -> inject -> write 1 to cgroup.freeze
    (frozen again with the tracees counted frozen) -> resume_process() (each goes straight back
    into the freezer, without running user code). Injection into a task whose cgroup is frozen
    raises OSError(EBUSY) naming the control file. A task frozen by the v1 freezer cannot even
    be stopped (it enters the ptrace stop only when thawed): stop_process raises EBUSY.
    """

    def __init__(self, *, stop_timeout: float = 5.0, syscall_timeout: float = 10.0):
        self.stop_timeout = stop_timeout
        self.syscall_timeout = syscall_timeout
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped: dict[int, dict[int, int]] = {}  # pid -> {tid: stop signal (0: interrupt)}
        self._syscall_ip: dict[int, int] = {}
        self._open: dict[int, tuple[Any, int]] = {}  # tid -> (session, pid): could not end yet
        self._late: set[int] = set()  # seized threads that had not stopped when released
        self._thread = threading.Thread(target=self._run, name="gfvm-tracer", daemon=True)
        self._thread.start()
        self._closed = False

    # -- the tracer thread

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, fut = job
            self._release_late_stoppers()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's future
                    fut.set_exception(exc)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs fn(*args) on the tracer thread and returns its result (blocks until done)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        if self._closed:
            raise RuntimeError("Tracer is closed")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, args, fut))
        return fut.result()

    def close(self) -> None:
        """Releases every stopped process, then ends the tracer thread. Blocks until done."""
        if self._closed:
            return
        try:
            self.call(self._release_all)
        finally:
            self._closed = True
            self._jobs.put(None)
            self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stopping (tracer thread)

    def _ms(self, seconds: float | None) -> int:
        return -1 if seconds is None else int(seconds * 1000)

    def _stop_process(self, pid: int) -> list[int]:
        if pid in self._stopped:
            return sorted(self._stopped[pid])
        ctl = frozen_cgroup(pid)
        if ctl and "freezer.state" in ctl:
            raise OSError(
                errno.EBUSY,
                f"process {pid} is frozen by the cgroup v1 freezer ({ctl}): "
                "its threads can be stopped only after a thaw",
            )
        tids: dict[int, int] = {}
        gone: set[int] = set()  # exited threads and a zombie leader: nothing to stop
        self._stopped[pid] = tids
        try:
            while True:
                try:
                    listing = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
                except FileNotFoundError:
                    raise ProcessLookupError(errno.ESRCH, f"no process {pid}") from None
                new = sorted(listing - tids.keys() - gone)
                if not new:
                    break
                seized = []
                for tid in new:
                    rc = lib.gfvm_ptrace_seize(tid)
                    if rc == -errno.ESRCH or (rc == -errno.EPERM and _is_zombie(pid, tid)):
                        gone.add(tid)
                        continue
                    check(rc, f"PTRACE_SEIZE {tid}")
                    seized.append(tid)
                    tids[tid] = -1  # seized, not yet stopped
                for tid in seized:
                    check(lib.gfvm_ptrace_interrupt(tid), f"PTRACE_INTERRUPT {tid}")
                for tid in seized:
                    sig = ffi.new("int *")
                    rc = lib.gfvm_ptrace_wait_stop(tid, self._ms(self.stop_timeout), sig)
                    if rc == -errno.ESRCH:
                        del tids[tid]
                        gone.add(tid)
                        continue
                    if rc == -errno.ETIMEDOUT:
                        raise TimeoutError(
                            errno.ETIMEDOUT,
                            f"thread {tid} of {pid} did not stop within {self.stop_timeout} s",
                        )
                    check(rc, f"waiting for thread {tid} to stop")
                    tids[tid] = int(sig[0])
            if not tids:
                raise ProcessLookupError(errno.ESRCH, f"process {pid} has no thread left")
            # Read the maps of a live thread: a leader that called pthread_exit has none.
            live = pid if tids.get(pid, -1) >= 0 else min(t for t, s in tids.items() if s >= 0)
            ip = ffi.new("uint64_t *")
            check(lib.gfvm_find_syscall_insn(live, ip), f"finding a syscall instruction in {pid}")
            self._syscall_ip[pid] = int(ip[0])
        except BaseException:
            self._release(pid)
            raise
        return sorted(tids)

    def _release(self, pid: int) -> None:
        tids = self._stopped.pop(pid, {})
        self._syscall_ip.pop(pid, None)
        for tid, sig in tids.items():
            if sig == -1:
                # Seized but never seen stopped: it stops at its next chance; catch that briefly,
                # else detach it as soon as it does (see _release_late_stoppers).
                out = ffi.new("int *")
                rc = lib.gfvm_ptrace_wait_stop(tid, 100, out)
                if rc == -errno.ETIMEDOUT:
                    self._late.add(tid)
                if rc < 0:
                    continue
            if tid in self._open:
                if (
                    lib.gfvm_inject_end(self._open[tid][0], self._ms(self.syscall_timeout))
                    == -errno.ETIMEDOUT
                ):
                    continue  # keep it traced: detaching would let it run with foreign registers
                del self._open[tid]
            lib.gfvm_ptrace_detach(tid)

    def _release_late_stoppers(self) -> None:
        """Detaches threads that were given up on while not yet stopped, once they stop (else
        they would wait in their ptrace stop for ever). Runs before every job."""
        out = ffi.new("int *")
        for tid in list(self._late):
            rc = lib.gfvm_ptrace_wait_stop(tid, 0, out)
            if rc == 0:
                lib.gfvm_ptrace_detach(tid)
            if rc != -errno.ETIMEDOUT:
                self._late.discard(tid)

    def _release_all(self) -> None:
        for pid in list(self._stopped):
            self._release(pid)

    # -- public stopping API

    def stop_process(self, pid: int) -> list[int]:
        """Stops every thread of `pid` (see the class doc); returns their tids. Idempotent.
        Raises ProcessLookupError (ESRCH), PermissionError (EPERM: e.g. already traced by
        someone else, or our own process), TimeoutError (a thread did not stop), OSError(EBUSY)
        for a v1-frozen process. Blocks until every thread is stopped."""
        return self.call(self._stop_process, pid)

    def resume_process(self, pid: int) -> None:
        """Detaches from every thread of `pid`: each continues exactly where it was (a group
        stop stays a group stop). No-op if not stopped."""
        self.call(self._release, pid)

    @contextlib.contextmanager
    def stopped(self, pid: int) -> Iterator[list[int]]:
        """`with tracer.stopped(pid) as tids:` stop_process ... resume_process."""
        tids = self.stop_process(pid)
        try:
            yield tids
        finally:
            self.resume_process(pid)

    def stopped_threads(self, pid: int) -> list[int]:
        """The tids of `pid` this tracer holds stopped ([] if none). Never blocks."""
        return sorted(self._stopped.get(pid, {}))

    def rseq_area(self, tid: int) -> tuple[int, int] | None:
        """(address, size) of the rseq area a stopped thread registered (its TLS), or None when
        it has none. The kernel writes there on every return to user mode, and CRIU reads it
        through ptrace while dumping: a pager that drops memory must keep that page. Uses
        PTRACE_GET_RSEQ_CONFIGURATION (Linux >= 5.13) on the tracer thread."""
        import ctypes

        def get() -> tuple[int, int] | None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.ptrace.restype = ctypes.c_long
            libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
            conf = (ctypes.c_uint64 * 3)()  # rseq_abi_pointer, size+signature, flags+pad
            rc = libc.ptrace(0x420F, tid, ctypes.sizeof(conf), ctypes.addressof(conf))
            if rc < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"PTRACE_GET_RSEQ_CONFIGURATION {tid}: {os.strerror(err)}")
            addr, size = int(conf[0]), int(conf[1]) & 0xFFFFFFFF
            return (addr, size) if addr and size else None

        return self.call(get)

    def registers(self, tid: int) -> Registers:
        """The general registers of a stopped thread."""

        def get() -> Registers:
            regs = ffi.new("uint64_t[]", lib.GFVM_NREGS)
            check(lib.gfvm_ptrace_getregs(tid, regs), f"PTRACE_GETREGS {tid}")
            return Registers(*[int(v) for v in regs])

        return self.call(get)

    # -- injection

    def _pick_tid(self, pid: int, tid: int | None) -> int:
        tids = self._stopped[pid]
        if tid is not None:
            if tids.get(tid, -1) < 0:
                raise ValueError(f"thread {tid} of {pid} is not stopped by this tracer")
            return tid
        if tids.get(pid, -1) >= 0:
            return pid
        return next(t for t, s in sorted(tids.items()) if s >= 0)

    def _with_session(self, pid: int, tid: int | None, body: Callable[[_Session], Any]) -> Any:
        ctl = frozen_cgroup(pid)
        if ctl:
            raise OSError(
                errno.EBUSY,
                f"process {pid} is frozen ({ctl}): thaw it while its "
                "threads are stopped, inject, then freeze it again (see Tracer)",
            )
        auto = pid not in self._stopped
        if auto:
            self._stop_process(pid)
        try:
            t = self._pick_tid(pid, tid)
            if t in self._open:
                raise OSError(errno.EBUSY, f"thread {t} has an unfinished injection: call finish()")
            session = _Session(self, pid, t, self._syscall_ip[pid])
            try:
                return body(session)
            finally:
                session.end()
        finally:
            if auto:
                self._release(pid)

    def inject(
        self, pid: int, calls: Sequence[Sequence[int]], *, tid: int | None = None
    ) -> list[int]:
        """Runs syscalls (nr, arg0, ..., arg5) one after another in one stop of `pid` (thread
        `tid`, default the main thread) and returns their raw results (-errno on failure).
        Stops and resumes the process itself unless it is already stopped by this tracer.
        Blocks until done (each call up to syscall_timeout)."""
        return self.call(self._with_session, pid, tid, lambda s: [s.syscall(*c) for c in calls])

    def syscall(self, pid: int, nr: int, *args: int, tid: int | None = None) -> int:
        """One injected syscall; returns its result, raises OSError when it fails."""
        rc = self.inject(pid, [(nr, *args)], tid=tid)[0]
        return check(rc, f"injected syscall {nr} in {pid}")

    def inject_userfaultfd(self, pid: int, *, tid: int | None = None) -> Userfaultfd:
        """Creates a userfaultfd inside `pid` (O_CLOEXEC|O_NONBLOCK, never USER_MODE_ONLY),
        copies it out with pidfd_getfd and closes it in the target, all in one stop. The
        returned uffd acts on the target's memory; call api() on it next."""
        return self.call(self._with_session, pid, tid, _make_uffd_in(pid))

    def inject_userfaultfd_at_exec(
        self, pid: int, resume: Callable[[], None], *, timeout: float = 10.0
    ) -> Userfaultfd:
        """Creates a userfaultfd in the program `pid` is about to exec, before that program's
        first instruction: for a task that stopped itself (SIGSTOP) right before an exec, e.g.
        a shell shim `kill -STOP $$; exec CMD`.

        Seizes `pid` with PTRACE_O_TRACEEXEC|PTRACE_O_EXITKILL (if this process dies meanwhile,
        the task is killed rather than left half-attached), waits for its stop, calls `resume()`
        (the caller sends SIGCONT: `lambda: os.kill(pid, signal.SIGCONT)`), continues it through
        signal-delivery stops (signals are delivered as usual) until PTRACE_EVENT_EXEC, lets the
        exec complete up to the signal-path stop just before the new program's first
        instruction, injects userfaultfd() there, copies it out with pidfd_getfd, closes it in
        the target and detaches. The returned uffd acts on the new program's memory; call api()
        next. The task must be single-threaded (a shim is). A job-control stop that arrives
        between resume() and the exec is not honoured (the task is continued); one that arrives
        at the final stop is (the task stays stopped after the detach).

        Raises ProcessLookupError if the task exits before it execs (the message has its exit
        status, e.g. 127 for a command the shell did not find), TimeoutError if it does not stop
        (within stop_timeout) or exec (within `timeout` seconds after resume()), PermissionError
        if it cannot be traced (or, e.g., a seccomp filter forbids userfaultfd at that point),
        OSError(EBUSY) if this tracer holds it already. Any exception from resume() is
        re-raised after the task is released (still stopped). Blocks until done.
        """
        return self.call(self._uffd_at_exec, pid, resume, timeout)

    def _uffd_at_exec(self, pid: int, resume: Callable[[], None], timeout: float) -> Userfaultfd:
        if pid in self._stopped:
            raise OSError(errno.EBUSY, f"process {pid} is already stopped by this tracer")
        check(
            lib.gfvm_ptrace_seize_opts(pid, lib.PTRACE_O_TRACEEXEC | lib.PTRACE_O_EXITKILL),
            f"PTRACE_SEIZE {pid}",
        )
        at_stop = False  # whether the task sits in a ptrace stop we have seen (can be detached)
        try:
            # 1. Seizing a stopped task traps it in its group stop. A task that has not acted on
            #    its SIGSTOP yet shows a signal-delivery stop first: deliver it.
            deadline = time.monotonic() + self.stop_timeout
            while True:
                kind, sig = self._next_stop(pid, deadline, "stop")
                if kind == "group-stop":
                    break
                check(
                    lib.gfvm_ptrace_cont(pid, sig if kind == "signal" else 0), f"PTRACE_CONT {pid}"
                )
            at_stop = True
            resume()
            # 2. Run to the exec, delivering signals (SIGCONT first). Continuing from the group
            #    stop only after resume() keeps it stopped until the caller lets it go.
            deadline = time.monotonic() + timeout
            kind, sig = "group-stop", 0
            while kind != "exec":
                check(
                    lib.gfvm_ptrace_cont(pid, sig if kind == "signal" else 0), f"PTRACE_CONT {pid}"
                )
                at_stop = False
                kind, sig = self._next_stop(pid, deadline, "exec")
                at_stop = True
            # 3. The exec-event stop is inside execve(): let it return (the new program's
            #    registers) into the signal path, where injection restores registers exactly.
            check(lib.gfvm_ptrace_interrupt(pid), f"PTRACE_INTERRUPT {pid}")
            check(lib.gfvm_ptrace_cont(pid, 0), f"PTRACE_CONT {pid}")
            at_stop = False
            stop_sig = ffi.new("int *")
            rc = lib.gfvm_ptrace_wait_stop(pid, self._ms(self.stop_timeout), stop_sig)
            if rc == -errno.ESRCH:
                raise ProcessLookupError(errno.ESRCH, f"process {pid} died during its exec")
            check(rc, f"waiting for {pid} after its exec")
            at_stop = True
            ip = ffi.new("uint64_t *")
            check(lib.gfvm_find_syscall_insn(pid, ip), f"finding a syscall instruction in {pid}")
            self._stopped[pid] = {pid: int(stop_sig[0])}
            self._syscall_ip[pid] = int(ip[0])
            return self._with_session(pid, pid, _make_uffd_in(pid))
        finally:
            if pid in self._stopped:
                self._release(pid)  # restores nothing more (the session did), detaches
            elif at_stop:
                lib.gfvm_ptrace_detach(pid)
            else:
                self._give_up_running(pid)

    def _next_stop(self, pid: int, deadline: float, waiting_for: str) -> tuple[str, int]:
        """The next stop of a seized task: ("exec" | "group-stop" | "signal" | "other", signal).
        Raises ProcessLookupError when it exited, TimeoutError at `deadline`."""
        status = ffi.new("int *")
        left = max(0, int((deadline - time.monotonic()) * 1000))
        rc = lib.gfvm_ptrace_wait_status(pid, left, status)
        if rc == -errno.ETIMEDOUT:
            raise TimeoutError(errno.ETIMEDOUT, f"process {pid} did not {waiting_for} in time")
        if rc == -errno.ESRCH:
            raise ProcessLookupError(errno.ESRCH, f"process {pid} is gone")
        check(rc, f"waiting for {pid}")
        st = int(status[0])
        if os.WIFEXITED(st) or os.WIFSIGNALED(st):
            how = (
                f"exit status {os.WEXITSTATUS(st)}"
                if os.WIFEXITED(st)
                else f"killed by signal {os.WTERMSIG(st)}"
            )
            raise ProcessLookupError(errno.ESRCH, f"process {pid} ended ({how}) before it exec'd")
        sig, event = os.WSTOPSIG(st), st >> 16
        if event == lib.PTRACE_EVENT_EXEC:
            return "exec", 0
        if event == lib.PTRACE_EVENT_STOP:
            stopping = sig in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
            return ("group-stop" if stopping else "other"), sig
        if event == 0:
            return "signal", sig
        return "other", sig

    def _give_up_running(self, pid: int) -> None:
        """Releases a seized task that runs: interrupt it and detach it once it stops (now or,
        if it takes longer, before a later job: see _release_late_stoppers)."""
        if lib.gfvm_ptrace_interrupt(pid) < 0:
            return  # gone
        stop_sig = ffi.new("int *")
        rc = lib.gfvm_ptrace_wait_stop(pid, 100, stop_sig)
        if rc == 0:
            lib.gfvm_ptrace_detach(pid)
        elif rc == -errno.ETIMEDOUT:
            self._late.add(pid)

    def inject_madvise(
        self,
        pid: int,
        ranges: Iterable[tuple[int, int]],
        advice: int = MADV_DONTNEED,
        *,
        tid: int | None = None,
    ) -> None:
        """madvise(start, end - start, advice) for every [start, end), all in one stop. Raises
        OSError for the first range that failed (after trying all of them). With uffd
        EVENT_REMOVE, each call waits until the REMOVE event is read: keep the FaultLoop (or
        another reader of the uffd) running."""
        spans = list(ranges)
        results = self.call(
            self._with_session,
            pid,
            tid,
            lambda s: [s.syscall(SYS_madvise, a, e - a, advice) for a, e in spans],
        )
        for (a, e), rc in zip(spans, results):
            check(rc, f"injected madvise({a:#x}, {e - a:#x}, {advice}) in {pid}")

    def inject_close(self, pid: int, fd: int, *, tid: int | None = None) -> None:
        """close(fd) inside `pid`."""
        self.syscall(pid, SYS_close, fd, tid=tid)

    def inject_mmap(
        self,
        pid: int,
        addr: int,
        length: int,
        prot: int,
        flags: int,
        fd: int = -1,
        offset: int = 0,
        *,
        tid: int | None = None,
    ) -> int:
        """mmap inside `pid`; returns the mapping's address."""
        rc = self.inject(pid, [(SYS_mmap, addr, length, prot, flags, fd, offset)], tid=tid)[0]
        return check(rc, f"injected mmap in {pid}")

    def inject_munmap(self, pid: int, addr: int, length: int, *, tid: int | None = None) -> None:
        """munmap inside `pid`."""
        self.syscall(pid, SYS_munmap, addr, length, tid=tid)

    def finish(self, tid: int) -> None:
        """Completes the rollback of an injection that timed out (raises TimeoutError again if
        the injected syscall still blocks)."""

        def run() -> None:
            if tid not in self._open:
                return
            session, pid = self._open[tid]
            rc = lib.gfvm_inject_end(session, self._ms(self.syscall_timeout))
            if rc == -errno.ETIMEDOUT:
                raise TimeoutError(
                    errno.ETIMEDOUT, f"injected syscall in thread {tid} still blocks"
                )
            del self._open[tid]
            if rc == -errno.ESRCH:
                return
            check(rc, f"restoring thread {tid}")
            if pid not in self._stopped:
                lib.gfvm_ptrace_detach(tid)  # its process was released meanwhile

        self.call(run)


def _make_uffd_in(pid: int) -> Callable[[_Session], Userfaultfd]:
    """The injection that creates a uffd in `pid` and copies it out (see inject_userfaultfd)."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK

    def body(s: _Session) -> Userfaultfd:
        remote = check(s.syscall(SYS_userfaultfd, flags), f"injected userfaultfd() in {pid}")
        try:
            # The fd table of the thread that made it (the leader may have exited).
            pidfd = pidfd_open(s.tid, PIDFD_THREAD if s.tid != pid else 0)
            try:
                return Userfaultfd(pidfd_getfd(pidfd, remote))
            finally:
                os.close(pidfd)
        finally:
            check(s.syscall(SYS_close, remote), f"injected close({remote}) in {pid}")

    return body


def evict_pages(
    tracer: Tracer,
    pid: int,
    ranges: Sequence[tuple[int, int]],
    *,
    loop: FaultLoop,
    uffd_id: int,
    uffd: Userfaultfd,
    index: PageIndex,
    rearm_wp: bool = True,
) -> list[tuple[int, int]]:
    """Drops from `pid`'s memory the pages of `ranges` whose current content is in the paging
    file; later faults there are served by `loop`. Returns the [start, end) runs evicted.

    Everything happens while every thread of `pid` is stopped (stopped here unless the tracer
    holds it stopped already), so no write can slip in between the checks and the drop:
      1. a page is kept (not evicted) if `index` has no slot for it, or if it was written since
         it was last protected (scan_written without re-protecting; memory that is not
         WP-tracked always counts as written) -- its newest content is not in the paging file,
         and evicting it would lose data. The caller must not evict pages whose flush (scan,
         store, index update) is still under way: the scan already re-protected them;
      2. the eviction is announced to the loop, so the REMOVE events keep the index entries;
      3. madvise(MADV_DONTNEED) is injected over the remaining runs (one stop for all);
      4. the runs are write-protected again through `uffd` (the WP-tracking uffd): DONTNEED
         drops the markers, and evicted pages would otherwise count as written. Skipped with
         `rearm_wp=False` (a migration's release: /proc/PID/pagemap shows those markers as
         swapped pages, and CRIU would dump them, faulting every one back in).
    The loop must be running (each madvise waits until its REMOVE event is read). Blocks for the
    injection (~150 us per madvise) plus a scan of the ranges.
    """
    held = bool(tracer.stopped_threads(pid))
    if not held:
        tracer.stop_process(pid)
    try:
        runs = _evictable_runs(pid, ranges, index)
        if not runs:
            return []
        loop.expect_eviction(uffd_id, runs)
        try:
            tracer.inject_madvise(pid, runs, MADV_DONTNEED)
        finally:
            loop.expect_eviction(uffd_id, [])
        if rearm_wp:
            for start, end in runs:
                uffd.writeprotect(start, end - start)
        return runs
    finally:
        if not held:
            tracer.resume_process(pid)


def _evictable_runs(
    pid: int, ranges: Sequence[tuple[int, int]], index: PageIndex
) -> list[tuple[int, int]]:
    """The parts of `ranges` that are in `index` and not written since last protected."""
    dirty: set[int] = set()
    pm = open_pagemap(pid)
    try:
        for start, end in ranges:
            dirty.update(scan_written(pm, start, end, reprotect=False, check_wpasync=False).pages())
    finally:
        os.close(pm)
    runs: list[tuple[int, int]] = []
    for start, end in ranges:
        _check_page_aligned(start, "eviction start")
        addrs, _ = index.export(start, end)
        for a in addrs:
            if a in dirty:
                continue
            if runs and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], a + PAGE_SIZE)
            else:
                runs.append((a, a + PAGE_SIZE))
    return runs


def _is_zombie(pid: int, tid: int) -> bool:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True


class _Session:
    """One injection session on a stopped thread; lives on the tracer thread."""

    def __init__(self, tracer: Tracer, pid: int, tid: int, syscall_ip: int):
        self._tracer = tracer
        self.pid = pid
        self.tid = tid
        self._s = ffi.gc(lib.gfvm_inject_new(), lib.gfvm_inject_free)
        check(lib.gfvm_inject_begin(self._s, tid, syscall_ip), f"starting injection in {tid}")
        self._args = ffi.new("uint64_t[6]")
        self._result = ffi.new("int64_t *")

    def syscall(self, nr: int, *args: int) -> int:
        if len(args) > 6:
            raise ValueError("a syscall takes at most 6 arguments")
        for i in range(6):
            self._args[i] = (args[i] if i < len(args) else 0) & (2**64 - 1)
        rc = lib.gfvm_inject_syscall(
            self._s, nr, self._args, self._result, self._tracer._ms(self._tracer.syscall_timeout)
        )
        if rc == -errno.ETIMEDOUT:
            raise TimeoutError(
                errno.ETIMEDOUT,
                f"injected syscall {nr} in thread {self.tid} did not "
                f"return within {self._tracer.syscall_timeout} s",
            )
        check(rc, f"injecting syscall {nr} into thread {self.tid}")
        return int(self._result[0])

    def end(self) -> None:
        rc = lib.gfvm_inject_end(self._s, self._tracer._ms(self._tracer.syscall_timeout))
        if rc == -errno.ETIMEDOUT:
            # Keep the session: the thread is inside our syscall with foreign registers.
            self._tracer._open[self.tid] = (self._s, self.pid)
            raise TimeoutError(
                errno.ETIMEDOUT,
                f"thread {self.tid}: injected syscall still blocks; "
                "its registers are restored by Tracer.finish()",
            )
        if rc != -errno.ESRCH:
            check(rc, f"restoring thread {self.tid} after injection")
