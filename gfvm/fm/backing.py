"""The pager's `PagingBacking` (gfvm.pager.backing) over the File Manager: paging files in /gfvm.

The pager calls its backing from worker threads (every method blocks); the File Manager lives on
gfvmd's trio thread. Each method here hops onto the trio thread with `trio.from_thread.run` and
runs the same-node API (gfvm.fm.api), so the promises are the File Manager's: a write returns
once the master and every in-sync replica applied it, `fsync` once it is durable on all of them,
`replace` is atomic (new content written and fsynced under a temporary name, then renamed over
the old one: one metadata op) and durable.

Use from a thread of gfvmd only (never from the trio thread: that would deadlock):

    backing = daemon.fm.backing            # FmBacking
    f = backing.open("procs/7/pages", create=True)
    f.write_pages(offsets, memoryview(buf)); f.fsync()
    fd = f.local_read_fd()                 # for pread(fd, 4096, slot * 4096) in the fault loop
"""

from __future__ import annotations

import errno
import secrets
from collections.abc import Sequence

import trio

from gfvm.errors import NotFound
from gfvm.fm.api import FmFile, Files
from gfvm.fm.meta import MetaError


def _not_found(exc: Exception, rel: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, f"/gfvm/{rel}: {exc}")


class FmBackingFile:
    """A BackingFile (gfvm.pager.backing) of /gfvm. Blocking; one writer at a time."""

    def __init__(self, backing: "FmBacking", f: FmFile) -> None:
        self._b = backing
        self._f = f
        self._fd: int | None = None

    def write_pages(self, offsets: Sequence[int], data: memoryview) -> None:
        self._b._run(self._f.write_pages, list(offsets), data.toreadonly() if not data.readonly else data)

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        self._b._run(self._f.write, offset, data)

    def pread(self, length: int, offset: int) -> bytes:
        return self._b._run(self._f.read, offset, length)

    def fsync(self) -> None:
        self._b._run(self._f.fsync)

    def size(self) -> int:
        return self._b._run(self._f.size)

    def truncate(self, size: int) -> None:
        self._b._run(self._f.truncate, size)

    def local_read_fd(self) -> int:
        """A read-only fd of this node's copy, owned by this object (see FmFile.local_fd)."""
        if self._fd is None:
            self._fd = self._b._run_sync(self._f.local_fd)
        return self._fd

    def close(self) -> None:
        import os

        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class FmBacking:
    """PagingBacking over /gfvm (see the module header)."""

    def __init__(self, files: Files, token: trio.lowlevel.TrioToken) -> None:
        self.files = files
        self.token = token

    def _run(self, fn, *args):
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    def _run_sync(self, fn, *args):
        return trio.from_thread.run_sync(fn, *args, trio_token=self.token)

    def open(self, rel: str, *, create: bool = False) -> FmBackingFile:
        try:
            f = self._run(lambda: self.files.open(rel, create=create))
        except NotFound as exc:
            raise _not_found(exc, rel) from None
        return FmBackingFile(self, f)

    def read_file(self, rel: str) -> bytes:
        async def read():
            f = await self.files.open(rel)
            return await f.read(0, await f.size())

        try:
            return self._run(read)
        except NotFound as exc:
            raise _not_found(exc, rel) from None

    def replace(self, rel: str, data: bytes) -> None:
        rel = rel.strip("/")
        parent, name = rel.rsplit("/", 1) if "/" in rel else ("", rel)
        tmp = f"{parent}/.{name}.{secrets.token_hex(4)}.tmp" if parent else f".{name}.{secrets.token_hex(4)}.tmp"

        async def replace():
            f = await self.files.open(tmp, create=True, exclusive=True)
            try:
                await f.write(0, data)
                await f.fsync()
                await self.files.rename(tmp, rel)
            except BaseException:
                try:
                    await self.files.remove(tmp)
                except (NotFound, MetaError):
                    pass
                raise

        self._run(replace)

    def exists(self, rel: str) -> bool:
        async def exists():
            try:
                await self.files.fm.resolve(rel)
                return True
            except MetaError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                    return False
                raise

        return self._run(exists)

    def makedirs(self, rel: str) -> None:
        self._run(self.files.makedirs, rel)

    def remove_tree(self, rel: str) -> None:
        async def remove(path: str):
            try:
                e = await self.files.fm.resolve(path)
            except MetaError as exc:
                if exc.errno == errno.ENOENT:
                    return
                raise
            if e.is_dir:
                for child in list(self.files.fm.state.listdir(e.ino)):
                    await remove(f"{path.rstrip('/')}/{child.name}")
            await self.files.remove(path)

        self._run(remove, rel)
