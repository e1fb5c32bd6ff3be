"""The pager's `PagingBacking` on the File Manager: paging files live in /gfvm, master + replicas.

The File Manager's same-node API (gfvm/fm/api.py) is async and runs on gfvmd's trio thread; the
pager calls its backing from worker threads (tree workers, its write pool, trio.to_thread). Each
method here therefore hops onto the trio thread with `trio.from_thread.run` and blocks the calling
thread until the FM answers. Never call these from the trio thread itself (that would deadlock):
the pager never does, it runs every backing call in a thread.

The promises of gfvm/pager/backing.py hold because the FM keeps them:
  - `fsync` is FmFile.fsync: durable on the master and every in-sync replica;
  - `replace` writes a temporary file, fsyncs it and renames it over the old one (one metadata
    op, atomic on every node);
  - `local_read_fd` is a read-only fd of this node's own copy (the FM refuses when this node is
    neither the master nor a confirmed in-sync replica). The FM writes that copy in place, so the
    fd sees every write acknowledged through this BackingFile.
Page data is copied before it is handed to the FM: the caller may reuse its buffer at once.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

import trio

from gfvm.errors import NotFound
from gfvm.fm.meta import MetaError

PAGE_SIZE = 4096


class FmFileBacking:
    """One open FM file as a BackingFile. One writer at a time (the pager's promise)."""

    def __init__(self, backing: FmBacking, fmfile) -> None:
        self._backing = backing
        self._file = fmfile
        self._ro_fd = -1

    def _run(self, fn, *args):
        return self._backing._run(fn, *args)

    def write_pages(self, offsets: Sequence[int], data: memoryview) -> None:
        if len(data) != len(offsets) * PAGE_SIZE:
            raise ValueError("write_pages: data is not len(offsets) pages")
        self._run(self._file.write_pages, list(offsets), bytes(data))

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        self._run(self._file.write, offset, bytes(data))

    def pread(self, length: int, offset: int) -> bytes:
        return self._run(self._file.read, offset, length)

    def fsync(self) -> None:
        self._run(self._file.fsync)

    def size(self) -> int:
        return self._run(self._file.size)

    def truncate(self, size: int) -> None:
        self._run(self._file.truncate, size)

    def local_read_fd(self) -> int:
        if self._ro_fd < 0:
            self._ro_fd = self._backing._run_sync(self._file.local_fd)
        return self._ro_fd

    def close(self) -> None:
        if self._ro_fd >= 0:
            os.close(self._ro_fd)
            self._ro_fd = -1


class FmBacking:
    """PagingBacking over the File Manager's same-node API (`files`: gfvm.fm.api.Files).

    `trio_token` is gfvmd's trio token (trio.lowlevel.current_trio_token() on the trio thread):
    the pager's own threads are not trio worker threads, so from_thread needs it explicitly."""

    def __init__(self, files, trio_token: trio.lowlevel.TrioToken, root: str = "") -> None:
        self.files = files
        self.token = trio_token
        self.root = root.strip("/")

    def _path(self, rel: str) -> str:
        rel = rel.strip("/")
        if not rel or ".." in rel.split("/") or "\0" in rel:
            raise ValueError(f"bad backing path {rel!r}")
        return f"{self.root}/{rel}" if self.root else rel

    def _run(self, fn, *args):
        return trio.from_thread.run(fn, *args, trio_token=self.token)

    def _run_sync(self, fn, *args):
        return trio.from_thread.run_sync(fn, *args, trio_token=self.token)

    def path(self, rel: str) -> str:
        """Where `rel` shows up on this node (for logs and `gfvm status`)."""
        return f"/gfvm/{self._path(rel)}"

    def open(self, rel: str, *, create: bool = False) -> FmFileBacking:
        path = self._path(rel)
        try:
            f = self._run(lambda: self.files.open(path, create=create))
        except NotFound:
            raise FileNotFoundError(f"/gfvm/{path} does not exist") from None
        return FmFileBacking(self, f)

    def read_file(self, rel: str) -> bytes:
        path = self._path(rel)

        async def read() -> bytes:
            f = await self.files.open(path)
            return await f.read(0, await f.size())

        try:
            return self._run(read)
        except NotFound:
            raise FileNotFoundError(f"/gfvm/{path} does not exist") from None

    def replace(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        parent, _, name = path.rpartition("/")
        tmp = f"{parent}/.{name}.tmp" if parent else f".{name}.tmp"

        async def replace() -> None:
            f = await self.files.open(tmp, create=True)
            await f.truncate(0)
            if data:
                await f.write(0, bytes(data))
            await f.fsync()
            await self.files.rename(tmp, path)

        self._run(replace)

    def exists(self, rel: str) -> bool:
        path = self._path(rel)

        async def exists() -> bool:
            try:
                await self.files.where(path)
                return True
            except NotFound:
                return False
            except MetaError as exc:  # a directory: where() refuses it, but it exists
                if exc.errno == errno.EISDIR:
                    return True
                raise

        return self._run(exists)

    def makedirs(self, rel: str) -> None:
        self._run(self.files.makedirs, self._path(rel))

    def remove_tree(self, rel: str) -> None:
        path = self._path(rel)

        async def remove(p: str) -> None:
            try:
                names = await self.files.listdir(p)
            except NotFound:
                return
            except MetaError as exc:
                if exc.errno == errno.ENOTDIR:  # a file
                    await self.files.remove(p)
                    return
                raise
            for name in names:
                await remove(f"{p}/{name}")
            try:
                await self.files.remove(p)
            except NotFound:
                pass

        self._run(remove, path)
