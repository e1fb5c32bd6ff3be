"""/gfvm as a pyfuse3 filesystem: a thin `Operations` over FileManager.

Rules of this layer:
- Handlers only translate: kernel arguments -> FileManager calls -> pyfuse3 attributes.
  Every handler goes through `_fuse_errors`, the one place where domain errors become errnos
  (MetaError/GfvmError/OSError carry theirs; Unavailable and anything stale become EIO, never
  ENOENT; an unexpected exception is logged and becomes EIO, so the main loop survives).
- Root-only: mounted without allow_other, so only root reaches it; files are 0600 at most.
- No writeback cache, on purpose: in writeback mode the kernel owns i_size and mtime of every
  regular file it has an inode for (fs/fuse: fuse_get_cache_mask), so a size changed by another
  node is never seen while the inode stays cached (a test caught exactly that). Without it,
  write(2) reaches the daemon synchronously, which is also what promise 1 says of a plain
  write. The kernel still caches reads: a node that holds an up-to-date copy (master or
  confirmed in-sync member) opens with keep_cache, and the File Manager invalidates the
  kernel's pages whenever the copy changes other than through this kernel (replication, a
  forwarded or same-node-API write) before acknowledging that change. Any other node opens
  with direct_io, so its kernel never caches data it would not be told about.
- Blocking work never runs here: FileManager does file I/O in worker threads.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import subprocess
from pathlib import Path

import pyfuse3
import trio

from gfvm.errors import GfvmError, Unavailable
from gfvm.fm.core import FileManager
from gfvm.fm.meta import ROOT, Entry, MetaError, decode_name
from gfvm.fm.store import LocalFile, MissingCopy

log = logging.getLogger(__name__)

ENTRY_TIMEOUT = 1.0
REPLICAS_XATTR = b"user.gfvm.replicas"
ATTR_TIMEOUT = 1.0


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, Unavailable):
        return errno.EIO
    err = getattr(exc, "errno", None)
    if not err or err in (errno.ESTALE, errno.EAGAIN, errno.EPROTO):
        return errno.EIO  # retried below us until io_timeout: what is left is "unavailable"
    return err


def _fuse_errors(fn):
    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except (GfvmError, OSError) as exc:
            err = _errno_of(exc)
            if err == errno.EIO:
                log.warning("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(err) from None
        except Exception:  # noqa: BLE001 - one bad request must not end the filesystem
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class _Handle:
    __slots__ = ("ino", "lf", "direct")

    def __init__(self, ino: int, lf: LocalFile | None, direct: bool) -> None:
        self.ino = ino
        self.lf = lf  # our copy while the file is open here (reads after unlink)
        self.direct = direct


class FmOperations(pyfuse3.Operations):
    enable_writeback_cache = False
    supports_dot_lookup = True

    def __init__(self, fm: FileManager) -> None:
        super().__init__()
        self.fm = fm
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1

    # -- attributes --

    async def _attrs(self, e: Entry) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = e.ino
        a.generation = 0
        a.st_uid = 0
        a.st_gid = 0
        a.st_blksize = 4096
        a.entry_timeout = ENTRY_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        if e.is_dir:
            a.st_mode = stat.S_IFDIR | e.mode
            a.st_nlink = 2
            a.st_size = 0
            mtime = e.mtime_ns
        else:
            a.st_mode = stat.S_IFREG | (e.mode & 0o700)
            a.st_nlink = 1
            a.st_size, mtime = await self.fm.getattr_file(e)
            if not self._cacheable(e):
                a.attr_timeout = 0
        a.st_blocks = (a.st_size + 511) // 512
        a.st_mtime_ns = mtime
        a.st_ctime_ns = e.ctime_ns
        a.st_atime_ns = mtime
        return a

    def _cacheable(self, e: Entry) -> bool:
        fm = self.fm
        return e.master == fm.node or fm.can_read_locally(e, fm.files.get(e.ino))

    # -- namespace --

    @_fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        if name == b".":
            return await self._attrs(self.fm.entry(parent_inode))
        if name == b"..":
            return await self._attrs(self.fm.entry(self.fm.entry(parent_inode).parent))
        e = await self.fm.lookup(parent_inode, decode_name(name))
        return await self._attrs(e)

    @_fuse_errors
    async def getattr(self, inode, ctx=None):
        if inode not in self.fm.state.entries:
            orphan = self._orphan_attrs(inode)
            if orphan is not None:
                return orphan
        return await self._attrs(self.fm.entry(inode))

    def _orphan_attrs(self, inode: int) -> pyfuse3.EntryAttributes | None:
        """Attributes of a file unlinked while open here (from our copy), else None."""
        for h in self._handles.values():
            if h.ino == inode and h.lf is not None:
                a = pyfuse3.EntryAttributes()
                a.st_ino = inode
                a.st_mode = stat.S_IFREG | 0o600
                a.st_nlink = 0
                a.st_uid = a.st_gid = 0
                a.st_size = h.lf.size
                a.st_blksize = 4096
                a.st_blocks = (h.lf.size + 511) // 512
                a.attr_timeout = 0
                return a
        return None

    @_fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        e = self.fm.entry(inode)
        if fields.update_uid and attr.st_uid != 0 or fields.update_gid and attr.st_gid != 0:
            raise pyfuse3.FUSEError(errno.EPERM)  # everything in /gfvm belongs to root
        if fields.update_size:
            if e.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            await self.fm.truncate(inode, attr.st_size, from_kernel=True)
            await self._note_cached(inode)
        if fields.update_mode:
            await self.fm.chmod(inode, stat.S_IMODE(attr.st_mode))
        if fields.update_mtime:
            await self.fm.utime(inode, attr.st_mtime_ns)
        return await self._attrs(self.fm.entry(inode))

    @_fuse_errors
    async def opendir(self, inode, ctx):
        if not self.fm.entry(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_fuse_errors
    async def readdir(self, fh, start_id, token):
        for e in self.fm.state.listdir(fh):
            if e.ino <= start_id:
                continue
            try:
                attrs = await self._attrs(e)
            except (GfvmError, OSError):
                attrs = pyfuse3.EntryAttributes()
                attrs.st_ino = e.ino
                attrs.st_mode = (stat.S_IFDIR if e.is_dir else stat.S_IFREG) | e.mode
            if not pyfuse3.readdir_reply(token, e.name.encode(), attrs, e.ino):
                break

    async def releasedir(self, fh):
        pass

    @_fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        e = await self.fm.mkdir(parent_inode, decode_name(name), stat.S_IMODE(mode))
        return await self._attrs(e)

    @_fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        await self.fm.rmdir(parent_inode, decode_name(name))

    @_fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        await self.fm.unlink(parent_inode, decode_name(name))

    @_fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_EXCHANGE is not supported
        await self.fm.rename(parent_inode_old, decode_name(name_old), parent_inode_new,
                             decode_name(name_new), noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE))

    @_fuse_errors
    async def statfs(self, ctx):
        st = await self.fm.io(os.statvfs, self.fm.paths.state)
        s = pyfuse3.StatvfsData()
        s.f_bsize = st.f_bsize
        s.f_frsize = st.f_frsize
        s.f_blocks = st.f_blocks
        s.f_bfree = st.f_bfree
        s.f_bavail = st.f_bavail
        s.f_files = max(st.f_files, len(self.fm.state.entries))
        s.f_ffree = st.f_ffree
        s.f_favail = st.f_favail
        s.f_namemax = 255
        return s

    # -- extended attributes: user.gfvm.replicas on a directory sets R for new files below --

    @_fuse_errors
    async def setxattr(self, inode, name, value, ctx):
        if name != REPLICAS_XATTR:
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        if not self.fm.entry(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        try:
            r = int(value.decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        await self.fm.set_replicas(inode, r)

    @_fuse_errors
    async def getxattr(self, inode, name, ctx):
        e = self.fm.entry(inode)
        if name != REPLICAS_XATTR or e.replicas is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return str(e.replicas).encode()

    @_fuse_errors
    async def listxattr(self, inode, ctx):
        return [REPLICAS_XATTR] if self.fm.entry(inode).replicas is not None else []

    @_fuse_errors
    async def removexattr(self, inode, name, ctx):
        e = self.fm.entry(inode)
        if name != REPLICAS_XATTR or not e.is_dir or e.replicas is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        await self.fm.set_replicas(inode, None)

    # -- files --

    async def _open_handle(self, e: Entry, flags: int) -> pyfuse3.FileInfo:
        fm = self.fm
        local = self._cacheable(e)
        direct = not local or bool(flags & os.O_DIRECT)
        lf = None
        if e.members.get(fm.node) is not None:
            try:
                lf = await fm.io(fm.store.open, e.ino)  # kept for reads after an unlink
            except MissingCopy:
                lf = None
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(e.ino, lf, direct)
        if not direct:
            fm.runtime(e.ino).kernel_cached = True
        return pyfuse3.FileInfo(fh=fh, direct_io=direct, keep_cache=not direct)

    async def _note_cached(self, ino: int) -> None:
        fs = self.fm.files.get(ino)
        if fs is not None and any(h.ino == ino and not h.direct for h in self._handles.values()):
            fs.kernel_cached = True

    @_fuse_errors
    async def open(self, inode, flags, ctx):
        e = self.fm.entry(inode)
        if e.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC:
            await self.fm.truncate(inode, 0, from_kernel=True)
        return await self._open_handle(e, flags)

    @_fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        if not stat.S_ISREG(mode) and stat.S_IFMT(mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        e = await self.fm.create(parent_inode, decode_name(name), stat.S_IMODE(mode))
        fi = await self._open_handle(e, flags)
        return fi, await self._attrs(e)

    def _handle(self, fh: int) -> _Handle:
        h = self._handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return h

    @_fuse_errors
    async def read(self, fh, off, size):
        h = self._handle(fh)
        if h.ino not in self.fm.state.entries:
            return await self._orphan(h, lambda lf: lf.read(off, size))
        return await self.fm.read(h.ino, off, size)

    @_fuse_errors
    async def write(self, fh, off, buf):
        h = self._handle(fh)
        if h.ino not in self.fm.state.entries:
            await self._orphan(h, lambda lf: lf.write(off, buf))
            return len(buf)
        return await self.fm.write(h.ino, off, buf, from_kernel=not h.direct)

    async def _orphan(self, h: _Handle, fn):
        """The file was unlinked while open here: the open handle keeps using our copy (as a
        local filesystem would); without a local copy there is nothing left to read."""
        if h.lf is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return await self.fm.io(fn, h.lf)

    @_fuse_errors
    async def fsync(self, fh, datasync):
        h = self._handle(fh)
        if h.ino in self.fm.state.entries:
            await self.fm.fsync(h.ino)

    async def flush(self, fh):
        pass  # the kernel wrote back dirty pages before this; durability is fsync's job

    @_fuse_errors
    async def release(self, fh):
        h = self._handles.pop(fh, None)
        if h is not None and h.lf is not None:
            self.fm.store.release(h.lf)

    async def forget(self, inode_list):
        pass  # inodes are the metadata's; nothing to free


class KernelNotifier:
    """Invalidations the File Manager asks for (FileManager.kernel)."""

    async def invalidate_inode(self, ino: int) -> None:
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel does not know it: nothing cached
                log.warning("invalidating inode %d: %s", ino, exc)

    async def invalidate_entry(self, parent: int, name: str) -> None:
        try:
            pyfuse3.invalidate_entry_async(parent, name.encode())
        except Exception as exc:  # noqa: BLE001 - best effort: the entry times out anyway
            log.debug("invalidating entry %s in %d: %s", name, parent, exc)


class _QuietInvalidations(logging.Filter):
    """pyfuse3 logs an ERROR when the kernel does not know an entry we invalidate: expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Failed to submit invalidate_entry")


logging.getLogger("pyfuse3").addFilter(_QuietInvalidations())


def _clear_stale_mount(mountpoint: Path) -> None:
    """A previous daemon killed while mounted leaves ENOTCONN there: unmount it lazily."""
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def serve_mount(fm: FileManager, mountpoint: Path, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Mounts /gfvm at `mountpoint` and serves it until cancelled; always unmounts."""
    mountpoint = Path(mountpoint)
    await trio.to_thread.run_sync(_clear_stale_mount, mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    ops = FmOperations(fm)
    options = set(pyfuse3.default_options)
    options.add("fsname=gfvm")
    options.add("subtype=gfvm")
    options.add("default_permissions")
    pyfuse3.init(ops, str(mountpoint), options)
    fm.kernel = KernelNotifier()
    try:
        async with trio.open_nursery() as n:
            n.start_soon(pyfuse3.main)
            task_status.started()
    finally:
        fm.kernel = None
        pyfuse3.close(unmount=True)
