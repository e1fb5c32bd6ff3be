"""Where a paging file's bytes live: the small interface the pager writes through.

The pager never touches paging files with plain file calls; it goes through a `PagingBacking`
(a directory tree of files, addressed by relative paths such as "procs/<id>/pages") and the
`BackingFile`s it opens. The File Manager implements the same interface for /gfvm (master +
replicas); `LocalBacking` below is a plain-directory implementation used until then and by tests.

Promises every implementation keeps (the paging file's crash safety is built on them):
  - `BackingFile.fsync()` returns only when every byte written to that file before the call is
    durable on the master and on every in-sync replica.
  - `PagingBacking.replace(rel, data)` installs the whole new content atomically (a reader sees the
    old or the new file, never a mix) and durably before it returns.
  - `BackingFile.local_read_fd()` is a read-only descriptor of the node-local copy of the file
    (master or replica), usable with pread by the native fault loop without the GIL. It stays valid
    until the BackingFile is closed and sees every write made through this BackingFile.
Every method blocks (disk or network I/O): call them from worker threads, never from trio.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

PAGE_SIZE = 4096
IOV_MAX = 1024  # Linux's limit on iovecs per pwritev


class BackingFile(Protocol):
    """One open file of a backing. Not thread-safe: one writer at a time."""

    def write_pages(self, offsets: Sequence[int], data: memoryview) -> None:
        """Writes page i of `data` (len(offsets) pages of PAGE_SIZE bytes) at offsets[i]. Blocks."""

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        """Writes all of `data` at `offset`. Blocks."""

    def pread(self, length: int, offset: int) -> bytes:
        """Reads up to `length` bytes at `offset` (short at end of file). Blocks."""

    def fsync(self) -> None:
        """Makes every earlier write durable on master and replicas. Blocks."""

    def size(self) -> int:
        """Current length of the file in bytes. Blocks."""

    def truncate(self, size: int) -> None:
        """Cuts or extends the file to `size` bytes (durable after the next fsync). Blocks."""

    def local_read_fd(self) -> int:
        """A read-only fd of the node-local copy (owned by this object; do not close). Blocks."""

    def close(self) -> None:
        """Releases the file (and its local_read_fd). Blocks."""


class PagingBacking(Protocol):
    """A tree of files addressed by relative paths ("procs/<id>/index")."""

    def open(self, rel: str, *, create: bool = False) -> BackingFile:
        """Opens `rel` read-write (creating it empty when `create`); FileNotFoundError otherwise."""

    def read_file(self, rel: str) -> bytes:
        """The whole content of a small file (meta.json, index). Blocks."""

    def replace(self, rel: str, data: bytes) -> None:
        """Atomically and durably replaces (or creates) `rel` with `data`. Blocks."""

    def exists(self, rel: str) -> bool:
        """Whether `rel` exists. Blocks."""

    def makedirs(self, rel: str) -> None:
        """Creates directory `rel` and its parents (durably). Blocks."""

    def remove_tree(self, rel: str) -> None:
        """Deletes directory `rel` and everything under it; no error if absent. Blocks."""


def _check_rel(rel: str) -> str:
    """Refuses absolute paths and `..` so a backing never writes outside its root."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts or "\0" in rel:
        raise ValueError(f"bad backing path {rel!r}")
    return rel


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalFile:
    """A BackingFile over one local file (durable = fsync of this node's disk)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._ro_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def write_pages(self, offsets: Sequence[int], data: memoryview) -> None:
        if len(data) != len(offsets) * PAGE_SIZE:
            raise ValueError("write_pages: data is not len(offsets) pages")
        data = memoryview(data)
        n = len(offsets)
        first = offsets[0] if n else 0
        if (
            n
            and first % PAGE_SIZE == 0
            and offsets[-1] == first + (n - 1) * PAGE_SIZE
            and list(offsets) == list(range(first, first + n * PAGE_SIZE, PAGE_SIZE))
        ):
            # The usual case (fresh slots are allocated in order): no per-page Python work.
            for i in range(0, n, IOV_MAX):
                self._pwritev_all(data, [(i, min(IOV_MAX, n - i))], first + i * PAGE_SIZE)
            return
        # One pwritev per run of consecutive file offsets, one iovec per stretch of pages that
        # are consecutive in `data` too.
        order = sorted(range(n), key=offsets.__getitem__)
        iov: list[tuple[int, int]] = []  # (first page in data, pages)
        run_start = run_next = -1
        for i in order:
            off = offsets[i]
            if off % PAGE_SIZE:
                raise ValueError(f"write_pages: offset {off} is not page-aligned")
            if iov and off == run_next and i == iov[-1][0] + iov[-1][1]:
                iov[-1] = (iov[-1][0], iov[-1][1] + 1)
            else:
                if iov and (off != run_next or len(iov) == IOV_MAX):
                    self._pwritev_all(data, iov, run_start)
                    iov = []
                if not iov:
                    run_start = off
                iov.append((i, 1))
            run_next = off + PAGE_SIZE
        if iov:
            self._pwritev_all(data, iov, run_start)

    def _pwritev_all(self, data: memoryview, iov: list[tuple[int, int]], offset: int) -> None:
        """Writes the stretches (first page, pages) of `data` one after the other at `offset`."""
        bufs = [data[i * PAGE_SIZE : (i + n) * PAGE_SIZE] for i, n in iov]
        total = PAGE_SIZE * sum(n for _, n in iov)
        done = os.pwritev(self._fd, bufs, offset)
        if done != total:  # short write (rare): finish with plain pwrite
            joined = b"".join(bufs)
            while done < total:
                done += os.pwrite(self._fd, joined[done:], offset + done)

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def fsync(self) -> None:
        os.fsync(self._fd)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def local_read_fd(self) -> int:
        return self._ro_fd

    def close(self) -> None:
        for fd in (self._fd, self._ro_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._ro_fd = -1


class LocalBacking:
    """PagingBacking over a local directory (no replication: R=1)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        """The local path of `rel` (for logs and tests)."""
        return self.root / _check_rel(rel)

    def open(self, rel: str, *, create: bool = False) -> LocalFile:
        path = self.path(rel)
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        if create:
            _fsync_dir(path.parent)  # the new name itself must survive a crash
        return LocalFile(path, fd)

    def read_file(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def replace(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def makedirs(self, rel: str) -> None:
        path = self.path(rel)
        missing = [p for p in [path, *path.parents] if not p.exists()]
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for p in missing:
            _fsync_dir(p.parent)

    def remove_tree(self, rel: str) -> None:
        path = self.path(rel)
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        _fsync_dir(path.parent)
