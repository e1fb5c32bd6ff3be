"""The same-node API of the File Manager: what the pager and the migration code call.

It is the same implementation as the FUSE filesystem (both call `FileManager`), without the
kernel round trip. Paths are relative to the root of /gfvm ("procs/7/pages"; a leading "/" is
accepted).

Which calls are what:
- `async` methods run on gfvmd's trio thread (they block only their task): open/create, write,
  write_pages, read, fsync, truncate, promote, remove, makedirs, wait_in_sync.
- plain methods never block and must also be called on the trio thread: where, in_sync_nodes,
  FmFile.size, FmFile.local_fd, FmFile.local_reader, FmFile.is_master.
- `LocalReader.read` and file descriptors returned by `local_fd` are for other threads (the
  native fault loop): they block on disk I/O and are thread-safe.

Guarantees (RELIABILITY.md): `write`/`write_pages` return once the master and every in-sync
replica applied the data; `fsync` once it is durable on all of them; reads never return data
older than an acknowledged write, and raise Unavailable (EIO) rather than return zeros or
ENOENT when no up-to-date copy is reachable.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from gfvm.errors import NotFound, Unavailable, UsageError
from gfvm.fm.core import FileManager
from gfvm.fm.meta import MetaError, ROOT
from gfvm.fm.store import LocalFile


class LocalReader:
    """Verified reads of this node's local copy, safe from any thread (see `FmFile.local_reader`).

    Valid while this node is the file's master (the pager's case). Each read checks the page
    sums and raises CorruptData instead of returning a damaged page."""

    #: read_page(slot) -> bytes: page `slot` (4096 bytes; zeros past the end), verified. Blocks
    #: on disk I/O. It is LocalFile.read_page itself: one Python call less per page, which is
    #: a tenth of a verified read's cost.
    read_page: Callable[[int], bytes]

    def __init__(self, lf: LocalFile, release) -> None:
        self._lf = lf
        self._release = release
        self.fid = lf.fid
        self.read_page = lf.read_page

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` from the local copy. Blocks on disk I/O."""
        return self._lf.read(offset, length)

    def read_pages(self, slots: Sequence[int], out: bytearray | memoryview | None = None
                   ) -> bytearray | memoryview:
        """Pages `slots` (any order), verified, one after the other into `out` (or a new
        bytearray); zeros past the end. One native call for the batch: as fast per page as a
        plain pread. Blocks on disk I/O. See LocalFile.read_pages."""
        return self._lf.read_pages(slots, out)

    def close(self) -> None:
        if self._release is not None:
            self._release(self._lf)
            self._release = None


class FmFile:
    """An open file of /gfvm (see the module header for which calls block)."""

    def __init__(self, files: "Files", ino: int, path: str) -> None:
        self._files = files
        self._fm = files.fm
        self.ino = ino
        self.path = path

    def __repr__(self) -> str:
        return f"<FmFile {self.path} (fid {self.ino})>"

    async def write(self, offset: int, data: bytes | memoryview) -> int:
        """Writes `data` at `offset` (any size: 1 MiB pieces, up to 8 of them in flight at once).
        Returns len(data) once every piece is applied by the master and every in-sync replica."""
        return await self._fm.write(self.ino, offset, data)

    async def write_pages(self, offsets: list[int], data: bytes | memoryview) -> None:
        """Writes whole pages: page i of `data` (4096 bytes each) at byte offset offsets[i]
        (page-aligned). One call may carry any number of pages; they travel 256 per frame, up to
        8 frames in flight at once (one at a time if an offset repeats). Returns once all of
        them are applied by the master and every in-sync replica."""
        await self._fm.write_pages(self.ino, list(offsets), data)

    async def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` (short only at end of file), from the local copy when
        it is up to date, else from the master."""
        out = []
        while length > 0:
            piece = await self._fm.read(self.ino, offset, min(length, 1 << 20))
            if not piece:
                break
            out.append(piece)
            offset += len(piece)
            length -= len(piece)
        return b"".join(out)

    async def fsync(self) -> None:
        """Returns when everything written before is durable on the master and every in-sync
        replica."""
        await self._fm.fsync(self.ino)

    async def truncate(self, size: int) -> None:
        await self._fm.truncate(self.ino, size)

    async def size(self) -> int:
        size, _ = await self._fm.getattr_file(self._fm.file_entry(self.ino))
        return size

    def is_master(self) -> bool:
        """This node is the file's master (never blocks)."""
        return self._fm.file_entry(self.ino).master == self._fm.node

    def local_path(self) -> Path:
        """The data file of this node's copy (read it only through local_fd / local_reader)."""
        self._require_local()
        return self._fm.store.path_of(self.ino) / "data"

    def local_fd(self) -> int:
        """A new read-only file descriptor of this node's local copy (the caller closes it).

        For the native fault path: pread(fd, 4096, slot*4096). The bytes are those of the copy
        as written by this node's File Manager; checksums are not verified on this path (use
        `local_reader` for verified reads, or `verify_page`). Raises Unavailable unless this node
        is the master or holds a confirmed in-sync copy. Never blocks."""
        self._require_local()
        return os.open(self._fm.store.path_of(self.ino) / "data", os.O_RDONLY | os.O_CLOEXEC)

    async def local_reader(self) -> LocalReader:
        """A thread-safe verified reader of this node's copy (see LocalReader); close() it."""
        self._require_local()
        lf = await self._fm.io(self._fm.store.open, self.ino)
        return LocalReader(lf, self._fm.store.release)

    def _require_local(self) -> None:
        fm = self._fm
        e = fm.file_entry(self.ino)
        fs = fm.files.get(self.ino)
        if e.master == fm.node or fm.can_read_locally(e, fs):
            return
        raise Unavailable(f"{self.path}: {fm.node} holds no up-to-date copy "
                          f"(master {e.master}, in sync: {', '.join(e.in_sync())})")

    async def aclose(self) -> None:
        pass


class Files:
    """Entry point of the same-node API; the daemon's File Manager component exposes one."""

    def __init__(self, fm: FileManager) -> None:
        self.fm = fm

    async def _resolve(self, path: str):
        try:
            return await self.fm.resolve(path)
        except MetaError as exc:
            if exc.errno == errno.ENOENT:
                raise NotFound(f"/gfvm/{str(path).lstrip('/')} does not exist") from None
            raise

    async def open(self, path: str, *, create: bool = False, mode: int = 0o600,
                   replicas: int | None = None, exclusive: bool = False) -> FmFile:
        """Opens file `path`; with `create`, creates it first if missing (this node becomes its
        master; `replicas` overrides R). Parent directories must exist (see makedirs)."""
        path = str(path).strip("/")
        try:
            e = await self._resolve(path)
            if exclusive:
                raise UsageError(f"/gfvm/{path} already exists")
        except NotFound:
            if not create:
                raise
            parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
            pe = await self._resolve(parent)
            try:
                e = await self.fm.create(pe.ino, name, mode, replicas=replicas)
            except MetaError as exc:
                if exc.errno != errno.EEXIST or exclusive:
                    raise
                e = await self._resolve(path)
        if e.is_dir:
            raise UsageError(f"/gfvm/{path} is a directory")
        return FmFile(self, e.ino, path)

    async def makedirs(self, path: str, *, mode: int = 0o700, replicas: int | None = None) -> None:
        """Creates directory `path` and its missing parents (like mkdir -p). With `replicas`,
        files created below it get that R."""
        cur = self.fm.state.entries[ROOT]
        for part in [p for p in str(path).split("/") if p]:
            try:
                cur = await self.fm.lookup(cur.ino, part)
            except MetaError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                try:
                    cur = await self.fm.mkdir(cur.ino, part, mode)
                except MetaError as exc2:
                    if exc2.errno != errno.EEXIST:
                        raise
                    cur = await self.fm.lookup(cur.ino, part)
            if not cur.is_dir:
                raise UsageError(f"{part} in {path} is not a directory")
        if replicas is not None:
            await self.fm.set_replicas(cur.ino, replicas)

    async def remove(self, path: str) -> None:
        """Removes a file or an empty directory."""
        path = str(path).strip("/")
        e = await self._resolve(path)
        parent = self.fm.entry(e.parent)
        if e.is_dir:
            await self.fm.rmdir(parent.ino, e.name)
        else:
            await self.fm.unlink(parent.ino, e.name)

    async def rename(self, old: str, new: str) -> None:
        e = await self._resolve(old)
        new = str(new).strip("/")
        parent, name = new.rsplit("/", 1) if "/" in new else ("", new)
        pe = await self._resolve(parent)
        await self.fm.rename(e.parent, e.name, pe.ino, name)

    async def listdir(self, path: str) -> list[str]:
        e = await self._resolve(path)
        return [c.name for c in self.fm.state.listdir(e.ino)]

    async def promote(self, path: str, node: str, *, force: bool = False) -> dict:
        """Makes `node` the master of `path` (epoch + 1 by a majority; see FileManager.promote).
        Returns the new placement (as `where`)."""
        e = await self._resolve(path)
        await self.fm.promote(e.ino, node, force=force)
        return self.fm.where(e.ino)

    async def where(self, path: str) -> dict:
        """Master, members with states, epoch, generation of `path` (as `gfvm fm where --json`)."""
        e = await self._resolve(path)
        return self.fm.where(e.ino)

    async def in_sync_nodes(self, paths: list[str]) -> list[str]:
        """The alive nodes that hold an in-sync copy of every file in `paths` (migration targets)."""
        inos = [(await self._resolve(p)).ino for p in paths]
        return self.fm.in_sync_nodes(inos)

    async def wait_in_sync(self, path: str, node: str) -> None:
        """Waits until `node` holds an in-sync copy of `path` (wrap in trio.fail_after)."""
        e = await self._resolve(path)
        while node not in self.fm.file_entry(e.ino).in_sync():
            await self.fm.consensus.wait_changed()
