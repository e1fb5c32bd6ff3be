"""One managed process tree: its address spaces, dirty tracking, page-out, eviction, events.

A `ManagedTree` owns, for every process (address space, "asid" = pid inside the tree's PID
namespace) of the tree: a userfaultfd created inside that process (WP_ASYNC dirty tracking +
MISSING faults), its /proc/PID/pagemap fd and a pidfd; plus, for the whole tree, the paging file, a
native FaultLoop (serves missing pages from the paging file, applies REMOVE/UNMAP/REMAP to its C
indexes, reports events) and one worker thread that does everything else.

Threads: the worker thread is the only one that touches the tree's state. Other threads (trio via
trio.to_thread, the Pager) call `ManagedTree.call(fn)`, which runs fn on the worker and waits.
ptrace goes through the pager-wide native.Tracer (its own thread).

Dirty tracking: the kernel keeps a "written" bit per page (WP_ASYNC: a write to a protected page
unprotects it, nothing stops); the pager protects pages only when it needs to know whether they are
written again, because each protection costs the process one write fault (~1 us) and a TLB flush.
Ticks start every `interval` seconds; one that overran (a long page-out) is followed at once, so
a process that dirties memory faster than one interval's page-out keeps the pager busy instead of
idle for an interval after each tick. A probe is still judged at least an interval after it was
made: it is placed before the page-out of its tick. Per tick:
  1. events from the fault loop are applied (see `_on_event`);
  2. /proc/PID/maps is re-read and new private anonymous VMAs are registered MISSING|WP (pages
     present in a VMA that was just registered are unprotected, so they count as written: a late
     registration never loses a page);
  3. a read-only PAGEMAP_SCAN of the registered VMAs gives W, the present pages written since
     they were last protected. `dirty[vpage]` = the tick a page was first seen dirty;
  4. a newly dirty page is *probed*: protected now; if it is not in W at the next tick it is
     "cold dirty" and is paged out; if it was written again it is "hot" and waits, but no longer
     than `hot_bound` seconds after it was first seen dirty: then it is protected and paged out.
     A dirty page that is not in W (we protected it and its flush did not go through) is paged
     out at once. A page forced out while hot (at the bound, or by a flush_all) and written
     again by the next tick is presumed hot (no probe), so a page written all the time costs
     one protection per `hot_bound`.
     Recently hot pages dirtied again after a pause are probed by sample: the others wait one
     tick and follow the sample (presumed hot, or probed then; see `_flush_candidates`).
  Protection walks cover runs of pages joined across small gaps (`_protect`); a walk also
  protects the pages in those gaps that were written since their last protection. It reports
  them, and they become dirty (and probed, or paged out with the forced pages they sit among):
  every page we protect is either paged out after the protection or dirty in our books, so no
  write is lost.
Paging out: read the pages with process_vm_readv after they were protected (a write racing with the
read makes them written, hence dirty, again), write them to fresh slots, fsync, then index them: in
the C index of the fault loop and in the paging file's log (committed = fsynced).

The invariant that makes this safe against the process's own munmap / mremap / MADV_DONTNEED
(the fault loop applies those to its C index the moment it reads them): a page whose flush was in
flight when such an event touched it is not indexed (it stays dirty and is flushed again). The C
index numbers its range changes; the flush takes that number before reading, drains (and logs)
every event up to then, and stores the slots with `set_many(unless_changed_since=seq)`, which skips
atomically every page changed after it; only the pages stored are logged as PUT. So the file's log
has every event and PUT in the order the C index applied them. A forked child's C index is the
clone the loop made at the fork (FaultLoop.sources), updated and evicted like any other; only a
native layer without sources() leaves it without C updates (then its pages are not evicted and
its flushes are checked against the events drained after its read instead, `_index_batch`).

Events never drop dirtiness (a page written after a REMOVE must still be flushed): a dirty page that
turns out unmapped (read fails) or not present any more (scan) is dropped at flush time. REMAP moves
dirtiness to the new address and, when it may have raced with the scan, keeps it at the old one too.

Forks: the fault loop serves a forked child at once with a clone of the parent's C index; the
uffd message has no child pid. The child's file entries are cloned under a temporary asid
(TMP_ASID_BASE + n) at the point in the log where the fork happened, and renamed (CLONE + FORGET)
once the child's pid is known: the parent's children in /proc that are not yet known spaces, taken
in creation order (start time, then pid), are matched with unresolved fork events in the order the
events arrived.

Exec: the uffd's mm is gone while the pid lives on; noticed when PAGEMAP_SCAN fails on the old
pagemap fd. The address space is forgotten (its pages are useless) and a new uffd is injected.
Exit: the fault loop reports it (pidfd); the address space is forgotten.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import logging
import mmap
import os
import queue
import select
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gfvm import native
from gfvm.errors import GfvmError
from gfvm.pager import procfs
from gfvm.pager.pagefile import PAGE_SIZE, PagingFile, StagedPages
from gfvm.pager.state import SpaceRecord, TreeRecord

log = logging.getLogger("gfvm.pager")

PAGE_SHIFT = 12
TMP_ASID_BASE = 0x80000000  # asids of forked children whose pid is not known yet
USER_END = 0x7FFFFFFFF000  # end of the x86_64 user address space (scan everything below)


@dataclass
class PagerSettings:
    """Tunables (cluster.toml [pager] overrides them)."""

    interval: float = 0.2  #: seconds between dirty scans
    hot_bound: float = 2.0  #: a hot page is paged out after at most this long
    batch_pages: int = 2048  #: pages read and written per batch (8 MiB)
    window_pages: int = 64  #: pages the fault loop serves per fault
    evict_target: float = 0.9  #: with a memory limit, evict down to this fraction of it
    evict_max_ranges: int = 256  #: madvise ranges per injection stop


@dataclass
class Counters:
    pages_paged_out: int = 0
    bytes_paged_out: int = 0
    flushes: int = 0
    pages_evicted: int = 0
    evictions: int = 0
    rejected_pages: int = 0  #: flushed pages not indexed because an event raced with them
    scans: int = 0
    protections: int = 0  #: pages write-protected (each costs the process a fault if rewritten)
    last_scan_s: float = 0.0
    last_flush_s: float = 0.0


class AddressSpace:
    """One process of the tree as the pager tracks it. Touched only by the tree's worker."""

    def __init__(
        self,
        asid: int,
        host_pid: int,
        uffd: native.Userfaultfd,
        cindex: native.PageIndex,
        loop_id: int,
    ) -> None:
        self.asid = asid
        self.host_pid = host_pid
        self.start_time = procfs.start_time(host_pid)
        self.uffd = uffd
        self.cindex = cindex
        self.loop_id = loop_id
        self.pidfd = -1
        self.pagemap_fd = -1
        self.registered: set[tuple[int, int]] = set()  # VMA ranges registered MISSING|WP
        self.unregistrable: set[tuple[int, int]] = set()  # VMAs the kernel refused (logged once)
        self.dirty: dict[int, int] = {}  # vpage -> tick it was first seen dirty
        self.buckets: dict[int, set[int]] = {}  # tick -> vpages first seen dirty then (lazy:
        #                                         a member may have been cleaned or re-dirtied)
        self.probe: dict[int, int] = {}  # dirty vpage -> tick it was protected, or -1: found hot
        self.was_hot: dict[int, int] = {}  # vpage -> tick it was paged out at the hot bound
        #                      while hot (see _flush_candidates)
        self.sampled: tuple[set[int], set[int]] | None = None  # (probed sample, pages waiting
        #                      on it) of recently hot pages dirtied again at the last tick
        self.hot: set[int] = set()  # W: present pages written (unprotected) at the latest scan
        self.removed_since_flush = False  # a REMOVE/UNMAP happened: check presence at flush
        self.resolved = asid < TMP_ASID_BASE
        self.alive = True

    def add_dirty(self, pages: set[int], tick: int) -> None:
        """Pages newly seen dirty at `tick` (those already dirty keep their first tick)."""
        new = pages - self.dirty.keys()
        if new:
            self.dirty.update(dict.fromkeys(new, tick))
            self.buckets.setdefault(tick, set()).update(new)

    def set_dirty(self, vpage: int, tick: int) -> None:
        self.dirty[vpage] = tick
        self.buckets.setdefault(tick, set()).add(vpage)

    def clean(self, vpage: int) -> None:
        self.dirty.pop(vpage, None)
        self.probe.pop(vpage, None)

    def _live(self, tick: int) -> set[int]:
        live = {v for v in self.buckets[tick] if self.dirty.get(v) == tick}
        if live:
            self.buckets[tick] = live
        else:
            del self.buckets[tick]
        return live

    def oldest_tick(self) -> int | None:
        """The first tick of the oldest page that is dirty now."""
        for tick in sorted(self.buckets):
            bucket = self.buckets[tick]
            if any(self.dirty.get(v) == tick for v in bucket):
                return tick
            del self.buckets[tick]
        return None

    def due(self, upto_tick: int) -> set[int]:
        """Dirty pages first seen at or before `upto_tick`."""
        out: set[int] = set()
        for tick in [t for t in self.buckets if t <= upto_tick]:
            out |= self._live(tick)
        return out

    def open_fds(self) -> None:
        self.pidfd = native.pidfd_open(self.host_pid)
        self.pagemap_fd = native.open_pagemap(self.host_pid)

    def close(self) -> None:
        for name in ("pidfd", "pagemap_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        self.uffd.close()

    def record(self) -> SpaceRecord:
        return SpaceRecord(self.asid, self.host_pid, self.start_time)


@dataclass
class FlushResult:
    pages: int = 0
    bytes: int = 0
    seconds: float = 0.0
    rejected: int = 0


class TreeDead(GfvmError):
    """The managed tree has ended (or was stopped); the request cannot be served."""

    kind = "not-found"


@dataclass
class _Pending:
    """An unresolved fork: the child's space exists (tmp asid) but its pid is not known yet."""

    parent_asid: int
    space: AddressSpace
    since: float = field(default_factory=time.monotonic)


class ManagedTree:
    """A managed process tree and its worker thread (see the module header)."""

    def __init__(self, rec: TreeRecord, pf: PagingFile, ctx: Any) -> None:
        self.rec = rec
        self.pf = pf
        self.ctx = ctx  # the Pager: tracer, keeper, settings, state store
        self.settings: PagerSettings = ctx.settings
        self.loop = native.FaultLoop(window_pages=self.settings.window_pages)
        self.spaces: dict[int, AddressSpace] = {}  # asid -> space
        self.by_loop_id: dict[int, AddressSpace] = {}
        self.pending_forks: list[_Pending] = []
        self.counters = Counters()
        self.tick = 0
        self.tick_times: dict[int, float] = {}
        self.state = "starting"
        self.last_error: str | None = None
        self.limit_note: str | None = None
        self.exit_status: int | None = None
        self.main_pid: int | None = None  # host pid of the lowest asid, kept after it exits
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_lock = threading.Lock()
        self._writer = concurrent.futures.ThreadPoolExecutor(
            WRITES_IN_FLIGHT, thread_name_prefix=f"gfvm-write-{rec.id}"
        )
        self._read_bufs: list[mmap.mmap] = []  # see _flush_buffers
        self._processes_changed = False  # a fork child was identified since the last _publish
        self._thread: threading.Thread | None = None
        self._stop = False
        self._tmp_next = 0
        self._evict_cursor: dict[int, int] = {}
        self._published: dict = {}
        self._racing: list[tuple[str, int, int, int]] = []  # events popped during a flush
        #: a migration target's tree before the commit point (`owner` written): its processes
        #: are stopped and nothing may be written to the paging file, which the source may
        #: still take back (no ticks, no records, no final commit). See release_hold.
        self.held = False
        self.loop.start()

    # ------------------------------------------------------------------ worker thread plumbing

    def start(self) -> None:
        """Starts the worker thread (never blocks)."""
        self._thread = threading.Thread(
            target=self._run, name=f"gfvm-tree-{self.rec.id}", daemon=True
        )
        self._thread.start()

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Runs fn() on the worker thread and returns its result. Blocks until done."""
        if threading.current_thread() is self._thread:
            return fn()
        if self._stop or self._thread is None or not self._thread.is_alive():
            raise TreeDead(f"managed process {self.rec.id} is no longer tracked")
        done = threading.Event()
        box: dict[str, Any] = {}

        def job() -> None:
            try:
                box["result"] = fn()
            except BaseException as exc:  # handed to the caller
                box["error"] = exc
            finally:
                done.set()

        self._requests.put(job)
        self._poke()
        if not done.wait(timeout):
            raise TimeoutError(f"managed process {self.rec.id}: request timed out")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def post(self, fn: Callable[[], Any]) -> None:
        """Queues fn() for the worker without waiting for it. Never blocks."""
        self._requests.put(fn)
        self._poke()

    def _poke(self) -> None:
        with self._wake_lock:  # the fd is closed (and its number reusable) once the worker ends
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass

    def request_stop(self) -> None:
        """Asks the worker to stop tracking (the processes keep running). Never blocks."""
        self._stop = True
        self._poke()

    def worker_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        next_tick = time.monotonic()
        try:
            while not self._stop:
                timeout = max(0.0, next_tick - time.monotonic())
                try:
                    ready, _, _ = select.select(
                        [self._wake_r, self.loop.notify_fd], [], [], timeout
                    )
                except InterruptedError:
                    continue
                if self._wake_r in ready:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                self._run_requests()
                self._drain_events()
                if self._processes_changed:  # `gfvm status` lists them now, not a tick later
                    self._publish()
                if self.state == "ended":
                    break
                now = time.monotonic()
                if now >= next_tick:
                    self._safe_tick()
                    self._publish()
                    next_tick = max(now + self.settings.interval, time.monotonic())
            self._run_requests()
        finally:
            self._shutdown()

    def _run_requests(self) -> None:
        while True:
            try:
                job = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                job()
            except Exception:  # noqa: BLE001 - posted jobs report nothing to anyone
                log.exception("tree %s: posted job failed", self.rec.id)
            self._publish()

    def _safe_tick(self) -> None:
        try:
            self.run_tick()
        except Exception as exc:  # noqa: BLE001 - one bad tick must not end tracking
            self._error(f"tick failed: {exc!r}")
            log.exception("tree %s: tick failed", self.rec.id)

    def _error(self, msg: str) -> None:
        self.last_error = msg
        log.warning("tree %s: %s", self.rec.id, msg)

    # ------------------------------------------------------------------ status

    def _publish(self) -> None:
        """Makes a consistent picture of the tree for other threads (worker only)."""
        self._processes_changed = False
        spaces = [s for s in self.spaces.values() if s.resolved and s.alive]
        faults = copied = zero = 0
        for s in spaces:
            try:
                c = self.loop.counters(s.loop_id)
            except (KeyError, ValueError):
                continue
            faults += c.faults
            copied += c.pages_copied
            zero += c.pages_zero
        self._faults_base = getattr(self, "_faults_base", (0, 0, 0))
        self._published = {
            "state": self.state,
            "spaces": [
                {"asid": s.asid, "host_pid": s.host_pid}
                for s in sorted(spaces, key=lambda s: s.asid)
            ],
            "pids": [s.host_pid for s in spaces],
            "managed_bytes": sum(e - b for s in spaces for b, e in s.registered),
            "dirty_pages": self.dirty_pages(),
            "pages_paged_out": self.counters.pages_paged_out,
            "bytes_paged_out": self.counters.bytes_paged_out,
            "pages_in_file": self.pf.index.live_entries(),
            "pages_evicted": self.counters.pages_evicted,
            "flush_lag_s": self.flush_lag(),
            "faults_served": faults + self._faults_base[0],
            "pages_faulted_in": copied + self._faults_base[1],
            "pages_zero_filled": zero + self._faults_base[2],
            "last_error": self.last_error,
            "limit_note": self.limit_note,
            "counters": dict(vars(self.counters)),
        }

    def snapshot(self) -> dict:
        """The latest published picture plus the current RSS (any thread; reads /proc)."""
        snap = dict(self._published) or {
            "state": self.state,
            "spaces": [],
            "pids": [],
            "managed_bytes": 0,
            "dirty_pages": 0,
            "pages_paged_out": 0,
            "bytes_paged_out": 0,
            "pages_in_file": 0,
            "pages_evicted": 0,
            "flush_lag_s": None,
            "faults_served": 0,
            "pages_faulted_in": 0,
            "pages_zero_filled": 0,
            "last_error": self.last_error,
            "counters": {},
        }
        snap["state"] = self.state
        snap["last_error"] = self.last_error
        rss = 0
        for pid in snap["pids"]:
            try:
                rss += procfs.rss_bytes(pid)
            except ProcessLookupError:
                pass
        snap["rss"] = rss
        return snap

    # ------------------------------------------------------------------ attach

    def attach_space(
        self,
        host_pid: int,
        uffd: native.Userfaultfd,
        *,
        api_done: bool = False,
        asid: int | None = None,
        keeper_key: str | None = None,
        wake: bool = False,
        cindex: native.PageIndex | None = None,
    ) -> AddressSpace:
        """Starts tracking the process `host_pid` through `uffd`, a uffd created inside it.
        Runs on the worker. Order: API -> fault loop serves it -> keeper holds a copy ->
        registrations (a registered range is never without a server and a second holder)."""
        if not api_done:
            api = uffd.api(native.PAGER_FEATURES)
            missing = native.PAGER_FEATURES & ~api.features
            if missing:
                uffd.close()
                raise GfvmError(
                    f"this kernel's userfaultfd lacks features {missing:#x} "
                    "(WP_ASYNC, WP_UNPOPULATED, EVENT_FORK/REMAP/REMOVE/UNMAP are needed)"
                )
        if asid is None:
            asid = procfs.inner_pid(host_pid)
        if cindex is None:  # else: built ahead from the same file (a migration target)
            cindex = build_cindex(self.pf.index.entries(asid))
        space = AddressSpace(asid, host_pid, uffd, cindex, -1)
        space.open_fds()
        space.loop_id = self.loop.add(
            uffd,
            [native.Source(cindex, self.pf.pages_read_fd())],
            wp=True,
            pid=host_pid,
            pidfd=space.pidfd,
        )
        self._add_space(space)
        self._keep(space, keeper_key)
        self._register_vmas(space)
        if wake:
            self._wake_all(space)
        return space

    def take_back_space(
        self, host_pid: int, uffd: native.Userfaultfd, asid: int, *, api_done: bool = True,
        check_stale: bool = True, cindex: native.PageIndex | None = None,
    ) -> AddressSpace:
        """Takeover after a gfvmd restart: serve `uffd` again (waking every range), treat every
        present page as dirty (the previous gfvmd's dirty set is lost), and drop index entries of
        pages that are neither present nor released by us (the process removed them while the
        event was not yet logged). `check_stale=False` when no such event can exist (a restored
        process that has not run yet). Runs on the worker."""
        space = self.attach_space(host_pid, uffd, api_done=api_done, asid=asid, wake=True,
                                  cindex=cindex)
        present: set[int] = set()
        for region in native.scan_present(space.pagemap_fd, 0, USER_END):
            present.update(range(region.start >> PAGE_SHIFT, region.end >> PAGE_SHIFT))
        tracked = [(b >> PAGE_SHIFT, e >> PAGE_SHIFT) for b, e in space.registered]
        space.add_dirty({v for v in present if any(b <= v < e for b, e in tracked)}, self.tick)
        if not check_stale:
            self._wake_all(space)
            return space
        released = self.pf.index.released.get(asid, set())
        stale = [v for v in self.pf.index.entries(asid) if v not in present and v not in released]
        for v in stale:
            self.pf.drop(asid, v, 1)
            space.cindex.remove(v << PAGE_SHIFT)
        self.pf.commit()
        self._wake_all(space)
        return space

    def take_back_orphan(self, meta: dict, uffd: native.Userfaultfd, key: str) -> None:
        """Takeover of a forked child that the previous gfvmd had not identified yet."""
        parent = self.spaces.get(meta.get("parent", -1))
        if parent is None or not key.startswith("tmp"):
            uffd.close()
            self.ctx.keeper_drop(f"{self.rec.id}/{key}")
            return
        tmp = TMP_ASID_BASE + int(key[3:])
        self._tmp_next = max(self._tmp_next, tmp - TMP_ASID_BASE + 1)
        if not self.pf.index.entries(tmp):
            self.pf.clone(parent.asid, tmp)
        cindex = build_cindex(self.pf.index.entries(tmp))
        loop_id = self.loop.add(uffd, [native.Source(cindex, self.pf.pages_read_fd())], wp=True)
        child = _child_space(tmp, uffd, cindex, loop_id, parent)
        self._add_space(child)
        self.pending_forks.append(_Pending(parent.asid, child))
        self._resolve_forks()

    def rekeep(self) -> None:
        """Gives the keeper a copy of every uffd again (after the keeper was restarted)."""
        for space in list(self.spaces.values()):
            key = (
                self._keeper_key(space)
                if space.resolved
                else f"{self.rec.id}/tmp{space.asid - TMP_ASID_BASE}"
            )
            self.ctx.keeper_put(
                key,
                space.uffd.fileno(),
                {"host_pid": space.host_pid, "start_time": space.start_time, "asid": space.asid},
            )

    def _add_space(self, space: AddressSpace) -> None:
        self.spaces[space.asid] = space
        self.by_loop_id[space.loop_id] = space

    def _keeper_key(self, space: AddressSpace) -> str:
        return f"{self.rec.id}/{space.asid}"

    def _keep(self, space: AddressSpace, old_key: str | None = None) -> None:
        meta = {"host_pid": space.host_pid, "start_time": space.start_time, "asid": space.asid}
        self.ctx.keeper_put(self._keeper_key(space), space.uffd.fileno(), meta)
        if old_key and old_key != self._keeper_key(space):
            self.ctx.keeper_drop(old_key)
        if space.resolved:
            self._save_record()

    def _save_record(self) -> None:
        self.rec.spaces = [s.record() for s in self.spaces.values() if s.resolved]
        self.ctx.save_record(self.rec)

    def _wake_all(self, space: AddressSpace) -> None:
        """UFFDIO_WAKE over every tracked VMA: a dead predecessor may have read faults it never
        served, and those are never sent again."""
        for start, end in space.registered:
            try:
                space.uffd.wake(start, end - start)
            except OSError as exc:
                log.debug("wake %#x-%#x: %s", start, end, exc)

    def _register_vmas(self, space: AddressSpace) -> None:
        """Registers every private anonymous VMA not registered yet; forgets vanished ones."""
        vmas = procfs.tracked_vmas(space.host_pid)
        current = {(v.start, v.end) for v in vmas}
        for rng in sorted(current - space.registered - space.unregistrable):
            start, end = rng
            try:
                space.uffd.register(start, end - start, missing=True, wp=True)
            except OSError as exc:
                if exc.errno in (errno.ESRCH, errno.ENOMEM) and not _alive(space):
                    raise
                # EINVAL: the VMA changed under us (it will show up again) or cannot be tracked
                log.info(
                    "tree %s pid %d: cannot register %#x-%#x: %s",
                    self.rec.id,
                    space.host_pid,
                    start,
                    end,
                    exc,
                )
                space.unregistrable.add(rng)
                continue
            space.registered.add(rng)
        space.registered &= current
        space.unregistrable &= current

    # ------------------------------------------------------------------ events

    def _drain_events(self) -> None:
        for ev in self.loop.pop_events():
            try:
                self._on_event(ev)
            except Exception as exc:  # noqa: BLE001
                self._error(f"handling {ev.kind} event failed: {exc!r}")
                log.exception("tree %s: event %s", self.rec.id, ev)
        self._resolve_forks()

    def _on_event(self, ev: native.LoopEvent) -> None:
        space = self.by_loop_id.get(ev.uffd_id)
        if ev.kind == "fork":
            self._on_fork(space, ev)
            return
        if space is None:
            return
        if ev.kind in ("remove", "unmap"):
            if ev.evicted:  # our own eviction: the entries stay, the pages live in the file
                return
            self._racing.append((ev.kind, space.asid, ev.start, ev.end))
            self.pf.drop(space.asid, ev.start >> PAGE_SHIFT, (ev.end - ev.start) >> PAGE_SHIFT)
            space.removed_since_flush = True
            if ev.kind == "unmap":
                space.registered = {
                    r for r in space.registered if r[1] <= ev.start or r[0] >= ev.end
                }
        elif ev.kind == "remap":
            self._racing.append(("remap", space.asid, ev.start, ev.end))
            npages = (ev.end - ev.start) >> PAGE_SHIFT
            src, dst = ev.start >> PAGE_SHIFT, ev.to >> PAGE_SHIFT
            self.pf.move(space.asid, src, dst, npages)
            # The kernel moves the pages' protection with them; our dirty/probe state follows.
            moved = {
                v: space.dirty.pop(v) for v in [v for v in space.dirty if src <= v < src + npages]
            }
            for v, t in moved.items():
                space.set_dirty(v - src + dst, t)
            probed = {
                v: space.probe.pop(v) for v in [v for v in space.probe if src <= v < src + npages]
            }
            for v, t in probed.items():
                space.probe[v - src + dst] = t
            space.registered = {r for r in space.registered if r[1] <= ev.start or r[0] >= ev.end}
        elif ev.kind == "fault":
            # The loop defers nothing in our configuration; a deferred fault would wait forever.
            space.uffd.wake(ev.start & ~(PAGE_SIZE - 1), PAGE_SIZE)
        elif ev.kind == "exit":
            self._forget_space(space, "exited")
        elif ev.kind == "error" and ev.corrupt:
            # The page was poisoned, not served (the process gets SIGBUS if it touches it).
            self._fail_stop(
                f"page {ev.start:#x} of pid {space.host_pid} fails its checksum in the paging "
                f"file (slot {ev.slot}): not served"
            )
        elif ev.kind == "error":
            self._fail_stop(
                f"fault service for pid {space.host_pid} failed: "
                f"{os.strerror(ev.error) if ev.error else 'unknown error'}"
                f"{self._describe_fault(space, ev)}"
            )

    def _describe_fault(self, space: AddressSpace, ev: native.LoopEvent) -> str:
        """What a failed fault read: the window's first slot and the size of the file the loop
        reads (for the log of a fail-stop; never raises)."""
        try:
            where = ""
            addr = ev.start & ~(PAGE_SIZE - 1)
            if addr and space.cindex is not None:
                where = f"window at {addr:#x}, slot {space.cindex.get(addr)}; "
            st = os.fstat(self.pf.pages_read_fd())
            return (f" ({where}the local copy of pages read has {st.st_size // PAGE_SIZE} "
                    f"slots, inode {st.st_ino}, {st.st_nlink} links; "
                    f"{self.pf.stats()['slots']} slots known here)")
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            return f" (no details: {exc!r})"

    def _on_fork(self, parent: AddressSpace | None, ev: native.LoopEvent) -> None:
        if ev.uffd is None:
            return
        if parent is None or ev.child_id == 0:
            # The loop could not serve the child: without a server its missing pages would be
            # zeros once we drop the fd, so fail-stop the tree.
            ev.uffd.close()
            self._fail_stop("a forked child could not be served by the fault loop")
            return
        tmp = TMP_ASID_BASE + self._tmp_next
        self._tmp_next += 1
        self.pf.clone(parent.asid, tmp)
        child = _child_space(tmp, ev.uffd, None, ev.child_id, parent)
        self._add_space(child)
        child.cindex = self._child_index(child)
        self.ctx.keeper_put(
            f"{self.rec.id}/tmp{tmp - TMP_ASID_BASE}",
            child.uffd.fileno(),
            {"parent": parent.asid, "host_pid": 0},
        )
        self.pending_forks.append(_Pending(parent.asid, child))

    def _child_index(self, child: AddressSpace) -> native.PageIndex | None:
        """The C index the loop serves a forked child from (it cloned the parent's at the fork),
        or None when the native layer does not expose it (see the module header)."""
        sources = getattr(self.loop, "sources", None)
        if sources is None:
            return None
        return sources(child.loop_id)[0].index

    def _resolve_forks(self, *, settled: bool = False) -> None:
        """Matches unresolved fork children with the parent's new children in /proc. With
        `settled` (the tree is frozen: every fork has completed and its child is linked to its
        parent), a fork without a child left is over at once instead of after 5 s."""
        if not self.pending_forks:
            return
        known = {s.host_pid for s in self.spaces.values() if s.resolved}
        by_parent: dict[int, list[_Pending]] = {}
        for p in self.pending_forks:
            by_parent.setdefault(p.parent_asid, []).append(p)
        still: list[_Pending] = []
        for parent_asid, pendings in by_parent.items():
            parent = self.spaces.get(parent_asid)
            if parent is None:
                for p in pendings:
                    self._drop_unresolved(p, "its parent is gone")
                continue
            try:
                kids = [k for k in procfs.children(parent.host_pid) if k not in known]
                kids = [k for k in kids if procfs.tgid(k) == k]
                kids.sort(key=lambda k: (procfs.start_time(k), k))
            except ProcessLookupError:
                kids = []
            for p, kid in zip(pendings, kids, strict=False):
                self._resolve(p, kid)
            for p in pendings[len(kids) :]:
                if settled or time.monotonic() - p.since > 5.0:
                    # The child is gone (exited and reaped, or exec'd) before we saw it.
                    self._drop_unresolved(p, "the child vanished before it was identified")
                else:
                    still.append(p)
        self.pending_forks = still

    def _resolve(self, p: _Pending, host_pid: int) -> None:
        child = p.space
        tmp = child.asid
        try:
            asid = procfs.inner_pid(host_pid)
            child.host_pid = host_pid
            child.start_time = procfs.start_time(host_pid)
            child.open_fds()
        except (ProcessLookupError, OSError) as exc:
            self._drop_unresolved(p, f"child {host_pid}: {exc}")
            return
        self.pf.clone(tmp, asid)
        self.pf.forget(tmp)
        del self.spaces[tmp]
        child.asid = asid
        child.resolved = True
        child.registered = (
            set(self.spaces[p.parent_asid].registered) if p.parent_asid in self.spaces else set()
        )
        self._add_space(child)
        try:
            self.loop.set_process(child.loop_id, host_pid, child.pidfd)
        except OSError as exc:
            log.debug("set_process: %s", exc)
        self._keep(child, old_key=f"{self.rec.id}/tmp{tmp - TMP_ASID_BASE}")
        self._processes_changed = True
        log.info("tree %s: fork -> pid %d (inner %d)", self.rec.id, host_pid, asid)

    def _drop_unresolved(self, p: _Pending, why: str) -> None:
        log.info("tree %s: dropping an unresolved fork child: %s", self.rec.id, why)
        space = p.space
        self.pf.forget(space.asid)
        self._remove_from_loop(space)
        self.spaces.pop(space.asid, None)
        self.by_loop_id.pop(space.loop_id, None)
        self.ctx.keeper_drop(f"{self.rec.id}/tmp{space.asid - TMP_ASID_BASE}")
        space.close()

    def _remove_from_loop(self, space: AddressSpace) -> None:
        try:
            self.loop.remove(space.loop_id)
        except (KeyError, OSError):
            pass

    def _forget_space(self, space: AddressSpace, why: str) -> None:
        """The process exited (or exec'd): its pages are useless, drop everything. While the tree
        is released for a migration the paging file is left alone (the process lives on
        elsewhere; CRIU's dump ends it here)."""
        log.info("tree %s: pid %d (inner %d) %s", self.rec.id, space.host_pid, space.asid, why)
        space.alive = False
        if self.state != "released" and not self.held:
            self.pf.forget(space.asid)
        self._remove_from_loop(space)
        self.spaces.pop(space.asid, None)
        self.by_loop_id.pop(space.loop_id, None)
        self.ctx.keeper_drop(self._keeper_key(space))
        space.close()
        self._save_record()

    # ------------------------------------------------------------------ the tick

    def run_tick(self) -> None:
        """One interval: events, new VMAs, scan, page out cold dirty pages, enforce the limit.
        Runs on the worker (blocking). Does nothing while the tree is released for a migration
        or held before a migration's commit point."""
        if self.state == "released" or self.held:
            return
        self.tick += 1
        now = time.monotonic()
        self.tick_times[self.tick] = now
        for space in list(self.spaces.values()):
            if not space.resolved or not space.alive:
                continue
            try:
                self._check_exec(space)
                if not space.alive:
                    continue
                self._register_vmas(space)
                self._scan(space)
            except ProcessLookupError:
                self._forget_space(space, "exited")
        self._drain_events()
        for space in list(self.spaces.values()):
            if space.resolved and space.alive:
                try:
                    self._flush_space(space, self._flush_candidates(space))
                except ProcessLookupError:
                    self._forget_space(space, "exited")
        self.pf.commit()
        if self.rec.mem_limit:
            self._enforce_limit()
        self._check_tree_alive()
        first = min(
            (t for sp in self.spaces.values() if (t := sp.oldest_tick()) is not None),
            default=self.tick,
        )
        for t in [t for t in self.tick_times if t < first]:
            del self.tick_times[t]
        if self.state == "starting":
            self.state = "running"

    def _check_exec(self, space: AddressSpace) -> None:
        """Raises ProcessLookupError when the process is gone or exiting; re-attaches it when
        it exec'd (its old mm is gone while it lives on with a new one)."""
        if procfs.start_time(space.host_pid) != space.start_time:
            raise ProcessLookupError(space.host_pid)
        try:
            native.scan_written(
                space.pagemap_fd, 0, PAGE_SIZE, reprotect=False, check_wpasync=False
            )
        except OSError as exc:
            # An exiting process drops its mm before it becomes a zombie: not an exec.
            if exc.errno != errno.ESRCH or not _alive(space) or procfs.is_exiting(space.host_pid):
                raise ProcessLookupError(space.host_pid) from None
            self._on_exec(space)

    def _on_exec(self, space: AddressSpace) -> None:
        """The process exec'd: the old address space (and its uffd) is gone. Track the new one."""
        host_pid, asid = space.host_pid, space.asid
        self._forget_space(space, "exec'd a new program")
        try:
            uffd = self.ctx.tracer.inject_userfaultfd(host_pid)
        except ProcessLookupError:
            return  # it exited meanwhile
        except OSError as exc:
            self._error(f"pid {host_pid} exec'd and could not be re-attached: {exc}")
            return
        self.attach_space(host_pid, uffd, asid=asid)

    def _scan(self, space: AddressSpace) -> None:
        """W := present pages written since last protected (read-only scan); new ones are dirty."""
        t0 = time.monotonic()
        written: set[int] = set()
        for start, end in sorted(space.registered):
            for first, last in _written_present(space, start, end, reprotect=False):
                written.update(range(first, last))
        space.add_dirty(written, self.tick)
        space.hot = written
        self.counters.scans += 1
        self.counters.last_scan_s = time.monotonic() - t0

    def _protect(self, space: AddressSpace, vpages: Iterable[int]) -> set[int]:
        """Write-protects the pages; a later write makes them written again. A range that
        vanished meanwhile is skipped (the scan walks only what is mapped and registered).

        Each walk is one ioctl and, while the process runs on another CPU, one TLB-flush IPI
        to it per page table touched: pages scattered by random writes made thousands of walks
        per tick. So runs closer than PROTECT_GAP_PAGES, with at most PROTECT_GAP_WRITTEN pages
        of W between them, are protected in one walk. The walk protects every page written
        since its last protection in the range, so it may protect pages it was not asked to:
        those it reports are returned (present ones only: the others hold nothing) and are
        made dirty at this tick here, so that no write is ever lost from the books; the caller
        decides whether they are probed or paged out."""
        wanted = vpages if isinstance(vpages, (set, frozenset)) else set(vpages)
        extra: set[int] = set()
        for start, end in _protect_ranges(sorted(wanted), space.hot):
            for first, last in _written_present(space, start, end, reprotect=True):
                if last - first == 1:
                    if first not in wanted:
                        extra.add(first)
                else:
                    extra.update(v for v in range(first, last) if v not in wanted)
        if extra:
            space.add_dirty(extra, self.tick)
        self.counters.protections += len(wanted) + len(extra)
        return extra

    def _flush_candidates(self, space: AddressSpace) -> list[int]:
        """Probes new dirty pages, judges probed ones, and returns the (protected) pages to page
        out now: cold ones and those dirty for longer than the hot bound (see module header).
        Set operations only: this runs every tick over every dirty page."""
        bound_ticks = max(1, round(self.settings.hot_bound / self.settings.interval))
        written = space.hot
        probe = space.probe
        probed = {v for v, st in probe.items() if st >= 0}
        hot = probed & written
        probe.update(dict.fromkeys(hot, -1))  # written again since the probe
        cold = probed - written
        unprobed = space.dirty.keys() - probe.keys()
        to_probe = unprobed & written
        leftover = unprobed - written  # protected by us and not written since (flush failed)
        # Pages forced out at the bound while hot are remembered in was_hot (vpage -> tick).
        # One written again by the very next tick showed it is still hot (the forced protection
        # was its probe): presumed hot, no probe (each probe costs the process a write fault),
        # it goes out at the next bound. Recently hot pages dirtied again after a pause are
        # probed by sample (see SAMPLE_*): the others wait one tick and are presumed hot if
        # most of the sample was written again, else probed then. was_hot forgets a page once
        # it has stayed clean for two hot bounds (checked once per bound).
        was_hot = space.was_hot
        if self.tick % bound_ticks == 0:
            dirty = space.dirty
            space.was_hot = was_hot = {
                v: t for v, t in was_hot.items() if v in dirty or self.tick - t < 2 * bound_ticks
            }
        presumed_hot: set[int] = set()
        waited: set[int] = set()
        if space.sampled is not None:  # last tick's deferred pages: judged by their sample
            sample, waited = space.sampled
            space.sampled = None
            waited &= to_probe  # still dirty, unprobed, written
            judged = sample & probed
            if waited and judged and 2 * len(judged & written) >= len(judged):
                presumed_hot |= waited
        recent = (to_probe - waited) & was_hot.keys()  # a page waits at most one tick
        if recent:
            tick = self.tick
            presumed_hot |= {v for v in recent if was_hot[v] == tick - 1}
            paused = recent - presumed_hot
            if len(paused) >= SAMPLE_MIN_PAGES:
                sample = {v for v in paused if not (v >> SAMPLE_BLOCK_SHIFT) % SAMPLE_EVERY}
                if sample:
                    deferred = paused - sample
                    to_probe -= deferred
                    space.sampled = (sample, deferred)
        probe.update(dict.fromkeys(presumed_hot, -1))
        to_probe -= presumed_hot
        forced = space.due(self.tick - bound_ticks) & written
        to_probe -= forced
        if forced:
            # Pages protected along with them (see _protect) are dirty and protected: they go
            # out now too, which also puts interleaved hot pages on one bound cycle.
            forced |= self._protect(space, forced)
            to_probe -= forced
        if to_probe:
            to_probe |= self._protect(space, to_probe) - forced  # protected along: probed
        # Protected now: if a flush does not index one (an event raced with it), it is judged
        # cold at the next tick and flushed again.
        probe.update(dict.fromkeys(to_probe | forced, self.tick))
        for v in cold & was_hot.keys():
            del was_hot[v]
        was_hot.update(dict.fromkeys(forced, self.tick))
        return sorted(cold | leftover | forced)

    # ------------------------------------------------------------------ paging out

    def _flush_space(self, space: AddressSpace, vpages: list[int]) -> FlushResult:
        """Pages out `vpages` (sorted) of one space: read, write, fsync, index. Not committed."""
        result = FlushResult()
        if not vpages:
            return result
        t0 = time.monotonic()
        if space.removed_since_flush:
            vpages = self._present_only(space, vpages)
            space.removed_since_flush = False
        # Order matters: the change number first, then every event up to it is logged; a page an
        # event touches after this point will not be indexed from this read.
        seq = space.cindex.change_seq if space.cindex is not None else None
        self._drain_events_only()
        self._racing = []
        staged_all: list[StagedPages] = []
        batch = self.settings.batch_pages
        # Pipelined: up to WRITES_IN_FLIGHT batches are being written by the writer threads
        # while this thread reads and checksums the next one (pwritev, the File Manager's
        # replicated writes and crc32_pages release the GIL). A buffer is reused only once
        # the write of its batch has returned.
        nbufs = WRITES_IN_FLIGHT + 1
        bufs = self._flush_buffers(min(batch, len(vpages)) * PAGE_SIZE, nbufs)
        writes: list[Any] = [None] * nbufs
        try:
            for n, i in enumerate(range(0, len(vpages), batch)):
                b = n % nbufs
                if writes[b] is not None:
                    writes[b].result()
                    writes[b] = None
                ok, data = self._read_pages(space, vpages[i : i + batch], bufs[b])
                if ok:
                    crcs = native.crc32_pages(data, len(ok))  # in C, without the GIL
                    staged, write = self.pf.prepare(space.asid, ok, data, crcs)
                    staged_all.append(staged)
                    writes[b] = self._writer.submit(write)
        finally:
            for w in writes:
                if w is not None:
                    w.result()
        if not staged_all:
            return result
        self.pf.sync_pages()
        for staged in staged_all:
            accepted = self._index_batch(space, staged, seq)
            result.pages += len(accepted)
            result.rejected += len(staged.vpages) - len(accepted)
        result.bytes = result.pages * PAGE_SIZE
        result.seconds = time.monotonic() - t0
        self.counters.pages_paged_out += result.pages
        self.counters.bytes_paged_out += result.bytes
        self.counters.rejected_pages += result.rejected
        self.counters.flushes += 1
        self.counters.last_flush_s = result.seconds
        return result

    def _flush_buffers(self, size: int, count: int) -> list[mmap.mmap]:
        """`count` read buffers for _flush_space, at least `size` bytes each. Kept from one
        flush to the next (at most (WRITES_IN_FLIGHT + 1) x batch_pages pages per tree): fresh
        ones cost the kernel a fault and a zeroed page for every 4 KiB at each flush (~7 ms per
        16 MiB here), and memory the guest has not used lately is slower still. Worker only."""
        if len(self._read_bufs) < count or len(self._read_bufs[0]) < size:
            # the old ones are unmapped once no view of them is left
            self._read_bufs = [mmap.mmap(-1, size) for _ in range(count)]
        return self._read_bufs

    def _present_only(self, space: AddressSpace, vpages: list[int]) -> list[int]:
        """Drops from `vpages` (and from dirty) the pages that are no longer present."""
        lo, hi = vpages[0] << PAGE_SHIFT, (vpages[-1] + 1) << PAGE_SHIFT
        present: set[int] = set()
        for region in native.scan_present(space.pagemap_fd, lo, hi):
            present.update(range(region.start >> PAGE_SHIFT, region.end >> PAGE_SHIFT))
        keep = [v for v in vpages if v in present]
        for v in vpages:
            if v not in present:
                space.clean(v)
        return keep

    def _read_pages(
        self, space: AddressSpace, vpages: list[int], buf: bytearray
    ) -> tuple[list[int], memoryview]:
        """process_vm_readv of the pages; unreadable ones (unmapped) are skipped and forgotten."""
        ok: list[int] = []
        view = memoryview(buf)
        pos = 0
        todo = vpages
        while todo:
            target = view[pos * PAGE_SIZE :]
            try:
                got = native.read_pages(space.host_pid, [v << PAGE_SHIFT for v in todo], target)
            except OSError as exc:
                if exc.errno == errno.ESRCH:
                    raise ProcessLookupError(space.host_pid) from None
                if exc.errno != errno.EFAULT:
                    raise
                got = 0
            n = got // PAGE_SIZE
            ok += todo[:n]
            pos += n
            if n < len(todo):  # todo[n] cannot be read: unmapped since the scan
                space.clean(todo[n])
                todo = todo[n + 1 :]
            else:
                todo = []
        return ok, view[: pos * PAGE_SIZE]

    def _index_batch(self, space: AddressSpace, staged: StagedPages, seq: int | None) -> list[int]:
        """Indexes a durable staged batch, except pages an event may have raced with (they stay
        dirty). Returns the accepted vpages (no longer dirty unless written again)."""
        accepted: list[int] | None  # positions in the batch; None: all (the usual case)
        if space.cindex is not None:
            addresses = [v << PAGE_SHIFT for v in staged.vpages]
            try:
                skipped = space.cindex.set_many(
                    addresses,
                    staged.slots,
                    crcs=staged.crcs,  # the fault loop verifies them before serving
                    unless_changed_since=seq,
                )
            except OSError as exc:
                if exc.errno != errno.ESTALE:
                    raise
                skipped = addresses  # too much changed: retry later
            if skipped:
                skip = set(skipped)
                accepted = [i for i, a in enumerate(addresses) if a not in skip]
            else:
                accepted = None
        else:
            self._drain_events_only()
            raced = set(self._touched(space, self._racing))
            accepted = [i for i, v in enumerate(staged.vpages) if v not in raced]
        self.pf.put(staged, accepted)
        vpages = staged.vpages if accepted is None else [staged.vpages[i] for i in accepted]
        # No longer dirty (space.clean, inlined: this runs for every page paged out). Written
        # after its protection? Then the next scan sees it again.
        dirty_pop, probe_pop = space.dirty.pop, space.probe.pop
        for v in vpages:
            dirty_pop(v, None)
            probe_pop(v, None)
        return vpages

    def _drain_events_only(self) -> None:
        for ev in self.loop.pop_events():
            try:
                self._on_event(ev)
            except Exception as exc:  # noqa: BLE001
                self._error(f"handling {ev.kind} event failed: {exc!r}")

    @staticmethod
    def _touched(space: AddressSpace, events: Iterable[tuple[str, int, int, int]]) -> Iterable[int]:
        for _kind, asid, start, end in events:
            if asid == space.asid:
                yield from range(start >> PAGE_SHIFT, end >> PAGE_SHIFT)

    # ------------------------------------------------------------------ flush_all (migration)

    def flush_all(self) -> FlushResult:
        """Pages out every dirty page of every process of the tree and commits the index.
        Runs on the worker. With the tree frozen, the paging file then equals the memory of
        every tracked page (pages never written are not in the file and read as zeros)."""
        total = FlushResult()
        t0 = time.monotonic()
        self.loop.sync()  # events the (frozen) processes completed are applied and queued
        self._drain_events()
        for space in list(self.spaces.values()):
            if not space.resolved or not space.alive:
                continue
            try:
                self._register_vmas(space)
                self._scan(space)
                self._protect(space, space.hot)  # pages written since the scan: dirty too
                # forced out while hot, as at the hot bound: written again by the next tick,
                # they are presumed hot, not probed (a probe costs the process a write fault)
                space.was_hot.update(dict.fromkeys(space.hot, self.tick))
                space.hot = set()  # everything is protected now
                space.probe.clear()
                space.sampled = None
                r = self._flush_space(space, sorted(space.dirty))
            except ProcessLookupError:
                self._forget_space(space, "exited")
                continue
            total.pages += r.pages
            total.bytes += r.bytes
            total.rejected += r.rejected
        self.pf.commit()
        total.seconds = time.monotonic() - t0
        return total

    def dirty_pages(self) -> int:
        return sum(len(s.dirty) for s in self.spaces.values())

    def flush_lag(self) -> float | None:
        """Seconds since the oldest page that is dirty now was first written (None: clean)."""
        first = min(
            (t for sp in self.spaces.values() if (t := sp.oldest_tick()) is not None), default=None
        )
        if first is None:
            return None
        return time.monotonic() - self.tick_times.get(first, time.monotonic())

    # ------------------------------------------------------------------ eviction (--mem-limit)

    def rss(self) -> int:
        total = 0
        for s in self.spaces.values():
            if s.resolved and s.alive:
                try:
                    total += procfs.rss_bytes(s.host_pid)
                except ProcessLookupError:
                    pass
        return total

    def _enforce_limit(self) -> None:
        limit = self.rec.mem_limit
        rss = self.rss()
        if not limit or rss <= limit:
            self.limit_note = None
            return
        want = (rss - int(limit * self.settings.evict_target)) // PAGE_SIZE
        evicted = 0
        if any(_frozen(s.host_pid) for s in self.spaces.values() if s.resolved):
            return  # frozen (a migration is under way): nothing runs, nothing to inject into
        for space in sorted(
            self.spaces.values(), key=lambda s: -len(self.pf.index.entries(s.asid))
        ):
            if evicted >= want:
                break
            if space.resolved and space.alive:
                evicted += self._evict(space, want - evicted)
        # Pages written recently are not in the paging file yet: they can go once paged out.
        self.limit_note = (
            None
            if evicted >= want
            else (
                f"over the memory limit: evicted {evicted} of {want} pages (rss {rss >> 20} MiB, "
                f"limit {limit >> 20} MiB); the rest is dirty or untracked for now"
            )
        )

    def evict(self, max_pages: int | None = None) -> int:
        """Drops up to `max_pages` (default: all) clean pages that are in the paging file from
        the processes' memory, now; they come back on fault. Returns the number dropped. Worker."""
        total = 0
        for space in list(self.spaces.values()):
            if space.resolved and space.alive:
                want = (max_pages - total) if max_pages is not None else 1 << 40
                if want <= 0:
                    break
                total += self._evict(space, want)
        return total

    def _present_pages(self, space: AddressSpace, ranges: Iterable[tuple[int, int]]) -> set[int]:
        present: set[int] = set()
        for start, end in ranges:
            for region in native.scan_present(space.pagemap_fd, start, end):
                present.update(range(region.start >> PAGE_SHIFT, region.end >> PAGE_SHIFT))
        return present

    def _evict(self, space: AddressSpace, want: int) -> int:
        """Drops up to `want` clean indexed pages of one process from its memory (they come back
        on fault from the paging file). Returns the number dropped. Runs on the worker."""
        if space.cindex is None:
            return 0  # a forked child whose C index we cannot update (module header)
        entries = self.pf.index.entries(space.asid)
        present = self._present_pages(space, sorted(space.registered))
        candidates = sorted(
            v for v in present if v in entries and v not in space.dirty and v not in space.hot
        )
        if not candidates:
            return 0
        # Round-robin over the address space: start where the last eviction stopped.
        cursor = self._evict_cursor.get(space.asid, 0)
        start_at = next((i for i, v in enumerate(candidates) if v >= cursor), 0)
        picked = (candidates[start_at:] + candidates[:start_at])[:want]
        ranges = _runs_to_ranges(sorted(picked))[: self.settings.evict_max_ranges]
        # With every thread stopped: keeps pages written since the scan, announces the eviction
        # (the loop keeps the entries on our REMOVE events), injects DONTNEED, re-arms tracking.
        ranges = native.evict_pages(
            self.ctx.tracer,
            space.host_pid,
            ranges,
            loop=self.loop,
            uffd_id=space.loop_id,
            uffd=space.uffd,
            index=space.cindex,
        )
        if not ranges:
            return 0
        n = 0
        for a, b in ranges:
            self.pf.mark_released(space.asid, a >> PAGE_SHIFT, (b - a) >> PAGE_SHIFT)
            n += (b - a) >> PAGE_SHIFT
        self._evict_cursor[space.asid] = ranges[-1][1] >> PAGE_SHIFT
        self.counters.pages_evicted += n
        self.counters.evictions += 1
        self.pf.commit()
        return n

    # ------------------------------------------------------------------ migration hand-off

    def release_cold(self, chunk_pages: int = 16384) -> int:
        """Before a migration's freeze, while the tree runs: drops from memory every page that
        is clean (in the paging file, not dirty, not hot), in chunks of at most `chunk_pages`
        (each chunk stops the process for one injected madvise). What the process touches
        again comes back from the local paging file. Makes the release during the freeze
        proportional to the recently written pages instead of the whole memory. Returns the
        pages dropped. Worker only."""
        total = 0
        self._drain_events()
        for space in list(self.spaces.values()):
            if not space.resolved or not space.alive or space.cindex is None:
                continue
            entries = self.pf.index.entries(space.asid)
            present = self._present_pages(space, sorted(space.registered))
            candidates = sorted(
                v for v in present if v in entries and v not in space.dirty and v not in space.hot
            )
            runs = _runs_to_ranges(candidates)
            chunk: list[tuple[int, int]] = []
            pages = 0
            for i, (a, b) in enumerate(runs):
                while a < b:
                    take = min(b - a, (chunk_pages - pages) << PAGE_SHIFT)
                    chunk.append((a, a + take))
                    pages += take >> PAGE_SHIFT
                    a += take
                    if pages >= chunk_pages or (a >= b and i == len(runs) - 1):
                        total += self._release_chunk(space, chunk)
                        chunk, pages = [], 0
            if chunk:
                total += self._release_chunk(space, chunk)
        self.pf.commit()
        self.counters.pages_evicted += total
        return total

    def _release_chunk(self, space: AddressSpace, ranges: list[tuple[int, int]]) -> int:
        try:
            runs = native.evict_pages(
                self.ctx.tracer, space.host_pid, ranges, loop=self.loop, uffd_id=space.loop_id,
                uffd=space.uffd, index=space.cindex,
            )
        except ProcessLookupError:
            return 0
        n = 0
        for a, b in runs:
            self.pf.mark_released(space.asid, a >> PAGE_SHIFT, (b - a) >> PAGE_SHIFT)
            n += (b - a) >> PAGE_SHIFT
        return n

    def release_memory(self) -> int:
        """Migration step 5: with the tree frozen and flushed, drops every tracked page from the
        processes' memory so that CRIU does not dump it. Indexed pages are logged RELEASED (the
        target serves them from the paging file). Tracking pauses until `reattach()` (rollback)
        or the Pager's hand_over(). Refuses while dirty pages remain. Returns the pages dropped.
        Worker only.

        The pages are evicted like the memory limit does it (native.evict_pages: the loop is
        told to keep their index entries on our own REMOVE events) and the ranges stay
        registered: the kernel itself writes into the process's memory while it is frozen (the
        rseq area in the TLS page, on every return to user mode, e.g. after each injected
        syscall); such a write must fault the page back in from the paging file, never land on
        a fresh zero page. Pages that come back that way are simply dumped by CRIU."""
        self.loop.sync()
        self._drain_events()
        self._resolve_forks(settled=True)  # a child that exited meanwhile has nothing to move
        dirty = self.dirty_pages()
        if dirty:
            raise GfvmError(
                f"{dirty} dirty pages are not in the paging file yet: flush_all first "
                "(with the tree frozen)"
            )
        plan = []
        for space in list(self.spaces.values()):
            if not space.resolved or not space.alive:
                continue
            ranges = sorted(space.registered)
            present = self._present_pages(space, ranges)
            entries = self.pf.index.entries(space.asid)
            missing = [v for v in present if v not in entries and not _zero_page(space, v)]
            if missing:
                raise GfvmError(
                    f"pid {space.host_pid}: {len(missing)} written pages are not in the "
                    "paging file (the tree is not frozen?)"
                )
            if space.cindex is None:
                # A forked child: its loop still serves from the index cloned at the fork. Give
                # it one built from the file (the tree is frozen: no event can race this), so
                # that what comes back from now on is the file's current content.
                space.cindex = build_cindex(entries)
                self.loop.set_sources(
                    space.loop_id, [native.Source(space.cindex, self.pf.pages_read_fd())]
                )
            # Only what is present needs dropping (release_cold took the rest out already):
            # the work here is proportional to that, not to the whole address space.
            plan.append((space, _runs_to_ranges(sorted(present))))
        by_pid = {space.host_pid: (space, ranges) for space, ranges in plan}
        self.state = "released"

        def evict(pid: int) -> list[tuple[int, int]]:
            space, ranges = by_pid[pid]
            # Each thread's rseq area stays: the kernel writes it on the way back to user mode
            # and CRIU reads it with ptrace (which cannot wait for a uffd fault).
            keep = set()
            for tid in self.ctx.tracer.stopped_threads(pid):
                area = self.ctx.tracer.rseq_area(tid)
                if area is not None:
                    a, n = area
                    keep.update(range(a - a % PAGE_SIZE, a + n, PAGE_SIZE))
            ranges = _minus_pages(ranges, keep)
            return native.evict_pages(
                self.ctx.tracer, pid, ranges, loop=self.loop, uffd_id=space.loop_id,
                uffd=space.uffd, index=space.cindex, rearm_wp=False,
            )

        try:
            # Every process in one ptrace stop and one thaw window: toggling the freezer once
            # per process lets the others run between two windows and race the next stop.
            evicted = inject_many_while_frozen(self.ctx.tracer, list(by_pid), evict)
        except BaseException:
            self.state = "running"  # nothing was unregistered: missing pages are served again
            raise
        # Pages dropped earlier (release_cold, the memory limit) carry write-protect markers,
        # which /proc/PID/pagemap shows as swapped pages: CRIU would dump them, faulting every
        # one back in. Tracking pauses anyway: unprotect everything (what is still present then
        # counts as written: flushed again after a rollback, harmless).
        for space, _ in plan:
            for start, end in sorted(space.registered):
                try:
                    space.uffd.writeprotect(start, end - start, protect=False)
                except OSError as exc:
                    log.debug("unprotect %#x-%#x: %s", start, end, exc)
        dropped = 0
        for (space, _), runs in zip(plan, evicted, strict=True):
            for a, b in runs:
                self.pf.mark_released(space.asid, a >> PAGE_SHIFT, (b - a) >> PAGE_SHIFT)
                dropped += (b - a) >> PAGE_SHIFT
        self.pf.commit()
        return dropped

    def hold(self) -> None:
        """A migration target's adopted tree, before its commit point: the paging file is left
        exactly as the source wrote it (see `held`). Worker only."""
        self.held = True
        self.pf.held = True

    def release_hold(self) -> None:
        """The migration committed (`owner` names this node): records buffered while held are
        committed and tracking starts; the pages present count as dirty since the adoption and
        are flushed by the next ticks. Worker only."""
        self.held = False
        self.pf.held = False
        self.pf.commit()

    def reattach(self) -> None:
        """Rollback of release_memory (migration failed before the target ran the process):
        tracking resumes; the released pages, still registered, come back from the paging file
        on fault. Worker only."""
        if self.state != "released":
            raise GfvmError("reattach: the tree was not released")
        # While the target was the files' master, this node's File Manager may have replaced
        # or resynced its copies: the fault loop must read the copy the files are now, through
        # a new descriptor, and the index must be the one this tracker wrote.
        repaired = self.pf.reopen()
        if repaired:
            log.warning("tree %s: %s", self.rec.id, repaired)
        fd = self.pf.pages_read_fd()
        for space in list(self.spaces.values()):
            if space.loop_id in self.by_loop_id and space.cindex is not None:
                self.loop.set_sources(space.loop_id, [native.Source(space.cindex, fd)])
        for space in list(self.spaces.values()):
            if space.resolved and _alive(space):
                self._register_vmas(space)  # VMAs that appeared meanwhile (none while frozen)
        self.state = "running"

    # ------------------------------------------------------------------ life and death

    def check_ended(self) -> None:
        """Marks the tree ended once its init and every tracked process are gone (worker)."""
        for space in list(self.spaces.values()):
            if space.resolved and not _alive(space):
                self._forget_space(space, "exited")
        self._check_tree_alive()

    def _check_tree_alive(self) -> None:
        if not _pid_matches(self.rec.init_pid, self.rec.init_start_time) and not self.spaces:
            self.state = "ended"

    def _fail_stop(self, why: str) -> None:
        """The tree can no longer be served truthfully: kill it rather than let it run on wrong
        memory."""
        self._error(f"fail-stop: {why}")
        self.ctx.kill_tree(self.rec)
        self.state = "killed"

    def _shutdown(self) -> None:
        """Stops the fault loop and closes our fds (the keeper's copies keep the uffds alive
        unless the tree ended)."""
        self._writer.shutdown(wait=True)
        self._read_bufs = []
        try:
            self.loop.close()
        except Exception:  # noqa: BLE001
            log.exception("closing the fault loop")
        for space in list(self.spaces.values()):
            space.close()
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = -1
        if self.held:
            return  # never committed: the files stay the source's, untouched
        try:
            self.pf.commit()
        except Exception:  # noqa: BLE001
            log.exception("final commit")


def build_cindex(entries: dict[int, int]) -> native.PageIndex:
    """The fault loop's index of one address space from the paging file's {vpage: slot << 32 |
    crc}, checksums included (the loop verifies them before serving a page)."""
    cindex = native.PageIndex(len(entries))
    if entries:
        packed = list(entries.values())
        cindex.set_many(
            [v << PAGE_SHIFT for v in entries],
            [p >> 32 for p in packed],
            crcs=[p & 0xFFFFFFFF for p in packed],
        )
    return cindex


def _child_space(
    tmp: int, uffd: native.Userfaultfd, cindex: Any, loop_id: int, parent: AddressSpace
) -> AddressSpace:
    space = AddressSpace.__new__(AddressSpace)
    space.asid = tmp
    space.host_pid = 0
    space.start_time = 0
    space.uffd = uffd
    space.cindex = cindex
    space.loop_id = loop_id
    space.pidfd = -1
    space.pagemap_fd = -1
    space.registered = set(parent.registered)
    space.unregistrable = set(parent.unregistrable)
    space.dirty = dict(parent.dirty)  # the child's memory is the parent's: same pages unflushed
    space.buckets = {t: set(b) for t, b in parent.buckets.items()}
    space.probe = dict(parent.probe)
    space.was_hot = dict(parent.was_hot)
    space.sampled = None  # its pages waiting on a sample are simply probed at the next tick
    space.hot = set(parent.hot)
    space.removed_since_flush = parent.removed_since_flush
    space.resolved = False
    space.alive = True
    return space


def inject_while_frozen(tracer: native.Tracer, pid: int, fn: Callable[[], Any]) -> Any:
    """Runs fn (which injects syscalls into `pid`) with every thread of `pid` held in a ptrace
    stop. If a cgroup v2 freezer keeps `pid` frozen, it is thawed only while the threads are held
    and frozen again before they are released, so they never run user code meanwhile (the
    injector cannot run a syscall in a frozen task). Blocks."""
    frozen = native.frozen_cgroup(pid)
    if frozen and not frozen.endswith("cgroup.freeze"):
        raise GfvmError(
            f"process {pid} is frozen by the cgroup v1 freezer ({frozen}): thaw it "
            "before injecting"
        )
    with tracer.stopped(pid):
        if frozen:
            Path(frozen).write_text("0\n")
        try:
            return fn()
        finally:
            if frozen:
                Path(frozen).write_text("1\n")


def inject_many_while_frozen(
    tracer: native.Tracer, pids: list[int], fn: Callable[[int], Any]
) -> list[Any]:
    """`inject_while_frozen` for several processes of one frozen tree: all are held in ptrace
    stops first, the cgroup v2 freezer is thawed once, fn(pid) runs for each, then it freezes
    again before any is released. Blocks."""
    frozen = None
    for pid in pids:
        ctl = native.frozen_cgroup(pid)
        if ctl and not ctl.endswith("cgroup.freeze"):
            raise GfvmError(
                f"process {pid} is frozen by the cgroup v1 freezer ({ctl}): thaw it "
                "before injecting"
            )
        frozen = frozen or ctl
    with contextlib.ExitStack() as stack:
        for pid in pids:
            stack.enter_context(tracer.stopped(pid))
        if frozen:
            Path(frozen).write_text("0\n")
        try:
            return [fn(pid) for pid in pids]
        finally:
            if frozen:
                Path(frozen).write_text("1\n")


def _frozen(pid: int) -> bool:
    try:
        return native.frozen_cgroup(pid) is not None
    except ProcessLookupError:
        return False


def _zero_page(space: AddressSpace, vpage: int) -> bool:
    """Whether a present page holds only zeros (never written, e.g. served as zeros)."""
    buf = bytearray(PAGE_SIZE)
    try:
        native.read_pages(space.host_pid, [vpage << PAGE_SHIFT], buf)
    except OSError:
        return True
    return not any(buf)


def _minus_pages(ranges: list[tuple[int, int]], pages: set[int]) -> list[tuple[int, int]]:
    """`ranges` without the pages starting at the addresses in `pages`."""
    out = []
    for start, end in ranges:
        cuts = sorted(p for p in pages if start <= p < end)
        for p in cuts:
            if p > start:
                out.append((start, p))
            start = p + PAGE_SIZE
        if start < end:
            out.append((start, end))
    return out


#: _protect joins two runs of pages into one walk when the gap between them is at most this many
#: pages and at most PROTECT_GAP_WRITTEN of them are written (protecting one of those costs the
#: process a write fault if it writes it again, ~1 us, against ~15 us for one more walk plus the
#: TLB-flush IPI it sends; pages not written are skipped by the walk at no cost). The gap limit
#: keeps walks out of large unpopulated areas, where write-protection markers would be installed.
PROTECT_GAP_PAGES = 64
PROTECT_GAP_WRITTEN = 8

#: Batches of a page-out written at once (each batch_pages pages, one read buffer each, plus the
#: one being read): one replicated write at a time left the File Manager's round trips idle.
WRITES_IN_FLIGHT = 2

#: Recently hot pages dirtied again after a pause (at least SAMPLE_MIN_PAGES of them in a tick):
#: only those in one 64-page block out of SAMPLE_EVERY are probed; the others wait one tick and
#: follow the sample's majority (a writer that pauses and resumes then pays a probe fault for a
#: sixteenth of its pages, and pages that went cold are still probed, a tick later). Whole
#: blocks keep the sample's protection walks few (see PROTECT_GAP_PAGES).
SAMPLE_BLOCK_SHIFT = 6
SAMPLE_EVERY = 16
SAMPLE_MIN_PAGES = 1024


def _written_present(space: AddressSpace, start: int, end: int, *, reprotect: bool):
    """The runs [first vpage, last vpage + 1) of present pages written since their last
    protection in [start, end) of `space`, write-protecting every written page the walk passes
    when `reprotect`. An unpopulated page (never touched, or emptied by MADV_DONTNEED) reads as
    WRITTEN until it is protected (measured here): it holds nothing, so it is left out."""
    for region in native.scan_written(
        space.pagemap_fd,
        start,
        end,
        reprotect=reprotect,
        check_wpasync=False,
        return_mask=native.PAGE_IS_WRITTEN | native.PAGE_IS_PRESENT,
    ):
        if region.categories & native.PAGE_IS_PRESENT:
            yield region.start >> PAGE_SHIFT, region.end >> PAGE_SHIFT


def _protect_ranges(vpages: list[int], written: set[int]) -> list[tuple[int, int]]:
    """Address ranges covering the sorted `vpages`, runs joined across small gaps (see above)."""
    ranges: list[list[int]] = []  # [first vpage, last vpage + 1]
    for v in vpages:
        if ranges:
            last = ranges[-1]
            gap = v - last[1]
            if gap <= 0:
                last[1] = v + 1
                continue
            if gap <= PROTECT_GAP_PAGES and (
                gap <= PROTECT_GAP_WRITTEN
                or sum(1 for g in range(last[1], v) if g in written) <= PROTECT_GAP_WRITTEN
            ):
                last[1] = v + 1
                continue
        ranges.append([v, v + 1])
    return [(a << PAGE_SHIFT, b << PAGE_SHIFT) for a, b in ranges]


def _runs_to_ranges(vpages: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for v in vpages:
        if ranges and ranges[-1][1] == v << PAGE_SHIFT:
            ranges[-1] = (ranges[-1][0], (v + 1) << PAGE_SHIFT)
        else:
            ranges.append((v << PAGE_SHIFT, (v + 1) << PAGE_SHIFT))
    return ranges


def _alive(space: AddressSpace) -> bool:
    return _pid_matches(space.host_pid, space.start_time)


def _pid_matches(pid: int, start_time: int) -> bool:
    try:
        return procfs.state(pid) not in ("Z", "X") and procfs.start_time(pid) == start_time
    except ProcessLookupError:
        return False
