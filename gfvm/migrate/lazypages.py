"""The lazy-pages server: the daemon side of `criu restore --lazy-pages`.

CRIU's protocol (criu/uffd.c): the restore connects to `<work-dir>/lazy-pages.socket` and, for
every restored task, sends its pid as a C int (the pid recorded in the images, i.e. inside the
tree's own PID namespace; negative for a zombie, which has no memory) followed by one byte
carrying the task's userfaultfd (SCM_RIGHTS). Every private anonymous VMA of the task is
registered MISSING on it; the pages CRIU marked PE_LAZY are not restored and arrive as faults.
When the restore is complete CRIU sends RESTORE_FINISHED (0x52535446) and hangs up; hanging up
on CRIU before that makes it fail with EPIPE and kill the tree. Faults arrive while the restore
still runs, so the server serves from the first uffd on.

Which bytes a missing page gets (never stale data, never zeros for a page that had data):
  1. CRIU's own images: a page stored in `pages-*.img` (PE_PRESENT) is the state at the dump;
  2. else the caller's page source (the paging file: `PageSource.lookup(inner_pid, vaddr)`),
     which holds the pages released before the dump;
  3. else the zero page: the address lies in a registered VMA but nothing was ever stored for it.
  A page the images list without bytes (a `dump --lazy-pages`, bytes on a page server) that the
  page source does not have is *unavailable*: the server stops with an error rather than guess,
  and the faulting thread stays blocked (the keeper still holds its uffd).
Events keep that true after the restart: REMOVE (MADV_DONTNEED) and UNMAP drop the range
(REMOVE also unregisters it, so the kernel serves zeros there from then on), REMAP moves what was
still waiting to the new address, FORK gives the child its own uffd, waiting for the same
contents as its parent at the fork. Events in a batch of messages are applied before the faults
of that batch are served: the kernel lets the process go on (and e.g. zap pages) once we read
an event, so a copy must never land in a range already dropped.

Robustness: each uffd is duplicated into a keeper process (gfvm.migrate.uffd_keeper) together
with the journal of events, so a crash of the server blocks the process instead of feeding it
zeros, and `LazyPagesServer.take_over` resumes from the keeper (waking every range, because the
faults the dead server had read are never re-sent). Each task is watched with a pidfd (a uffd
says nothing when its process exits) once `attach_root` maps inner pids to host pids.

Threads: `run()` is a blocking loop meant for its own thread; `stop`, `attach_root`, `prefetch`
and `statistics` are thread-safe. `serve()` is the trio entry point. Page-fault service is
Python for now (64-page batches: ~3 µs/page); gfvm.native's GIL-free loop will take the hot path.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import mmap
import os
import queue
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from gfvm.errors import GfvmError, Unavailable
from gfvm.migrate import uffd_ops
from gfvm.migrate.images import PAGE_SIZE, ImageDir, TaskMemory
from gfvm.migrate.rangemap import RangeMap
from gfvm.migrate.uffd_keeper import KeeperClient, KeeperGone

log = logging.getLogger("gfvm.lazypages")

SOCKET_NAME = "lazy-pages.socket"
RESTORE_FINISHED = 0x52535446
MAX_MSGS = 64


class PageSource(Protocol):
    """Where pages CRIU did not dump come from (the process's paging file)."""

    def lookup(self, inner_pid: int, vaddr: int) -> bytes | None:
        """The PAGE_SIZE bytes page `vaddr` of task `inner_pid` held at the dump, or None when
        this source has no copy of it. Blocking (may read a file); called from the server thread.
        A source may also offer `lookup_run(inner_pid, vaddr, max_pages) -> bytes | None`
        returning 1..max_pages consecutive pages at once (the server uses it when present), and
        `ranges(inner_pid) -> list[(start, end)]` listing what it holds (used by prefetch)."""
        ...


class RegionFileSource:
    """A page source holding one contiguous region of one task, stored as a flat file
    (page i of the file is the page at base + i * PAGE_SIZE). Blocking reads."""

    def __init__(self, inner_pid: int, base: int, path: str | os.PathLike) -> None:
        if base % PAGE_SIZE:
            raise ValueError(f"region base {base:#x} is not page-aligned")
        self.inner_pid = inner_pid
        self.base = base
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.length = os.fstat(self._fd).st_size // PAGE_SIZE * PAGE_SIZE

    def _offset(self, inner_pid: int, vaddr: int) -> int | None:
        if inner_pid != self.inner_pid or not self.base <= vaddr < self.base + self.length:
            return None
        return vaddr - self.base

    def lookup(self, inner_pid: int, vaddr: int) -> bytes | None:
        return self.lookup_run(inner_pid, vaddr, 1)

    def lookup_run(self, inner_pid: int, vaddr: int, max_pages: int) -> bytes | None:
        off = self._offset(inner_pid, vaddr)
        if off is None:
            return None
        want = min(max_pages * PAGE_SIZE, self.length - off)
        data = os.pread(self._fd, want, off)
        if len(data) != want:
            raise Unavailable(f"{self.path}: short read at {off}")
        return data

    def ranges(self, inner_pid: int) -> list[tuple[int, int]]:
        return [(self.base, self.base + self.length)] if inner_pid == self.inner_pid else []

    def close(self) -> None:
        os.close(self._fd)


class LazyRestoreFailed(GfvmError):
    """CRIU's restore ended before finishing (it hung up on lazy-pages.socket)."""


# --- pid mapping ---------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids += [int(x) for x in f.read().split()]
            except FileNotFoundError:
                pass
    except FileNotFoundError:
        pass
    return kids


def inner_pid_of(host_pid: int) -> int | None:
    """The pid `host_pid` has in its innermost PID namespace (last NSpid field), or None."""
    try:
        with open(f"/proc/{host_pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def inner_to_host(root_host_pid: int) -> dict[int, int]:
    """inner pid -> host pid for every process of the tree rooted at `root_host_pid` (blocking
    /proc walk; processes that exit meanwhile are skipped)."""
    found: dict[int, int] = {}
    todo = [root_host_pid]
    while todo:
        pid = todo.pop()
        inner = inner_pid_of(pid)
        if inner is not None:
            found[inner] = pid
            todo += _children(pid)
    return found


# --- the server ---------------------------------------------------------------------------------


@dataclass
class _Ctx:
    """One userfaultfd: the address space of one restored task (or of a child it forked)."""

    id: int
    fd: int
    owner: int  # inner pid whose dumped memory this address space started from
    inner_pid: int | None  # None for a child created after the restore (FORK event)
    pending: RangeMap
    host_pid: int | None = None
    pidfd: int | None = None
    faults: int = 0


@dataclass
class Stats:
    tasks: int = 0
    faults: int = 0
    pages_from_images: int = 0
    pages_from_source: int = 0
    pages_zero: int = 0
    pages_prefetched: int = 0
    events: dict = field(default_factory=dict)
    restore_finished: bool = False
    keeper_lost: bool = False

    def as_dict(self) -> dict:
        return {**self.__dict__, "events": dict(self.events)}


class LazyPagesServer:
    """Serves the pages of a tree being restored with `criu restore --lazy-pages`.

    Use: `listen()` (before starting CRIU), then `run()` on a thread of its own (or `serve()` on
    trio); after CRIU returns, `attach_root(host pid of the restored root)`. `run()` returns once
    the restore finished and every task has exited, or after `stop()`.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        work_dir: str | os.PathLike | None = None,
        *,
        page_source: PageSource | None = None,
        keeper: KeeperClient | None = None,
        batch_pages: int = 64,
        prefetch_chunk_pages: int = 256,
        zero_batch_pages: int = 16,
        exit_on_fault_in: tuple[int, int] | None = None,
    ) -> None:
        self.images = ImageDir(images_dir)
        self.work_dir = Path(work_dir) if work_dir is not None else self.images.path
        self.page_source = page_source
        self.keeper = keeper
        self.batch_pages = batch_pages
        self.prefetch_chunk_pages = prefetch_chunk_pages
        self.zero_batch_pages = zero_batch_pages
        # Fault point for tests: exit as soon as a fault in this range has been read (so the
        # faulting thread waits on a message nobody will answer or re-send).
        self._exit_on_fault_in = exit_on_fault_in
        self._buf_pages = max(batch_pages, prefetch_chunk_pages, 1)
        self._buf = mmap.mmap(-1, self._buf_pages * PAGE_SIZE)
        self._buf_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._buf))
        self._mem: dict[int, TaskMemory] = {}
        self._pages_fds: dict[int, int] = {}
        self._ctxs: dict[int, _Ctx] = {}  # by ctx id
        self._by_fd: dict[int, _Ctx] = {}
        self._by_pidfd: dict[int, _Ctx] = {}
        self._next_id = 1
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._poll = select.poll()
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._prefetch: list[tuple[int, int, int]] = []  # (ctx id, start, end), served in order
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stats = Stats()
        self._root_pidfd: int | None = None
        self._restore_finished = False
        self._accepting = True
        self.restored = threading.Event()  # set when CRIU said RESTORE_FINISHED
        self.error: BaseException | None = None

    # --- thread-safe controls ---------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        return self.work_dir / SOCKET_NAME

    def stop(self) -> None:
        """Makes `run()` return soon. The keeper (if any) keeps its uffd duplicates."""
        self._stop.set()
        self._poke()

    def attach_root(self, root_host_pid: int) -> None:
        """Tells the server the host pid of the restored root, so it can find every task's host
        pid and watch it with a pidfd. Call after `criu restore` returned."""
        self._requests.put(("root", root_host_pid))
        self._poke()

    def prefetch(self, inner_pid: int | None = None, ranges: list[tuple[int, int]] | None = None) -> None:
        """Queues a background push of pages that are still missing: of task `inner_pid` (all
        tasks when None), within `ranges` (everything the images or the page source hold when
        None). Served in 1 MiB copies whenever no fault is waiting."""
        self._requests.put(("prefetch", inner_pid, ranges))
        self._poke()

    def statistics(self) -> dict:
        with self._lock:
            stats = self._stats.as_dict()
        stats["pending_bytes"] = sum(c.pending.total_bytes for c in list(self._ctxs.values()))
        stats["live_tasks"] = len(self._ctxs)
        return stats

    def _poke(self) -> None:
        try:
            os.write(self._wakeup_w, b"x")
        except BlockingIOError:
            pass

    # --- setup ------------------------------------------------------------------------------

    def listen(self) -> Path:
        """Binds `<work_dir>/lazy-pages.socket` (blocking, quick); call before `criu restore`."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            listener.bind(str(self.socket_path))
        finally:
            os.umask(old)
        listener.listen(1)
        self._listener = listener
        return self.socket_path

    @classmethod
    def take_over(
        cls,
        keeper_socket: str | os.PathLike,
        images_dir: str | os.PathLike,
        work_dir: str | os.PathLike | None = None,
        **kwargs,
    ) -> "LazyPagesServer":
        """A successor for a server that died: fetches every uffd and the journal from the keeper
        at `keeper_socket`, rebuilds what each task still waits for, and wakes every thread
        blocked on a fault (blocking). Then call `run()`."""
        keeper = KeeperClient.connect(keeper_socket)
        server = cls(images_dir, work_dir, keeper=keeper, **kwargs)
        server._accepting = False
        records = keeper.handover()
        # Replay the journal: what every address space still waits for, dropped ones included
        # (a live child may have forked from a task that has exited since).
        state: dict[int, tuple[int, RangeMap]] = {}  # ctx -> (owner, pending)
        fds: dict[int, int] = {}
        hosts: dict[int, int] = {}
        dropped: set[int] = set()
        root = None
        for record, fd in records:
            op, cid = record["op"], record.get("ctx")
            if fd is not None:
                if op in ("hold", "fork") and cid not in fds:
                    fds[cid] = fd
                else:
                    os.close(fd)
            if op == "hold":
                owner = record["inner_pid"]
                state[cid] = (owner, RangeMap.identity(server._task_memory(owner).lazy_ranges))
            elif op == "fork" and record.get("parent") in state:
                owner, parent_pending = state[record["parent"]]
                state[cid] = (owner, parent_pending.copy())
            elif op == "event" and cid in state:
                server._apply_pending_event(state[cid][1], record)
            elif op == "host":
                hosts[cid] = record["pid"]
            elif op == "drop":
                dropped.add(cid)
            elif op == "root":
                root = record["pid"]
            elif op == "finished":
                server._restore_finished = True
                server.restored.set()
        inner = {r["ctx"]: r["inner_pid"] for r, _ in records if r["op"] == "hold"}
        for cid, fd in fds.items():
            if cid in dropped or cid not in state:
                os.close(fd)
                continue
            owner, pending = state[cid]
            ctx = server._add_ctx(fd, inner.get(cid), owner, journal=False, ctx_id=cid, pending=pending)
            if cid in hosts:
                server._watch(ctx, hosts[cid])
        server._next_id = max([r.get("ctx") or 0 for r, _ in records] + [0]) + 1
        if root is not None:
            try:
                server._root_pidfd = os.pidfd_open(root)
                server._poll.register(server._root_pidfd, select.POLLIN)
            except ProcessLookupError:
                for ctx in list(server._ctxs.values()):
                    server._close_ctx(ctx)
        for ctx in list(server._ctxs.values()):
            server._wake_all(ctx)
        return server

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serves until the restore finished and every task exited, or `stop()` (blocking).
        Raises LazyRestoreFailed when CRIU hangs up early, Unavailable when a page's contents
        cannot be found anywhere; uffds stay with the keeper in both cases."""
        self._poll.register(self._wakeup_r, select.POLLIN)
        if self._listener is not None:
            self._poll.register(self._listener, select.POLLIN)
        try:
            while not self._stop.is_set():
                timeout = 0 if self._prefetch else 1000
                events = self._poll.poll(timeout)
                for fd, _ in events:
                    if fd == self._wakeup_r:
                        self._handle_requests()
                    elif self._listener is not None and fd == self._listener.fileno():
                        self._accept()
                    elif self._conn is not None and fd == self._conn.fileno():
                        self._read_criu()
                    elif fd in self._by_fd:
                        self._drain(self._by_fd[fd])
                    elif fd in self._by_pidfd:
                        self._close_ctx(self._by_pidfd[fd])
                    elif fd == self._root_pidfd:
                        for ctx in list(self._ctxs.values()):
                            self._close_ctx(ctx)
                        self._poll.unregister(fd)
                        os.close(fd)
                        self._root_pidfd = None
                if not events and self._prefetch:
                    self._prefetch_step()
                if self._restore_finished and not self._ctxs and not self._accepting:
                    return
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for sock in (self._listener, self._conn):
            if sock is not None:
                sock.close()
        self._listener = self._conn = None
        self.socket_path.unlink(missing_ok=True)
        for ctx in list(self._ctxs.values()):
            self._close_ctx(ctx, journal=False)
        for fd in self._pages_fds.values():
            os.close(fd)
        self._pages_fds.clear()
        if self._root_pidfd is not None:
            os.close(self._root_pidfd)
            self._root_pidfd = None

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """trio entry point: listens, reports the socket path as started, runs the loop on a
        worker thread; cancelling stops the loop (uffds stay with the keeper)."""
        await trio.to_thread.run_sync(self.listen)
        task_status.started(self.socket_path)

        async def stop_on_cancel() -> None:
            try:
                await trio.sleep_forever()
            finally:
                self.stop()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_cancel)
            try:
                await trio.to_thread.run_sync(self.run)
            finally:
                nursery.cancel_scope.cancel()

    # --- CRIU's socket ------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        conn, _ = self._listener.accept()
        self._poll.unregister(self._listener)
        self._listener.close()
        self._listener = None
        self.socket_path.unlink(missing_ok=True)
        self._conn = conn
        self._poll.register(conn, select.POLLIN)

    def _recv_exact(self, n: int) -> bytes:
        assert self._conn is not None
        data = b""
        while len(data) < n:
            chunk = self._conn.recv(n - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def _read_criu(self) -> None:
        """One message from CRIU: a pid (+ its uffd), or RESTORE_FINISHED, or the hang-up."""
        head = self._recv_exact(4)
        if len(head) < 4:
            self._poll.unregister(self._conn)
            self._conn.close()
            self._conn = None
            self._accepting = False
            if not self._restore_finished:
                raise LazyRestoreFailed("criu restore hung up on lazy-pages.socket before finishing")
            return
        (value,) = struct.unpack("<i", head)
        if value == RESTORE_FINISHED:
            self._restore_finished = True
            with self._lock:
                self._stats.restore_finished = True
            self._journal({"op": "finished"})
            self.restored.set()
            return
        if value <= 0:
            return  # a zombie (-pid): it has no memory to serve
        _, ancdata, _, _ = self._conn.recvmsg(1, socket.CMSG_SPACE(4))
        fds = [
            int.from_bytes(payload[i : i + 4], sys.byteorder, signed=True)
            for level, kind, payload in ancdata
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
            for i in range(0, len(payload) - 3, 4)
        ]
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise LazyRestoreFailed(f"criu sent task {value} without exactly one userfaultfd")
        self._add_ctx(fds[0], value, value)

    # --- contexts -----------------------------------------------------------------------------

    def _task_memory(self, pid: int) -> TaskMemory:
        mem = self._mem.get(pid)
        if mem is None:
            mem = self._mem[pid] = self.images.task_memory(pid)
            if mem.present_pages:
                self._pages_fds[pid] = os.open(mem.pages_path, os.O_RDONLY | os.O_CLOEXEC)
        return mem

    def _add_ctx(self, fd: int, inner_pid: int | None, owner: int, *, journal: bool = True,
                 ctx_id: int | None = None, pending: RangeMap | None = None, parent: int | None = None) -> _Ctx:
        os.set_blocking(fd, False)
        if pending is None:
            pending = RangeMap.identity(self._task_memory(owner).lazy_ranges)
        else:
            self._task_memory(owner)
        cid = ctx_id if ctx_id is not None else self._next_id
        self._next_id = max(self._next_id, cid + 1)
        ctx = _Ctx(cid, fd, owner, inner_pid, pending)
        self._ctxs[cid] = ctx
        self._by_fd[fd] = ctx
        self._poll.register(fd, select.POLLIN)
        with self._lock:
            self._stats.tasks += 1
        if journal:
            if inner_pid is not None:
                self._journal({"op": "hold", "ctx": cid, "inner_pid": inner_pid}, fd)
            else:
                self._journal({"op": "fork", "ctx": cid, "parent": parent}, fd)
        return ctx

    def _watch(self, ctx: _Ctx, host_pid: int) -> None:
        ctx.host_pid = host_pid
        try:
            pidfd = os.pidfd_open(host_pid)
        except ProcessLookupError:
            self._close_ctx(ctx)
            return
        ctx.pidfd = pidfd
        self._by_pidfd[pidfd] = ctx
        self._poll.register(pidfd, select.POLLIN)

    def _close_ctx(self, ctx: _Ctx, *, journal: bool = True) -> None:
        if self._ctxs.pop(ctx.id, None) is None:
            return
        self._by_fd.pop(ctx.fd, None)
        self._poll.unregister(ctx.fd)
        os.close(ctx.fd)
        if ctx.pidfd is not None:
            self._by_pidfd.pop(ctx.pidfd, None)
            self._poll.unregister(ctx.pidfd)
            os.close(ctx.pidfd)
        self._prefetch = [p for p in self._prefetch if p[0] != ctx.id]
        if journal:
            self._journal({"op": "drop", "ctx": ctx.id}, required=False)

    def _journal(self, record: dict, fd: int | None = None, *, required: bool = True) -> None:
        """Appends to the keeper's journal. A lost keeper is survivable (we go on serving, without
        the safety net); `required=False` records (drops) are optional: the keeper also exits on
        its own when the tree does, so failing to send them is not worth a warning."""
        if self.keeper is None:
            return
        try:
            self.keeper.send(record, fd)
        except KeeperGone as exc:
            if not required:
                return
            log.warning("%s: serving on without a keeper (a crash would now feed zeros)", exc)
            with self._lock:
                self._stats.keeper_lost = True
            self.keeper = None

    def _handle_requests(self) -> None:
        try:
            while os.read(self._wakeup_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                req = self._requests.get_nowait()
            except queue.Empty:
                return
            if req[0] == "root":
                self._attach_root(req[1])
            elif req[0] == "prefetch":
                self._queue_prefetch(req[1], req[2])

    def _attach_root(self, root_host_pid: int) -> None:
        if self._root_pidfd is None:
            try:
                self._root_pidfd = os.pidfd_open(root_host_pid)
                self._poll.register(self._root_pidfd, select.POLLIN)
            except ProcessLookupError:
                for ctx in list(self._ctxs.values()):
                    self._close_ctx(ctx)
                return
            self._journal({"op": "root", "pid": root_host_pid})
        hosts = inner_to_host(root_host_pid)
        for ctx in list(self._ctxs.values()):
            if ctx.inner_pid is None or ctx.pidfd is not None:
                continue
            host = hosts.get(ctx.inner_pid)
            if host is None:
                self._close_ctx(ctx)  # exited already
                continue
            self._journal({"op": "host", "ctx": ctx.id, "pid": host})
            self._watch(ctx, host)

    def _wake_all(self, ctx: _Ctx) -> None:
        """Wakes every thread of ctx blocked on a fault (they fault again if still missing)."""
        low = max(_mmap_min_addr(), PAGE_SIZE)
        err = uffd_ops.wake(ctx.fd, low, _TASK_SIZE - low)
        if err and err not in (errno.ESRCH, errno.ENOMEM):
            for start, end, _ in ctx.pending:
                uffd_ops.wake(ctx.fd, start, end - start)

    # --- messages ---------------------------------------------------------------------------

    def _drain(self, ctx: _Ctx) -> None:
        """Reads and handles every message waiting on ctx's uffd."""
        while ctx.id in self._ctxs:
            try:
                msgs = uffd_ops.read_msgs(ctx.fd, MAX_MSGS)
            except OSError as exc:
                if exc.errno in (errno.ESRCH, errno.EBADF):
                    self._close_ctx(ctx)
                    return
                raise
            if not msgs:
                return
            faults = self._apply_events(ctx, msgs)
            for addr in faults:
                if ctx.id not in self._ctxs:
                    return
                self._serve_fault(ctx, addr)

    def _apply_events(self, ctx: _Ctx, msgs: list[uffd_ops.UffdMsg]) -> list[int]:
        """Applies every non-fault event of a batch (in order) and returns the fault addresses."""
        faults = []
        for m in msgs:
            if m.event == uffd_ops.UFFD_EVENT_PAGEFAULT:
                faults.append(m.address & ~(PAGE_SIZE - 1))
                if self._exit_on_fault_in and self._exit_on_fault_in[0] <= m.address < self._exit_on_fault_in[1]:
                    os._exit(70)
                continue
            kind = {
                uffd_ops.UFFD_EVENT_FORK: "fork",
                uffd_ops.UFFD_EVENT_REMAP: "remap",
                uffd_ops.UFFD_EVENT_REMOVE: "remove",
                uffd_ops.UFFD_EVENT_UNMAP: "unmap",
            }.get(m.event)
            if kind is None:
                raise GfvmError(f"unexpected userfaultfd event {m.event:#x}")
            with self._lock:
                self._stats.events[kind] = self._stats.events.get(kind, 0) + 1
            if kind == "fork":
                self._add_ctx(m.ufd, None, ctx.owner, pending=ctx.pending.copy(), parent=ctx.id)
            elif kind == "remap":
                self._apply_event(ctx, {"kind": "remap", "src": m.a, "dst": m.b, "len": m.c})
            else:
                self._apply_event(ctx, {"kind": kind, "start": m.start, "end": m.end})
        return faults

    @staticmethod
    def _apply_pending_event(pending: RangeMap, ev: dict) -> None:
        if ev["kind"] == "remap":
            pending.move(ev["src"], ev["dst"], ev["len"])
        else:
            pending.remove(ev["start"], ev["end"])

    def _apply_event(self, ctx: _Ctx, ev: dict) -> None:
        self._journal({"op": "event", "ctx": ctx.id, **ev})
        self._apply_pending_event(ctx.pending, ev)
        if ev["kind"] == "remove":
            # Like CRIU: the range no longer gets faults; the kernel maps zero pages there.
            err = uffd_ops.unregister(ctx.fd, ev["start"], ev["end"] - ev["start"])
            if err not in (0, errno.ENOMEM, errno.ESRCH, errno.EINVAL, errno.ENOENT):
                raise OSError(err, f"UFFDIO_UNREGISTER after REMOVE: {os.strerror(err)}")

    # --- serving ------------------------------------------------------------------------------

    def _serve_fault(self, ctx: _Ctx, addr: int) -> None:
        ctx.faults += 1
        with self._lock:
            self._stats.faults += 1
        for _ in range(100):
            done = self._serve(ctx, addr, self.batch_pages, fault=True)
            if done:
                return
            # EAGAIN with nothing done: an event is pending (mmap_changing); handle it and retry.
            msgs = uffd_ops.read_msgs(ctx.fd, MAX_MSGS)
            more = self._apply_events(ctx, msgs)
            for extra in more:
                if extra != addr:
                    self._serve_fault(ctx, extra)
            if ctx.id not in self._ctxs:
                return
        raise GfvmError(f"fault at {addr:#x} could not be served after 100 tries (events keep coming)")

    def _serve(self, ctx: _Ctx, addr: int, max_pages: int, *, fault: bool) -> int:
        """Fills pages from `addr` (at most max_pages, at least the first). Returns the number of
        pages handled, 0 when the kernel asked us to retry (a pending event). With fault=False
        (prefetch) pages without data are skipped rather than zero-filled."""
        hit = ctx.pending.find(addr)
        if hit is None:
            if not fault:
                return 1
            nxt = ctx.pending.next_at_or_after(addr)
            limit = (nxt[0] - addr) // PAGE_SIZE if nxt else self.zero_batch_pages
            return self._fill_zero(ctx, addr, max(1, min(self.zero_batch_pages, limit)))
        start, end, origin_of_start = hit
        npages = min(max_pages, (end - addr) // PAGE_SIZE)
        origin = origin_of_start + (addr - start)
        kind, k, from_images = self._contents(ctx.owner, origin, npages)
        if kind == "zero":
            if not fault:
                ctx.pending.remove(addr, addr + k * PAGE_SIZE)  # nothing to push; faults will zero-fill
                return k
            return self._fill_zero(ctx, addr, k)
        err, done = uffd_ops.copy(ctx.fd, addr, self._buf_addr, k * PAGE_SIZE)
        return self._after_fill(ctx, addr, err, done, k, "images" if from_images else "source", fault)

    def _fill_zero(self, ctx: _Ctx, addr: int, k: int) -> int:
        err, done = uffd_ops.zeropage(ctx.fd, addr, k * PAGE_SIZE)
        if err == errno.ENOENT and k > 1:  # the batch crossed a VMA boundary: one page only
            err, done = uffd_ops.zeropage(ctx.fd, addr, PAGE_SIZE)
            k = 1
        return self._after_fill(ctx, addr, err, done, k, "zero", True)

    def _after_fill(self, ctx: _Ctx, addr: int, err: int, done: int, k: int, what: str, fault: bool) -> int:
        pages = done // PAGE_SIZE
        if pages:
            ctx.pending.remove(addr, addr + pages * PAGE_SIZE)
            with self._lock:
                if what == "images":
                    self._stats.pages_from_images += pages
                elif what == "source":
                    self._stats.pages_from_source += pages
                else:
                    self._stats.pages_zero += pages
                if not fault:
                    self._stats.pages_prefetched += pages
        if err == 0 or (err == errno.EAGAIN and pages):
            return pages  # a partial copy stops at a page that exists: fine, it is served
        if err == errno.EAGAIN:
            return 0
        if err in (errno.EEXIST, errno.ENOENT):
            # EEXIST: the page is there already (another thread's fault, or a prefetch);
            # ENOENT: no registered VMA there any more. Either way nothing to fill: wake it.
            ctx.pending.remove(addr, addr + PAGE_SIZE)
            if fault:
                uffd_ops.wake(ctx.fd, addr, PAGE_SIZE)
            return 1
        if err in (errno.ESRCH, errno.ENOSPC):
            self._close_ctx(ctx)  # the process is gone
            return 1
        raise OSError(err, f"UFFDIO_{'ZEROPAGE' if what == 'zero' else 'COPY'} at {addr:#x}: {os.strerror(err)}")

    def _contents(self, owner: int, origin: int, npages: int) -> tuple[str, int, bool]:
        """Puts the contents of up to npages pages from dump address `origin` of task `owner`
        into the copy buffer. Returns (kind, pages, from_images): kind "data" (in the buffer) or
        "zero" (nothing was ever stored for them); at least one page."""
        mem = self._task_memory(owner)
        run = mem.find(origin)
        if run is not None and run.present:
            k = min(npages, (run.end - origin) // PAGE_SIZE)
            want = k * PAGE_SIZE
            got = os.preadv(self._pages_fds[owner], [memoryview(self._buf)[:want]], mem.file_offset(origin))
            if got != want:
                raise Unavailable(f"{mem.pages_path}: short read at page {origin:#x}")
            return "data", k, True
        # Limit the run to what the images say about the following pages.
        if run is not None:
            limit = (run.end - origin) // PAGE_SIZE
        else:
            nxt = mem.next_run_start(origin)
            limit = (nxt - origin) // PAGE_SIZE if nxt is not None else npages
        k = max(1, min(npages, limit))
        n = self._from_source(owner, origin, k)
        if n:
            return "data", n, False
        if run is not None:  # listed by the images, bytes not stored there, not in the source
            raise Unavailable(
                f"page {origin:#x} of task {owner} was dumped lazily and its contents are not "
                "available (no page server, not in the page source)"
            )
        # Not stored anywhere: count how many following pages the source lacks too.
        zeros = 1
        while zeros < k and self._source_lookup(owner, origin + zeros * PAGE_SIZE) is None:
            zeros += 1
        return "zero", zeros, False

    def _source_lookup(self, owner: int, vaddr: int) -> bytes | None:
        if self.page_source is None:
            return None
        return self.page_source.lookup(owner, vaddr)

    def _from_source(self, owner: int, origin: int, k: int) -> int:
        """Copies up to k consecutive pages from the page source into the buffer; returns how many."""
        if self.page_source is None:
            return 0
        run_lookup = getattr(self.page_source, "lookup_run", None)
        if run_lookup is not None:
            data = run_lookup(owner, origin, k)
            if not data:
                return 0
            n = min(k, len(data) // PAGE_SIZE)
            if n == 0 or len(data) % PAGE_SIZE:
                raise Unavailable(f"page source returned {len(data)} bytes for page {origin:#x}")
            self._buf[: n * PAGE_SIZE] = data[: n * PAGE_SIZE]
            return n
        n = 0
        while n < k:
            page = self.page_source.lookup(owner, origin + n * PAGE_SIZE)
            if page is None:
                break
            if len(page) != PAGE_SIZE:
                raise Unavailable(f"page source returned {len(page)} bytes for page {origin + n * PAGE_SIZE:#x}")
            self._buf[n * PAGE_SIZE : (n + 1) * PAGE_SIZE] = page
            n += 1
        return n

    # --- prefetch ------------------------------------------------------------------------------

    def _queue_prefetch(self, inner_pid: int | None, ranges: list[tuple[int, int]] | None) -> None:
        for ctx in list(self._ctxs.values()):
            if inner_pid is not None and ctx.owner != inner_pid:
                continue
            if ranges is None:
                mem = self._task_memory(ctx.owner)
                wanted = [(r.vaddr, r.end) for r in mem.runs if r.present]
                source_ranges = getattr(self.page_source, "ranges", None)
                if source_ranges is not None:
                    wanted += list(source_ranges(ctx.owner))
            else:
                wanted = list(ranges)
            for start, end in sorted(wanted):
                start -= start % PAGE_SIZE
                self._prefetch.append((ctx.id, start, end))

    def _prefetch_step(self) -> None:
        """Pushes at most one chunk of pages still missing (no fault is waiting)."""
        while self._prefetch:
            cid, start, end = self._prefetch[0]
            ctx = self._ctxs.get(cid)
            nxt = ctx.pending.next_at_or_after(start) if ctx is not None else None
            if nxt is None or nxt[0] >= end:
                self._prefetch.pop(0)
                continue
            addr = max(start, nxt[0])
            limit = min(nxt[1], end)
            pages = max(1, min(self.prefetch_chunk_pages, (limit - addr) // PAGE_SIZE))
            done = self._serve(ctx, addr, pages, fault=False)
            self._prefetch[0] = (cid, addr + max(done, 0) * PAGE_SIZE if done else addr, end)
            if done == 0:  # an event is pending: let the loop read it first
                self._drain(ctx)
            return


_TASK_SIZE = 0x7FFFFFFFF000  # x86-64 user address space with 4-level page tables


def _mmap_min_addr() -> int:
    try:
        with open("/proc/sys/vm/mmap_min_addr") as f:
            value = int(f.read())
    except (OSError, ValueError):
        value = 65536
    return (value + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


# --- command line (a server in a process of its own: tests, fault injection) ----------------------


def _parse_region(text: str) -> RegionFileSource:
    pid, base, path = text.split(":", 2)
    return RegionFileSource(int(pid), int(base, 0), path)


class _MultiSource:
    def __init__(self, sources: list[RegionFileSource]) -> None:
        self.sources = sources

    def lookup(self, inner_pid: int, vaddr: int) -> bytes | None:
        return self.lookup_run(inner_pid, vaddr, 1)

    def lookup_run(self, inner_pid: int, vaddr: int, max_pages: int) -> bytes | None:
        for s in self.sources:
            data = s.lookup_run(inner_pid, vaddr, max_pages)
            if data:
                return data
        return None

    def ranges(self, inner_pid: int) -> list[tuple[int, int]]:
        return [r for s in self.sources for r in s.ranges(inner_pid)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gfvm-lazy-pages", description="lazy-pages server for criu restore --lazy-pages")
    parser.add_argument("mode", choices=["serve", "take-over"])
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--keeper-socket", type=Path, help="spawn a keeper here (serve) / take over from it")
    parser.add_argument("--region", action="append", default=[], metavar="PID:BASE:FILE",
                        help="page source: the pages of task PID from address BASE are in FILE")
    parser.add_argument("--root-pidfile", type=Path, help="criu restore's --pidfile: attach to that root")
    parser.add_argument("--prefetch", action="store_true", help="push every page in the background")
    parser.add_argument("--exit-on-fault-in", metavar="START:END",
                        help="fault point (tests): exit as soon as a fault in [START, END) is read")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s lazy-pages: %(message)s")
    source = _MultiSource([_parse_region(r) for r in args.region]) if args.region else None
    exit_range = None
    if args.exit_on_fault_in:
        lo, hi = args.exit_on_fault_in.split(":")
        exit_range = (int(lo, 0), int(hi, 0))
    kwargs = dict(page_source=source, exit_on_fault_in=exit_range)
    if args.mode == "serve":
        keeper = KeeperClient.spawn(args.keeper_socket) if args.keeper_socket else None
        server = LazyPagesServer(args.images, args.work_dir, keeper=keeper, **kwargs)
        server.listen()
    else:
        server = LazyPagesServer.take_over(args.keeper_socket, args.images, args.work_dir, **kwargs)
    keeper_pid = server.keeper.pid if server.keeper is not None and server.keeper.pid else "-"
    print(f"{'listening' if args.mode == 'serve' else 'serving'} keeper={keeper_pid}", flush=True)

    def attach_when_restored() -> None:
        server.restored.wait()
        if args.root_pidfile is None:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                text = args.root_pidfile.read_text().strip()
                if text:
                    server.attach_root(int(text))
                    if args.prefetch:
                        server.prefetch()
                    return
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.01)

    if args.mode == "take-over" and args.prefetch:
        server.prefetch()
    threading.Thread(target=attach_when_restored, daemon=True).start()
    try:
        server.run()
    except GfvmError as exc:
        log.error("%s", exc)
        return 1
    finally:
        log.info("statistics: %s", server.statistics())
    if server.keeper is not None:
        server.keeper.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
