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
  2. else the caller's page source (gfvm.migrate.pagesource: the paging file), which holds the
     pages released before the dump;
  3. else the zero page: the address lies in a registered VMA but nothing was ever stored for it.
  A page the images list without bytes (a `dump --lazy-pages`: bytes on a page server) must be
  in the page source: a task for which it is not is refused when its uffd arrives (Unavailable;
  CRIU then fails and kills the tree) rather than ever served zeros.
Events keep that true after the restart: REMOVE (MADV_DONTNEED) and UNMAP drop the range (its
old contents never come back: zeros from then on), REMAP moves what was still waiting to the new
address, FORK gives the child its own uffd, waiting for the same contents as its parent at the
fork. Events in a batch of messages are applied before the faults of that batch are served: the
kernel lets the process go on (and zap pages) once an event is read, so a copy must never land in
a range already dropped; copies attempted while an event is pending fail with EAGAIN and are
retried after reading it.

Two engines serve faults, with the same results:
  - "native": gfvm.native.FaultLoop on its own pthread (no GIL), reading from page indexes over
    the images' pages file and the page source's files (64-page windows); this thread only
    relays its events. Prefetch is the loop's own (FaultLoop.prefetch): it pushes the pages
    between faults, on its thread, ordered with the events it reads.
  - "python": this module reads the uffds itself (RangeMap bookkeeping, gfvm.native.Userfaultfd
    ioctls). Used for page sources with only `lookup`, and for the test fault point.
"auto" picks native when it can.

Robustness: each uffd is duplicated into a keeper process (gfvm.migrate.uffd_keeper) together
with the journal of events, so a crash of the server blocks the process instead of feeding it
zeros, and `LazyPagesServer.take_over` resumes from the keeper, replaying the journal and waking
every range (faults the dead server had read are never re-sent). Each task is watched with a
pidfd (a uffd says nothing when its process exits) once `attach_root` maps inner pids to host pids.

Threads: `run()` is a blocking loop meant for a thread of its own; `stop`, `attach_root`,
`prefetch` and `statistics` are thread-safe. `serve()` is the trio entry point.
"""

from __future__ import annotations

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
from dataclasses import dataclass, field
from pathlib import Path

import trio

from gfvm import native
from gfvm.errors import GfvmError, Unavailable
from gfvm.migrate.images import PAGE_SIZE, ImageDir, TaskMemory
from gfvm.migrate.pagesource import PageSource
from gfvm.migrate.rangemap import RangeMap
from gfvm.migrate.uffd_keeper import KeeperClient, KeeperGone

log = logging.getLogger("gfvm.lazypages")

SOCKET_NAME = "lazy-pages.socket"
RESTORE_FINISHED = 0x52535446
MAX_MSGS = 64
_TASK_SIZE = 0x7FFFFFFFF000  # x86-64 user address space with 4-level page tables


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


def _mmap_min_addr() -> int:
    try:
        with open("/proc/sys/vm/mmap_min_addr") as f:
            value = int(f.read())
    except (OSError, ValueError):
        value = 65536
    return max(PAGE_SIZE, (value + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE)


def _uffd_call(fn, *args) -> tuple[int, int]:
    """Runs a native uffd fill ioctl; returns (errno or 0, bytes done)."""
    try:
        return 0, fn(*args)
    except native.PartialCopy as exc:
        return errno.EAGAIN, exc.done
    except OSError as exc:
        return exc.errno or errno.EIO, 0


# --- the server ---------------------------------------------------------------------------------


@dataclass
class _Ctx:
    """One userfaultfd: the address space of one restored task (or of a child it forked)."""

    id: int
    uffd: native.Userfaultfd  # our reference (the python engine reads it; both wake through it)
    owner: int  # inner pid whose dumped memory this address space started from
    inner_pid: int | None  # None for a child created after the restore (FORK event)
    pending: RangeMap | None = None  # python engine: what still waits, and for which dump address
    sources: list | None = None  # native engine: the loop's sources (None for loop-made children)
    loop_id: int | None = None
    host_pid: int | None = None
    pidfd: int | None = None


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
        engine: str = "auto",
        batch_pages: int = 64,
        prefetch_chunk_pages: int = 256,
        zero_batch_pages: int = 16,
        exit_on_fault_in: tuple[int, int] | None = None,
    ) -> None:
        self.images = ImageDir(images_dir)
        self.work_dir = Path(work_dir) if work_dir is not None else self.images.path
        self.page_source = page_source
        self.keeper = keeper
        can_native = exit_on_fault_in is None and (
            page_source is None or hasattr(page_source, "native_sources")
        )
        if engine == "auto":
            engine = "native" if can_native else "python"
        if engine not in ("native", "python") or (engine == "native" and not can_native):
            raise ValueError(f"engine {engine!r} cannot serve this configuration")
        self.engine = engine
        self.batch_pages = batch_pages
        self.prefetch_chunk_pages = prefetch_chunk_pages
        self.zero_batch_pages = zero_batch_pages
        # Fault point for tests (python engine): exit as soon as a fault in this range has been
        # read, so the faulting thread waits on a message nobody will answer or re-send.
        self._exit_on_fault_in = exit_on_fault_in
        self._buf = mmap.mmap(-1, max(batch_pages, prefetch_chunk_pages, 1) * PAGE_SIZE)
        self._mem: dict[int, TaskMemory] = {}
        self._pages_fds: dict[int, int] = {}
        self._image_index: dict[int, object] = {}  # owner -> native.PageIndex of its stored pages
        self._ctxs: dict[int, _Ctx] = {}  # by ctx id
        self._by_fd: dict[int, _Ctx] = {}  # python engine: uffd fd -> ctx
        self._by_pidfd: dict[int, _Ctx] = {}  # python engine: pidfd -> ctx
        self._by_loop_id: dict[int, _Ctx] = {}  # native engine
        self._loop = native.FaultLoop(batch_pages) if engine == "native" else None
        self._next_id = 1
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._poll = select.poll()
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._prefetch: list[tuple[int, int, int]] = []  # python engine: (ctx id, start, end)
        self._prefetching: set[int] = set()  # native engine: loop ids with a prefetch under way
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stats = Stats()
        self._root_pidfd: int | None = None
        self._restore_finished = False
        self._accepting = True
        self.restored = threading.Event()  # set when CRIU said RESTORE_FINISHED
        self.prefetched = threading.Event()  # set when a requested prefetch has completed
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
        None). Only pages with contents are pushed, never zeros. `prefetched` is set when done."""
        self.prefetched.clear()
        self._requests.put(("prefetch", inner_pid, ranges))
        self._poke()

    def statistics(self) -> dict:
        """Counters so far (thread-safe snapshot)."""
        with self._lock:
            stats = self._stats.as_dict()
        ctxs = list(self._ctxs.values())
        stats["engine"] = self.engine
        stats["live_tasks"] = len(ctxs)
        if self._loop is not None:
            try:
                c = self._loop.counters(0)
            except ValueError:  # closed
                c = None
            if c is not None:
                stats["faults"] = c.faults
                stats["pages_copied"] = c.pages_copied
                stats["pages_zero"] = c.pages_zero
                for ctx in ctxs:  # per source: images first (if the task has any), then the rest
                    try:
                        per_source = self._loop.counters(ctx.loop_id).from_source
                    except (KeyError, ValueError, TypeError):
                        continue  # closed meanwhile (counted in _close_ctx), or not in the loop
                    images = self._image_sources(ctx.owner)
                    stats["pages_from_images"] += sum(per_source[:images])
                    stats["pages_from_source"] += sum(per_source[images:])
        else:
            stats["pages_copied"] = stats["pages_from_images"] + stats["pages_from_source"]
            stats["pending_bytes"] = sum(c.pending.total_bytes for c in ctxs if c.pending is not None)
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
        state: dict[int, tuple[int, object]] = {}  # ctx -> (owner, engine state)
        fds: dict[int, int] = {}
        hosts: dict[int, int] = {}
        dropped: set[int] = set()
        inner: dict[int, int] = {}
        root = None
        for record, fd in records:
            op, cid = record["op"], record.get("ctx")
            if fd is not None:
                if op in ("hold", "fork") and cid not in fds:
                    fds[cid] = fd
                else:
                    os.close(fd)
            if op == "hold":
                owner = inner[cid] = record["inner_pid"]
                state[cid] = (owner, server._initial_state(owner))
            elif op == "fork" and record.get("parent") in state:
                owner, parent_state = state[record["parent"]]
                state[cid] = (owner, server._forked_state(parent_state))
            elif op == "event" and cid in state:
                server._apply_state_event(state[cid][1], record)
            elif op == "host":
                hosts[cid] = record["pid"]
            elif op == "drop":
                dropped.add(cid)
            elif op == "root":
                root = record["pid"]
            elif op == "finished":
                server._restore_finished = True
                server.restored.set()
        server._next_id = max([r.get("ctx") or 0 for r, _ in records] + [0]) + 1
        for cid, fd in fds.items():
            if cid in dropped or cid not in state:
                os.close(fd)
                continue
            owner, st = state[cid]
            ctx = server._add_ctx(native.Userfaultfd(fd), inner.get(cid), owner, journal=False,
                                  ctx_id=cid, state=st)
            if cid in hosts:
                server._watch(ctx, hosts[cid])
        if root is not None:
            try:
                server._root_pidfd = os.pidfd_open(root)
                server._poll.register(server._root_pidfd, select.POLLIN)
            except ProcessLookupError:
                for ctx in list(server._ctxs.values()):
                    server._close_ctx(ctx)
        return server

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Serves until the restore finished and every task exited, or `stop()` (blocking).
        Raises LazyRestoreFailed when CRIU hangs up early, Unavailable when a task's contents
        cannot all be found; uffds stay with the keeper in both cases."""
        self._poll.register(self._wakeup_r, select.POLLIN)
        if self._listener is not None:
            self._poll.register(self._listener, select.POLLIN)
        if self._loop is not None:
            self._poll.register(self._loop.notify_fd, select.POLLIN)
            self._loop.start()
        # Threads that were blocked when a previous server died fault again once woken; with the
        # native engine they must be woken only now that the loop serves their uffds.
        for ctx in list(self._ctxs.values()):
            self._wake_all(ctx)
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
                    elif self._loop is not None and fd == self._loop.notify_fd:
                        self._handle_loop_events()
                    elif fd in self._by_fd:
                        self._drain(self._by_fd[fd])
                    elif fd in self._by_pidfd:
                        self._close_ctx(self._by_pidfd[fd])
                    elif fd == self._root_pidfd:
                        self._tree_gone()
                if not events and self._prefetch:
                    self._prefetch_step()
                if self._restore_finished and not self._ctxs and not self._accepting:
                    return
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self._shutdown()

    def _tree_gone(self) -> None:
        for ctx in list(self._ctxs.values()):
            self._close_ctx(ctx)
        if self._root_pidfd is not None:
            self._poll.unregister(self._root_pidfd)
            os.close(self._root_pidfd)
            self._root_pidfd = None

    def _shutdown(self) -> None:
        for sock in (self._listener, self._conn):
            if sock is not None:
                sock.close()
        self._listener = self._conn = None
        self.socket_path.unlink(missing_ok=True)
        if self._loop is not None:
            self._loop.close()  # drops the loop's duplicates; the keeper still holds its own
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
        uffd = native.Userfaultfd(fds[0])
        try:
            self._check_available(value)
        except BaseException:
            uffd.close()
            raise
        self._add_ctx(uffd, value, value)

    # --- per-task state -----------------------------------------------------------------------

    def _task_memory(self, pid: int) -> TaskMemory:
        mem = self._mem.get(pid)
        if mem is None:
            mem = self._mem[pid] = self.images.task_memory(pid)
            if mem.present_pages:
                self._pages_fds[pid] = os.open(mem.pages_path, os.O_RDONLY | os.O_CLOEXEC)
        return mem

    def _check_available(self, owner: int) -> None:
        """Refuses a task whose images list pages without their bytes (a lazy dump) unless the
        page source holds every one of them: those must never be served as zeros."""
        missing = [r for r in self._task_memory(owner).runs if not r.present]
        if not missing:
            return
        ranges = getattr(self.page_source, "ranges", None)
        if self.page_source is None or ranges is None:
            raise Unavailable(
                f"task {owner}: {sum(r.nr_pages for r in missing)} dumped pages are not in the images "
                "(a lazy dump) and no page source can vouch for them"
            )
        held = RangeMap.identity(sorted(ranges(owner)))
        for r in missing:
            for addr in range(r.vaddr, r.end, PAGE_SIZE):
                if held.find(addr) is None:
                    raise Unavailable(f"task {owner}: page {addr:#x} is neither in the images nor in the page source")

    def _images_index(self, owner: int):
        """The native page index of the pages stored in the images for `owner` (built once)."""
        index = self._image_index.get(owner)
        if index is None:
            mem = self._task_memory(owner)
            index = native.PageIndex(mem.present_pages)
            addrs, slots = [], []
            for r in mem.runs:
                if r.present:
                    addrs += range(r.vaddr, r.end, PAGE_SIZE)
                    slots += range(r.offset // PAGE_SIZE, r.offset // PAGE_SIZE + r.nr_pages)
            index.set_many(addrs, slots)
            self._image_index[owner] = index
        return index

    def _image_sources(self, owner: int) -> int:
        """How many of a task's native sources are CRIU's images (they come first): 0 or 1."""
        return 1 if self._task_memory(owner).present_pages else 0

    def _initial_state(self, owner: int):
        """What a freshly restored task waits for: python: its lazy VMAs (identity RangeMap);
        native: fresh indexes over the images and the page source, images first."""
        if self._loop is None:
            return RangeMap.identity(self._task_memory(owner).lazy_ranges)
        sources = []
        if self._task_memory(owner).present_pages:
            sources.append(native.Source(self._images_index(owner).clone(), self._pages_fds[owner]))
        if self.page_source is not None:
            sources += self.page_source.native_sources(owner)
        return sources

    def _forked_state(self, parent_state):
        if self._loop is None:
            return parent_state.copy()
        return [native.Source(s.index.clone(), s.fd, s.mapping) for s in parent_state]

    @staticmethod
    def _apply_state_event(state, ev: dict) -> None:
        """Applies a journaled remap/remove/unmap event to an engine state (RangeMap or sources)."""
        if isinstance(state, RangeMap):
            if ev["kind"] == "remap":
                state.move(ev["src"], ev["dst"], ev["len"])
            else:
                state.remove(ev["start"], ev["end"])
            return
        for s in state:
            if ev["kind"] == "remap":
                s.index.move_range(ev["src"], ev["dst"], ev["len"])
            else:
                s.index.remove_range(ev["start"], ev["end"])

    def _add_ctx(self, uffd: native.Userfaultfd, inner_pid: int | None, owner: int, *, journal: bool = True,
                 ctx_id: int | None = None, state=None, parent: int | None = None,
                 loop_id: int | None = None) -> _Ctx:
        cid = ctx_id if ctx_id is not None else self._next_id
        self._next_id = max(self._next_id, cid + 1)
        ctx = _Ctx(cid, uffd, owner, inner_pid)
        if journal:  # before serving anything: from now on a crash leaves the keeper holding it
            if inner_pid is not None:
                self._journal({"op": "hold", "ctx": cid, "inner_pid": inner_pid}, uffd.fileno())
            else:
                self._journal({"op": "fork", "ctx": cid, "parent": parent}, uffd.fileno())
        if self._loop is None:
            os.set_blocking(uffd.fileno(), False)
            ctx.pending = state if state is not None else self._initial_state(owner)
            self._by_fd[uffd.fileno()] = ctx
            self._poll.register(uffd.fileno(), select.POLLIN)
        elif loop_id is not None:  # a child the loop already serves (fork)
            ctx.loop_id = loop_id
        else:
            ctx.sources = state if state is not None else self._initial_state(owner)
            ctx.loop_id = self._loop.add(uffd, ctx.sources, wp=False)
        if ctx.loop_id is not None:
            self._by_loop_id[ctx.loop_id] = ctx
        self._ctxs[cid] = ctx
        with self._lock:
            self._stats.tasks += 1
        return ctx

    def _watch(self, ctx: _Ctx, host_pid: int) -> None:
        ctx.host_pid = host_pid
        try:
            pidfd = os.pidfd_open(host_pid)
        except ProcessLookupError:
            self._close_ctx(ctx)
            return
        if self._loop is not None and ctx.loop_id is not None:
            try:
                self._loop.set_process(ctx.loop_id, host_pid, pidfd)  # the loop keeps a dup
            finally:
                os.close(pidfd)
            return
        ctx.pidfd = pidfd
        self._by_pidfd[pidfd] = ctx
        self._poll.register(pidfd, select.POLLIN)

    def _close_ctx(self, ctx: _Ctx, *, journal: bool = True) -> None:
        if self._ctxs.pop(ctx.id, None) is None:
            return
        if ctx.loop_id is not None:
            self._by_loop_id.pop(ctx.loop_id, None)
            if self._loop is not None:
                try:
                    per_source = self._loop.counters(ctx.loop_id).from_source
                    images = self._image_sources(ctx.owner)
                    with self._lock:
                        self._stats.pages_from_images += sum(per_source[:images])
                        self._stats.pages_from_source += sum(per_source[images:])
                    self._loop.remove(ctx.loop_id)
                except (KeyError, ValueError):
                    pass
        if self._by_fd.pop(ctx.uffd.fileno(), None) is not None:
            self._poll.unregister(ctx.uffd.fileno())
        ctx.uffd.close()
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
                self._tree_gone()
                return
            self._journal({"op": "root", "pid": root_host_pid})
        hosts = inner_to_host(root_host_pid)
        for ctx in list(self._ctxs.values()):
            if ctx.inner_pid is None or ctx.host_pid is not None:
                continue
            host = hosts.get(ctx.inner_pid)
            if host is None:
                self._close_ctx(ctx)  # exited already
                continue
            self._journal({"op": "host", "ctx": ctx.id, "pid": host})
            self._watch(ctx, host)

    def _wake_all(self, ctx: _Ctx) -> None:
        """Wakes every thread of ctx blocked on a fault (they fault again if still missing)."""
        low = _mmap_min_addr()
        try:
            ctx.uffd.wake(low, _TASK_SIZE - low)
        except OSError as exc:
            if exc.errno in (errno.ESRCH, errno.ENOMEM):
                return
            for start, end, _ in ctx.pending or []:
                ctx.uffd.wake(start, end - start)

    # --- native engine: relay the loop's events -------------------------------------------------

    def _handle_loop_events(self) -> None:
        for ev in self._loop.pop_events():
            ctx = self._by_loop_id.get(ev.uffd_id)
            if ev.kind in ("remap", "remove", "unmap"):
                with self._lock:
                    self._stats.events[ev.kind] = self._stats.events.get(ev.kind, 0) + 1
                if ctx is None:
                    continue
                if ev.kind == "remap":
                    record = {"kind": "remap", "src": ev.start, "dst": ev.to, "len": ev.end - ev.start}
                else:
                    record = {"kind": ev.kind, "start": ev.start, "end": ev.end}
                self._journal({"op": "event", "ctx": ctx.id, **record})
            elif ev.kind == "fork":
                with self._lock:
                    self._stats.events["fork"] = self._stats.events.get("fork", 0) + 1
                if ev.uffd is None:
                    continue
                if ctx is None or ev.child_id == 0:
                    ev.uffd.close()
                    raise GfvmError(f"the fault loop could not serve a forked child: {os.strerror(ev.error or errno.EIO)}")
                self._add_ctx(ev.uffd, None, ctx.owner, parent=ctx.id, loop_id=ev.child_id)
            elif ev.kind == "exit":
                if ctx is not None:
                    self._close_ctx(ctx)
            elif ev.kind == "prefetched":
                with self._lock:
                    self._stats.pages_prefetched += ev.count
                self._prefetching.discard(ev.uffd_id)
                if not self._prefetching:
                    self.prefetched.set()
            elif ev.kind == "error":
                raise GfvmError(
                    f"the fault loop failed serving task {ctx.owner if ctx else '?'}: "
                    f"{os.strerror(ev.error)} (its faults wait in the uffd, held by the keeper)"
                )
            elif ev.kind == "fault":  # only with defer_missing, which this server never asks for
                raise GfvmError(f"the fault loop deferred a fault at {ev.start:#x} unexpectedly")

    # --- python engine: messages ------------------------------------------------------------------

    def _drain(self, ctx: _Ctx) -> None:
        """Reads and handles every message waiting on ctx's uffd."""
        while ctx.id in self._ctxs:
            try:
                msgs = ctx.uffd.read_events(MAX_MSGS)
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

    def _apply_events(self, ctx: _Ctx, msgs: list) -> list[int]:
        """Applies every non-fault event of a batch (in order) and returns the fault addresses."""
        faults = []
        for m in msgs:
            if isinstance(m, native.PageFault):
                faults.append(m.address & ~(PAGE_SIZE - 1))
                if self._exit_on_fault_in and self._exit_on_fault_in[0] <= m.address < self._exit_on_fault_in[1]:
                    os._exit(70)
                continue
            if isinstance(m, native.ForkEvent):
                kind = "fork"
                self._add_ctx(m.uffd, None, ctx.owner, state=ctx.pending.copy(), parent=ctx.id)
            elif isinstance(m, native.RemapEvent):
                kind = "remap"
                self._apply_event(ctx, {"kind": "remap", "src": m.start, "dst": m.to, "len": m.length})
            else:
                kind = "remove" if isinstance(m, native.RemoveEvent) else "unmap"
                self._apply_event(ctx, {"kind": kind, "start": m.start, "end": m.end})
            with self._lock:
                self._stats.events[kind] = self._stats.events.get(kind, 0) + 1
        return faults

    def _apply_event(self, ctx: _Ctx, ev: dict) -> None:
        self._journal({"op": "event", "ctx": ctx.id, **ev})
        self._apply_state_event(ctx.pending, ev)
        if ev["kind"] == "remove":
            # Like CRIU: the range no longer gets faults; the kernel maps zero pages there.
            try:
                ctx.uffd.unregister(ev["start"], ev["end"] - ev["start"])
            except OSError as exc:
                if exc.errno not in (errno.ENOMEM, errno.ESRCH, errno.EINVAL, errno.ENOENT):
                    raise

    # --- python engine: serving --------------------------------------------------------------------

    def _serve_fault(self, ctx: _Ctx, addr: int) -> None:
        with self._lock:
            self._stats.faults += 1
        for _ in range(100):
            done = self._serve(ctx, addr, self.batch_pages, fault=True)
            if done:
                return
            # EAGAIN with nothing done: an event is pending (mmap_changing); handle it and retry.
            more = self._apply_events(ctx, ctx.uffd.read_events(MAX_MSGS))
            for extra in more:
                if extra != addr:
                    self._serve_fault(ctx, extra)
            if ctx.id not in self._ctxs:
                return
        raise GfvmError(f"fault at {addr:#x} could not be served after 100 tries (events keep coming)")

    def _serve(self, ctx: _Ctx, addr: int, max_pages: int, *, fault: bool) -> int:
        """Fills pages from `addr` (at most max_pages, at least the first). Returns the number of
        pages handled, 0 when the kernel asked us to retry (a pending event). With fault=False
        (prefetch) pages without contents are skipped rather than zero-filled."""
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
                ctx.pending.remove(addr, addr + k * PAGE_SIZE)  # nothing to push; a fault zero-fills
                return k
            return self._fill_zero(ctx, addr, k)
        err, done = _uffd_call(ctx.uffd.copy, addr, memoryview(self._buf)[: k * PAGE_SIZE])
        return self._after_fill(ctx, addr, err, done, "images" if from_images else "source", fault)

    def _fill_zero(self, ctx: _Ctx, addr: int, k: int) -> int:
        err, done = _uffd_call(ctx.uffd.zeropage, addr, k * PAGE_SIZE)
        if err == errno.ENOENT and k > 1:  # the batch crossed a VMA boundary: one page only
            err, done = _uffd_call(ctx.uffd.zeropage, addr, PAGE_SIZE)
        return self._after_fill(ctx, addr, err, done, "zero", True)

    def _after_fill(self, ctx: _Ctx, addr: int, err: int, done: int, what: str, fault: bool) -> int:
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
            return pages  # a partial copy stops at a page that exists: fine, the first is served
        if err == errno.EAGAIN:
            return 0
        if err in (errno.EEXIST, errno.ENOENT):
            # EEXIST: the page is there already (another thread's fault, or a prefetch);
            # ENOENT: no registered VMA there any more. Either way nothing to fill: wake it.
            ctx.pending.remove(addr, addr + PAGE_SIZE)
            if fault:
                try:
                    ctx.uffd.wake(addr, PAGE_SIZE)
                except OSError:
                    pass
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

    # --- prefetch ----------------------------------------------------------------------------------

    def _wanted_ranges(self, ctx: _Ctx, ranges: list[tuple[int, int]] | None) -> list[tuple[int, int]]:
        if ranges is not None:
            return sorted((s - s % PAGE_SIZE, e) for s, e in ranges)
        mem = self._task_memory(ctx.owner)
        wanted = [(r.vaddr, r.end) for r in mem.runs if r.present]
        source_ranges = getattr(self.page_source, "ranges", None)
        if source_ranges is not None:
            wanted += list(source_ranges(ctx.owner))
        return sorted(wanted)

    def _queue_prefetch(self, inner_pid: int | None, ranges: list[tuple[int, int]] | None) -> None:
        targets = [c for c in self._ctxs.values() if inner_pid is None or c.owner == inner_pid]
        if self._loop is not None:
            # The loop pushes the pages itself, between faults, ordered with the events it reads;
            # a "prefetched" event per task says when it is done.
            for ctx in targets:
                if ctx.loop_id is None:
                    continue
                try:
                    self._loop.prefetch(ctx.loop_id, self._wanted_ranges(ctx, ranges))
                except (KeyError, ProcessLookupError):
                    continue  # gone meanwhile
                self._prefetching.add(ctx.loop_id)
            if not self._prefetching:
                self.prefetched.set()
            return
        for ctx in targets:
            for start, end in self._wanted_ranges(ctx, ranges):
                self._prefetch.append((ctx.id, start, end))
        if not self._prefetch:
            self.prefetched.set()

    def _prefetch_step(self) -> None:
        """Python engine: pushes at most one chunk of pages still missing (no fault is waiting)."""
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
            if done:
                self._prefetch[0] = (cid, addr + done * PAGE_SIZE, end)
            else:  # an event is pending: read it first
                self._drain(ctx)
            return
        self.prefetched.set()
