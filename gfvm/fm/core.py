"""The File Manager of one node: the single implementation behind /gfvm and the same-node API.

Layers (each its own module):
    fuse.py  api.py          pyfuse3 Operations / the pager's API: thin, call FileManager
    core.py  (this)          namespace ops, routing (local / master / remote), member side
    master.py                a file's master: ordering, replication, flush, resync, handoff
    consensus.py meta.py     replicated metadata (tree + per-file epoch/master/members)
    membership.py peers.py   heartbeats, leases; TLS channels to the other nodes
    store.py                 this node's copies (data, page sums, intent log)

Namespace (create/mkdir/rename/unlink/...): every change is a metadata op committed by a
majority through the metadata leader; each node applies it in the same order, so the tree is
the same everywhere. The call returns once the op is committed *and* applied on this node.
Lookups and readdir read the local metadata; a name not found locally is confirmed with the
leader first (`Consensus.sync`), so a name created on another node a moment ago is found and a
node that cannot reach the leader answers EIO, never a false ENOENT (RELIABILITY.md #4).

Routing of data: the master of a file reads and writes its local copy and replicates
(master.py). A member holding an in-sync copy confirmed by the current master reads locally;
anyone else (and every writer that is not the master) sends the request to the master. When no
up-to-date copy answers within `io_timeout`, the caller gets EIO.

Concurrency: everything runs on the trio thread; blocking file I/O goes through `self.io`
(to_thread with a CapacityLimiter). Locks: `FileRuntime.lock` orders one file's changes at its
master: under it a change gets its seq, its frames are queued and its local write is queued
(`FileRuntime.local_jobs`, applied in that order by one task); it is never held across waiting
for acks, nor for the local write itself, except by whoever needs the local copy to reflect
every change queued so far (fsync, handoff, truncate, resync reads: `Master._local_barrier`).
Nothing else holds a lock across a network round trip except resync's per-chunk reads.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import trio

from gfvm.config import ClusterConfig, NodePaths
from gfvm.errors import GfvmError, NotFound, Unavailable, UsageError
from gfvm.fm import messages as m
from gfvm.fm.consensus import Consensus, Timing
from gfvm.fm.errors import StaleView
from gfvm.fm.faults import Faults
from gfvm.fm.membership import Membership
from gfvm.fm.meta import IN_SYNC, OUTDATED, ROOT, SPLIT, Entry, MetaError, check_name
from gfvm.fm.metalog import MetaLog
from gfvm.fm.peers import PeerError, PeerNet
from gfvm.fm.store import MAX_FILE_SIZE, CorruptData, LocalFile, LocalStore, MissingCopy, StoreError

log = logging.getLogger(__name__)

LOCAL_NODE = "local"  # this node's name when there is no cluster configuration
#: pieces of one big write (1 MiB each) waiting for their acknowledgements at once
WRITE_WINDOW = 8


class FileRuntime:
    """What this node keeps in memory about one file (master side and member side)."""

    def __init__(self, fid: int) -> None:
        self.fid = fid
        self.lf: LocalFile | None = None
        self.lock = trio.Lock()
        self.ready_lock = trio.Lock()
        # master side (see master.py)
        self.ready_epoch = 0
        self.counter = 0
        self.last_seq = 0
        self.targets: dict[str, str] = {}  # member -> IN_SYNC | "catching_up": who gets frames
        self.bitmaps: dict[str, set[int] | None] = {}  # chunks each out-of-sync member lacks
        self.bitmap_base: dict[str, str] = {}  # the generation those bitmaps start from
        self.dropping: dict[str, trio.Event] = {}
        self.resyncing: set[str] = set()
        self.since_flush: set[int] = set()  # chunks written since the last flush everyone did
        self.promoted_at: float | None = None
        self.handoff = False
        # member side
        self.applied = (0, 0)  # (epoch, seq) of the last frame applied
        self.confirmed_epoch = 0  # the master confirmed our copy up to date in this epoch
        self.broken = False  # a frame failed here: refuse the stream until a resync starts
        self.kernel_cached = False  # the kernel may cache pages of this file (FUSE open)
        self.deleted = False
        self.wcount = 0  # master: numbers writes, for since_flush
        self.flush_counter = 0
        self.flushed_everywhere = 0  # the last flush id every in-sync copy completed
        self.flush_cuts: dict[int, int] = {}  # member: flush id -> write number it covered
        self.cuts_epoch = 0
        # master: local changes queued in write order, applied by one task (master._run_local)
        self.local_jobs: deque = deque()
        self.local_running = False
        self.local_idle = trio.Event()
        self.local_idle.set()


class FileManager:
    """One node's File Manager. Create, then `await nursery.start(fm.serve)`."""

    def __init__(self, paths: NodePaths, config: ClusterConfig | None, node: str | None = None,
                 *, faults: Faults | None = None) -> None:
        self.paths = paths
        self.config = config
        self.node = node or LOCAL_NODE
        section = (config.sections.get("fm") if config else None) or {}
        self.timing = Timing.from_section({k: v for k, v in section.items() if k in Timing.__dataclass_fields__})
        self.default_replicas = config.replicas if config else 1
        self.min_copies = int(section.get("min_copies", 2))
        self.nodes = [n.name for n in config.nodes] if config else [self.node]
        self.faults = faults or Faults()
        self.limiter = trio.CapacityLimiter(8)
        self.store: LocalStore | None = None
        self.consensus: Consensus | None = None
        self.membership: Membership | None = None
        self.net: PeerNet | None = None
        self.files: dict[int, FileRuntime] = {}
        self.kernel = None  # set by the FUSE layer: invalidate_inode / invalidate_entry
        self._nursery: trio.Nursery | None = None
        self.ready = trio.Event()
        # Requests of other components carried on our peer channels (migration: 0x2xxx),
        # by message class: `await handler(peer, msg)` returns the response.
        self.request_handlers: dict[type, Callable] = {}
        from gfvm.fm.master import Master

        self.master = Master(self)

    # -- lifetime --

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Opens the store and the metadata, connects to the peers, runs until cancelled."""
        self.store = await self.io(LocalStore, self.paths.state)
        # Peers tell our restarts by this id: random, so that a node whose disk was replaced
        # (its incarnation counter starting again) is still seen as restarted.
        self.boot_id = secrets.randbits(62) | 1
        metalog = MetaLog(self.paths.state)
        net = None
        if len(self.nodes) > 1:
            net = PeerNet(self.node, self.config, self.paths.tls_dir, self.boot_id,
                          dispatch=self._dispatch, stream=self._stream, rpc_timeout=self.timing.rpc_timeout,
                          on_link=self._on_link, reconnect_delay=min(0.5, self.timing.heartbeat))
        self.net = net
        self.consensus = Consensus(self.node, self.nodes, metalog, self.timing, net,
                                   prepare=self._prepare, on_applied=self._on_applied,
                                   on_installed=self._on_installed, faults=self.faults)
        self._usage_cache = {"used": 0, "free": 0, "total": 0}
        self.membership = Membership(self.node, self.nodes, self.consensus, net, self.timing,
                                     self.boot_id, lambda: self._usage_cache,
                                     self._on_peer_restart)
        self.consensus.membership = self.membership
        await self.io(self._gc_copies)
        async with trio.open_nursery() as n:
            self._nursery = n
            if net is not None:
                await n.start(net.serve)
            await n.start(self.consensus.serve)
            if net is not None:
                n.start_soon(self.membership.run)
            n.start_soon(self._usage_loop)
            n.start_soon(self.master.maintenance_loop)
            self.ready.set()
            task_status.started()

    def spawn(self, fn: Callable, *args) -> None:
        """Runs `fn(*args)` in the background; a failure is logged, never fatal to the daemon."""

        async def guarded():
            try:
                await fn(*args)
            except (GfvmError, OSError) as exc:
                log.warning("%s: %s", getattr(fn, "__name__", fn), exc)
            except Exception:  # noqa: BLE001 - background work must not take the daemon down
                log.exception("%s failed", getattr(fn, "__name__", fn))

        self._nursery.start_soon(guarded)

    async def io(self, fn: Callable, *args):
        """Runs blocking `fn(*args)` in a worker thread (bounded by the limiter)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def _usage_loop(self) -> None:
        while True:
            try:
                self._usage_cache = await self.io(self.store.usage)
            except OSError as exc:
                log.warning("measuring disk use: %s", exc)
            await trio.sleep(max(1.0, self.timing.heartbeat * 4))

    def _gc_copies(self) -> None:
        """Local copies of files this node is not a member of are garbage (blocking)."""
        st = self.consensus.state
        for fid in self.store.fids():
            e = st.entries.get(fid)
            if e is None or e.kind != "file" or self.node not in e.members:
                log.info("removing the local copy of file %d: not a member any more", fid)
                self.store.delete(fid)

    # -- helpers --

    @property
    def state(self):
        return self.consensus.state

    def entry(self, ino: int) -> Entry:
        return self.state.get(ino)

    def file_entry(self, ino: int) -> Entry:
        e = self.state.get(ino)
        if e.is_dir:
            raise MetaError(errno.EISDIR, f"{self.state.path_of(ino)} is a directory")
        return e

    def runtime(self, fid: int) -> FileRuntime:
        fs = self.files.get(fid)
        if fs is None:
            fs = self.files[fid] = FileRuntime(fid)
        return fs

    async def local(self, fs: FileRuntime) -> LocalFile:
        """The open local copy of a file (opened on first use). Raises MissingCopy."""
        lf = fs.lf
        if lf is not None and lf.deleted:
            fs.lf = lf = None
        if lf is None:
            lf = await self.io(self.store.open, fs.fid)
            if fs.lf is None:
                fs.lf = lf
            else:
                self.store.release(lf)
        return fs.lf

    def alive(self, node: str) -> bool:
        return self.membership.alive(node) if self.membership else node == self.node

    def lease_valid(self) -> bool:
        return self.consensus.lease_valid()

    def can_read_locally(self, e: Entry, fs: FileRuntime | None) -> bool:
        """A non-master member may serve reads from its copy: in sync, confirmed by the current
        master in this epoch, with a valid lease (RELIABILITY.md #3).

        Only the master's stream sets and clears the confirmation: a FLUSH confirms the copy, a
        resync's first frame or a frame that failed here clears it. The metadata never clears
        it: its ops reach this node in their own order, not the stream's, so the op that marked
        this copy outdated may be applied after the resync that followed it had confirmed the
        copy again. Clearing it then left an idle file unreadable here for good (in sync, and
        never confirmed again). Nothing is lost by this: an outdated copy fails the member test
        above, and it is in sync again only after a resync through the stream."""
        return (fs is not None and e.members.get(self.node) == IN_SYNC and fs.confirmed_epoch == e.epoch
                and not fs.broken and self.lease_valid())

    async def invalidate_kernel(self, fs: FileRuntime) -> None:
        """Drops the kernel's cached pages and attributes of a file whose copy changed under it
        (a write that did not come through this node's kernel); returns once done, so a reader
        on this node never sees older data after the write is acknowledged."""
        if fs.kernel_cached and self.kernel is not None:
            fs.kernel_cached = False
            await self.kernel.invalidate_inode(fs.fid)

    async def _deadline_retry(self, what: str, attempt: Callable):
        """Runs `attempt()` until it succeeds or `io_timeout` passes (then EIO via Unavailable).

        `attempt` raises Unavailable or PeerError(ESTALE/EAGAIN) for "try again"."""
        deadline = trio.current_time() + self.timing.io_timeout
        last: Exception | None = None
        while True:
            try:
                return await attempt()
            except (Unavailable, StaleView) as exc:
                last = exc
            except PeerError as exc:
                if exc.errno not in (errno.ESTALE, errno.EAGAIN, errno.EIO):
                    raise
                last = exc
            if trio.current_time() >= deadline:
                raise Unavailable(f"{what}: no up-to-date copy reachable ({last})")
            with trio.move_on_after(min(0.2, self.timing.heartbeat)):
                await self.consensus.wait_changed()

    async def _to_master(self, ino: int, master: str, msg):
        """Sends request `msg` about file `ino` to its master `master` and returns the answer;
        gives up (StaleView, so the caller retries) as soon as our metadata names another
        master, instead of waiting for a node that was paused or cut off."""
        if self.net is None:
            raise Unavailable(f"file {ino}: this node is not its master and has no peers")
        result = error = None

        async with trio.open_nursery() as n:
            async def watch():
                nonlocal error
                try:
                    while self.file_entry(ino).master == master:
                        await self.consensus.wait_changed()
                except MetaError as exc:
                    error = exc
                n.cancel_scope.cancel()

            async def call():
                nonlocal result, error
                try:
                    result = await self.net.request(master, msg, timeout=self.timing.io_timeout)
                except (GfvmError, OSError) as exc:
                    error = exc
                n.cancel_scope.cancel()

            n.start_soon(watch)
            n.start_soon(call)
        if error is not None:
            raise error
        if result is None:
            raise StaleView(f"file {ino}: its master moved away from {master}")
        return result

    # -- namespace --

    async def lookup(self, parent: int, name: str) -> Entry:
        """The entry `name` in directory `parent`; a miss is confirmed with the leader first."""
        try:
            return self.state.lookup(parent, name)
        except MetaError as exc:
            if exc.errno != errno.ENOENT:
                raise
        await self._sync()
        return self.state.lookup(parent, name)

    async def resolve(self, path: str) -> Entry:
        """The entry at `path` (relative to the root of /gfvm), confirming misses like lookup."""
        e = self.state.entries[ROOT]
        for part in [p for p in str(path).split("/") if p]:
            e = await self.lookup(e.ino, check_name(part))
        return e

    async def _sync(self) -> None:
        try:
            await self.consensus.sync()
        except Unavailable as exc:
            raise Unavailable(f"cannot confirm the /gfvm tree with the metadata leader: {exc}") from None

    async def _submit(self, request: dict) -> dict:
        _, result = await self.consensus.submit(request)
        return result

    async def mkdir(self, parent: int, name: str, mode: int) -> Entry:
        r = await self._submit({"op": "mkdir", "parent": parent, "name": check_name(name), "mode": mode})
        return self.entry(r["ino"])

    async def create(self, parent: int, name: str, mode: int, *, replicas: int | None = None) -> Entry:
        """Creates an empty file; this node is its master. Returns its entry."""
        req = {"op": "create", "parent": parent, "name": check_name(name), "mode": mode,
               "creator": self.node}
        if replicas is not None:
            req["replicas"] = replicas
        r = await self._submit(req)
        return self.entry(r["ino"])

    async def unlink(self, parent: int, name: str) -> None:
        await self._submit({"op": "unlink", "parent": parent, "name": name})

    async def rmdir(self, parent: int, name: str) -> None:
        await self._submit({"op": "rmdir", "parent": parent, "name": name})

    async def rename(self, parent: int, name: str, newparent: int, newname: str, *, noreplace: bool = False) -> None:
        await self._submit({"op": "rename", "parent": parent, "name": name, "newparent": newparent,
                            "newname": check_name(newname), "noreplace": noreplace})

    async def chmod(self, ino: int, mode: int) -> None:
        await self._submit({"op": "chmod", "ino": ino, "mode": mode})

    async def utime(self, ino: int, mtime_ns: int) -> None:
        await self._submit({"op": "utime", "ino": ino, "mtime_ns": mtime_ns})

    async def set_replicas(self, ino: int, replicas: int | None) -> None:
        """Sets R for files created below directory `ino` from now on (None: inherit)."""
        if replicas is not None and not 1 <= replicas <= len(self.nodes):
            raise MetaError(errno.EINVAL, f"replicas must be between 1 and {len(self.nodes)}")
        await self._submit({"op": "set_replicas", "ino": ino, "replicas": replicas})

    def _prepare(self, req: dict) -> dict:
        """Leader: fills in what every node must apply identically (never blocks)."""
        op = dict(req)
        op["now"] = time.time_ns()
        kind = op.get("op")
        if kind in ("mkdir", "create"):
            op["ino"] = self.state.next_ino
            if not isinstance(op.get("mode"), int):
                raise MetaError(errno.EINVAL, "mode must be an integer")
        if kind == "create":
            creator = op.pop("creator", None)
            if creator not in self.nodes:
                raise MetaError(errno.EINVAL, f"unknown node {creator!r}")
            r = op.pop("replicas", None) or self.state.replicas_for(op["parent"], self.default_replicas)
            r = max(1, min(int(r), len(self.nodes)))
            others = self._place(op["parent"], creator, r - 1)
            op["master"] = creator
            op["members"] = {n: IN_SYNC for n in [creator, *others]}
            op["replicas"] = r
            op["gen"] = secrets.token_hex(8)
        if kind == "config":
            if op.pop("new_gen", False):
                op["gen"] = secrets.token_hex(8)
            old = op.get("failover_from")
            if old:
                silent = self.membership.silent_for(old) if self.membership else 0
                if old != self.node and silent <= self.timing.lease:
                    raise MetaError(errno.EBUSY, f"{old} is alive to the metadata leader "
                                    f"(heard {silent:.1f} s ago): no failover")
                if old == self.node:
                    raise MetaError(errno.EBUSY, "the old master leads the metadata: no failover")
                hearer = self.membership.someone_hears(old) if self.membership else None
                if hearer is not None:
                    raise MetaError(errno.EBUSY, f"{hearer} still hears {old}: no failover")
        return op

    def _place(self, parent: int, creator: str, count: int) -> list[str]:
        """Leader: `count` other nodes for a new file: the siblings' nodes when they are all alive
        (a process's files stay together), else the least-used alive nodes."""
        if count <= 0:
            return []
        for sib in self.state.listdir(parent):
            if sib.kind == "file" and sib.master == creator:
                others = [n for n in sib.members if n != creator and sib.members[n] == IN_SYNC]
                if len(others) == count and all(self.alive(n) for n in others):
                    return sorted(others)
        cands = [n for n in self.nodes if n != creator and self.alive(n)]
        cands.sort(key=lambda n: (self.membership.usage_of(n)[0] if self.membership else 0, n))
        return cands[:count]

    # -- applying metadata ops on this node --

    async def _on_applied(self, version: int, op: dict, result: dict) -> None:
        kind = op["op"]
        if kind == "create" and self.node in op["members"]:
            await self.io(self.store.create, op["ino"], op["gen"])
        removed = result.get("removed") if kind in ("unlink", "rmdir", "rename") else None
        if removed and removed.get("kind") == "file":
            await self._forget_file(removed["ino"])
        if kind == "config":
            await self._config_applied(op, result)
        if self.kernel is not None and kind in ("unlink", "rmdir", "rename"):
            self.spawn(self.kernel.invalidate_entry, op["parent"], op["name"])
            if kind == "rename":
                self.spawn(self.kernel.invalidate_entry, op["newparent"], op["newname"])

    async def _forget_file(self, fid: int) -> None:
        fs = self.files.pop(fid, None)
        if fs is not None:
            fs.deleted = True
            self.master.fail_waiters(fs, "file deleted")
        if self.store.exists(fid):
            await self.io(self.store.delete, fid)
        if fs is not None and fs.lf is not None:
            self.store.release(fs.lf)
            fs.lf = None

    async def _config_applied(self, op: dict, result: dict) -> None:
        fid = op["ino"]
        before = result["before"]
        e = self.entry(fid)
        me = self.node
        was, now = before["members"].get(me), e.members.get(me)
        fs = self.files.get(fid)
        if was is not None and now is None:
            await self._forget_file(fid)
            return
        if now == SPLIT and was != SPLIT:
            # never merged, never destroyed: the diverged copy is moved aside
            if fs is not None:
                self.files.pop(fid, None)
                fs.deleted = True
                self.master.fail_waiters(fs, "copy split off")
            keep_as = f"{fid}.split.{before['epoch']}.{secrets.token_hex(3)}"
            await self.io(lambda: self.store.delete(fid, keep_as=keep_as))
            if fs is not None and fs.lf is not None:
                self.store.release(fs.lf)
                fs.lf = None
            log.warning("file %d: this node's copy diverged (forced promotion): kept aside, not merged", fid)
            return
        if was is None and now is not None:
            await self.io(self.store.create, fid, "")
        fs = self.runtime(fid)
        # a config op leaves `confirmed_epoch` alone: see can_read_locally
        if before["master"] == me and e.master != me:
            self.master.demoted(fs)
        if e.master == me and (before["master"] != me or before["epoch"] != e.epoch):
            fs.promoted_at = trio.current_time()
            fs.handoff = bool(op.get("handoff"))
            fs.ready_epoch = 0
            self.spawn(self.master.ensure_ready_quietly, fid)

    async def _on_installed(self) -> None:
        for fid, fs in list(self.files.items()):
            e = self.state.entries.get(fid)
            if e is None or e.kind != "file" or self.node not in e.members:
                await self._forget_file(fid)
                continue
            if e.master != self.node and fs.ready_epoch:
                self.master.demoted(fs)
            # as does an installed state (see can_read_locally)
        await self.io(self._gc_copies)

    def _on_peer_restart(self, peer: str, incarnation: int) -> None:
        self.master.peer_restarted(peer)

    def _on_link(self, peer: str, up: bool, incarnation: int) -> None:
        if not up:
            self.master.peer_link_down(peer)

    # -- data --

    async def getattr_file(self, e: Entry) -> tuple[int, int]:
        """(size, mtime_ns) of a file: from the local copy when it is current, else its master."""
        fs = self.files.get(e.ino)
        if e.master == self.node:
            fs = self.runtime(e.ino)
            try:
                await self.master.ensure_ready(fs, e)  # a restarted master may be recovering
                lf = await self.local(fs)
                return lf.size, e.mtime_ns
            except (MissingCopy, Unavailable, StaleView):
                pass
        elif self.can_read_locally(e, fs) and fs.lf is not None:
            return fs.lf.size, e.mtime_ns

        async def remote():
            e2 = self.file_entry(e.ino)
            if e2.master == self.node:
                fs2 = self.runtime(e.ino)
                await self.master.ensure_ready(fs2, e2)
                lf = await self.local(fs2)
                return lf.size, e2.mtime_ns
            r = await self._to_master(e.ino, e2.master, m.FileStat(e.ino))
            return r.size, e2.mtime_ns

        if self.net is None:
            raise Unavailable(f"file {e.ino}: no local copy and no peers")
        return await self._deadline_retry(f"stat of {self.state.path_of(e.ino)}", remote)

    async def read(self, ino: int, offset: int, length: int) -> bytes:
        """Reads from the nearest up-to-date copy (see the module header). EIO if none answers."""
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, "negative offset or length")
        length = min(length, m.MAX_DATA)

        async def attempt():
            e = self.file_entry(ino)
            if e.master == self.node:
                return await self.master.read(self.runtime(ino), e, offset, length)
            fs = self.files.get(ino)
            if self.can_read_locally(e, fs):
                try:
                    lf = await self.local(fs)
                    return await self.io(lf.read, offset, length)
                except CorruptData as exc:
                    log.warning("%s; fetching the chunks from the master", exc)
                    await self.repair_from(fs, lf, exc.pages, [e.master])
                    return await self.io(lf.read, offset, length)
                except MissingCopy as exc:
                    log.warning("file %d: %s; reading from the master", ino, exc)
            r = await self._to_master(ino, e.master, m.ClientRead(ino, offset, length))
            return bytes(r.data)

        return await self._deadline_retry(f"read of {self.state.path_of(ino)}", attempt)

    async def write(self, ino: int, offset: int, data: bytes | memoryview, *, from_kernel: bool = False) -> int:
        """Writes at the master (forwarded there if need be); returns once the master and every
        in-sync member applied it (RELIABILITY.md #1). EIO if that cannot be achieved.

        More than 1 MiB travels as 1 MiB pieces, pipelined (see `_write_pieces`)."""
        if offset < 0:
            raise OSError(errno.EINVAL, "negative offset")
        if offset + len(data) > MAX_FILE_SIZE:
            raise OSError(errno.EFBIG, f"write past the {MAX_FILE_SIZE}-byte file size limit")
        mv = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        step = m.MAX_DATA
        pieces = [(offset + i, mv[i : i + step]) for i in range(0, max(len(mv), 1), step)]

        async def begin(piece):
            e = self.file_entry(ino)
            if e.master != self.node:
                return None
            return await self.master.begin_write(self.runtime(ino), e, piece[0], piece[1], from_kernel=from_kernel)

        async def attempt(piece):
            e = self.file_entry(ino)
            if e.master == self.node:
                return await self.master.write(self.runtime(ino), e, piece[0], piece[1], from_kernel=from_kernel)
            await self._to_master(ino, e.master, m.ClientWrite(ino, piece[0], piece[1].toreadonly()))

        await self._write_pieces(f"write to {self.state.path_of(ino)}", pieces, begin, attempt)
        return len(mv)

    async def write_pages(self, ino: int, offsets: list[int], data: bytes | memoryview) -> None:
        """Writes whole pages at scattered page-aligned offsets (page i of `data` at offsets[i]).

        Same guarantees as `write`. Large batches are split into frames of up to 256 pages,
        pipelined when no offset repeats (see `_write_pieces`)."""
        mv = memoryview(data).cast("B")
        if offsets and max(offsets) + 4096 > MAX_FILE_SIZE:
            raise OSError(errno.EFBIG, f"page past the {MAX_FILE_SIZE}-byte file size limit")
        if len(mv) != 4096 * len(offsets):
            raise OSError(errno.EINVAL, f"{len(offsets)} pages need {4096 * len(offsets)} bytes")
        per = m.MAX_CHUNK_PAGES
        pieces = [(list(offsets[i : i + per]), mv[i * 4096 : min(i + per, len(offsets)) * 4096])
                  for i in range(0, len(offsets), per)]

        async def begin(piece):
            e = self.file_entry(ino)
            if e.master != self.node:
                return None
            return await self.master.begin_write_pages(self.runtime(ino), e, piece[0], piece[1])

        async def attempt(piece):
            e = self.file_entry(ino)
            if e.master == self.node:
                return await self.master.write_pages(self.runtime(ino), e, piece[0], piece[1])
            await self._to_master(ino, e.master, m.ClientPages(ino, piece[0], piece[1].toreadonly()))

        disjoint = len(pieces) < 2 or len(set(offsets)) == len(offsets)
        await self._write_pieces(f"write to {self.state.path_of(ino)}", pieces, begin, attempt,
                                 window=WRITE_WINDOW if disjoint else 1)

    async def _write_pieces(self, what: str, pieces: list, begin, attempt, *, window: int = 0) -> None:
        """Writes `pieces` (disjoint ranges of one file), keeping up to `window` of them waiting
        for their acknowledgements at once (default WRITE_WINDOW; 1: one after the other).

        On the master, `begin(piece)` gives each piece its place in the file's order, in call
        order, and returns the wait for its acknowledgements, which runs in a task of its own
        while the next pieces start; elsewhere (`begin` returns None) each piece is forwarded
        to the master in a task of its own. Each piece is retried as a plain write
        (`attempt(piece)`, until io_timeout) when its first try fails for a reason that is
        worth a retry. Returns when every piece is acknowledged (so the promises of `write` hold
        for the whole call); otherwise raises the first failure, after the pieces already
        started have finished (their frames are out: their acks must still be accounted for)."""
        window = window or WRITE_WINDOW
        if len(pieces) == 1 or window == 1:
            for piece in pieces:
                await self._deadline_retry(what, lambda piece=piece: attempt(piece))
            return
        room = trio.Semaphore(window)
        failures: list[BaseException] = []

        async def finish(piece, acknowledged) -> None:
            try:
                if acknowledged is not None:
                    try:
                        return await acknowledged()
                    except (Unavailable, StaleView):
                        pass
                    except PeerError as exc:
                        if exc.errno not in (errno.ESTALE, errno.EAGAIN, errno.EIO):
                            raise
                await self._deadline_retry(what, lambda: attempt(piece))
            except (GfvmError, OSError) as exc:
                failures.append(exc)
            finally:
                room.release()

        async with trio.open_nursery() as n:
            for piece in pieces:
                await room.acquire()
                if failures:
                    room.release()
                    break
                try:
                    acknowledged = await begin(piece)
                except (Unavailable, StaleView):
                    acknowledged = None  # retried as a whole in its task
                except (GfvmError, OSError) as exc:
                    room.release()
                    failures.append(exc)
                    break
                n.start_soon(finish, piece, acknowledged)
        if failures:
            raise failures[0]

    async def truncate(self, ino: int, size: int, *, from_kernel: bool = False) -> None:
        """Sets the file size (replicated like a write). `from_kernel`: the call comes from a
        FUSE request on this inode, whose kernel state is already right (and which an
        invalidation from inside the request would deadlock)."""
        if size < 0:
            raise OSError(errno.EINVAL, "negative size")
        if size > MAX_FILE_SIZE:
            raise OSError(errno.EFBIG, f"size past the {MAX_FILE_SIZE}-byte limit")

        async def attempt():
            e = self.file_entry(ino)
            if e.master == self.node:
                return await self.master.truncate(self.runtime(ino), e, size, from_kernel=from_kernel)
            await self._to_master(ino, e.master, m.ClientTruncate(ino, size))

        await self._deadline_retry(f"truncate of {self.state.path_of(ino)}", attempt)

    async def fsync(self, ino: int) -> None:
        """Returns once everything written before the call is durable on the master and every
        in-sync member (protocol C)."""

        async def attempt():
            e = self.file_entry(ino)
            if e.master == self.node:
                return await self.master.fsync(self.runtime(ino), e)
            await self._to_master(ino, e.master, m.ClientFsync(ino))

        await self._deadline_retry(f"fsync of {self.state.path_of(ino)}", attempt)

    async def repair_from(self, fs: FileRuntime, lf: LocalFile, pages: list[int], sources: list[str]) -> None:
        """Replaces corrupt pages of our copy by the chunks holding them, fetched (verified at the
        source and again here) from one of `sources`. Raises Unavailable if none has them."""
        from gfvm.fm.store import CHUNK_SHIFT, PAGE_SHIFT

        chunks = sorted({(p << PAGE_SHIFT) >> CHUNK_SHIFT for p in pages})
        for chunk in chunks:
            for src in sources:
                if src == self.node or self.net is None:
                    continue
                try:
                    r = await self.net.request(src, m.FetchChunk(fs.fid, chunk))
                    await self.io(lf.write_chunk, chunk, bytes(r.data), list(r.sums), r.size)
                    log.info("file %d: chunk %d repaired from %s", fs.fid, chunk, src)
                    break
                except (Unavailable, PeerError, StoreError) as exc:
                    log.warning("file %d: chunk %d from %s: %s", fs.fid, chunk, src, exc)
            else:
                raise Unavailable(f"file {fs.fid}: corrupt chunk {chunk} and no good copy reachable")

    # -- promotion, placement queries --

    async def promote(self, ino: int, node: str, *, force: bool = False) -> Entry:
        """Makes `node` the master of file `ino` (epoch + 1, committed by a majority).

        The current master hands over when reachable (flushes everyone first, so nothing
        acknowledged is lost and every in-sync copy stays in sync); when it is dead, `node` takes
        over if it holds an in-sync copy. Refused for a stale node unless `force` (then the other
        copies are kept aside as split-brain copies, never merged)."""
        if node not in self.nodes:
            raise NotFound(f"unknown node {node!r} (nodes: {', '.join(self.nodes)})")
        await self._sync()  # decide on the current configuration, not a stale local view
        e = self.file_entry(ino)
        if e.master == node:
            return e
        if node not in e.members and not force:
            raise UsageError(f"{node} holds no copy of {self.state.path_of(ino)} "
                             f"(members: {', '.join(sorted(e.members))})")
        if e.members.get(node) != IN_SYNC and not force:
            raise UsageError(f"{node}'s copy of {self.state.path_of(ino)} is stale ({e.members.get(node)}): "
                             "promoting it would lose acknowledged writes (use --force to accept that)")

        async def attempt():
            e = self.file_entry(ino)
            if e.master == node:
                return
            if e.master == self.node:
                return await self.master.handoff(self.runtime(ino), e, node, force)
            if self.alive(e.master) and self.net is not None:
                try:
                    await self.net.request(e.master, m.Promote(ino, node, force), timeout=self.timing.io_timeout)
                    return
                except Unavailable:
                    if self.alive(e.master):
                        raise
            # the master is gone: the target takes over (checked by the leader: failover_from)
            if node == self.node:
                return await self.master.take_over(self.runtime(ino), e, force)
            await self.net.request(node, m.Promote(ino, node, force), timeout=self.timing.io_timeout)

        try:
            await self._deadline_retry(f"promotion of {self.state.path_of(ino)}", attempt)
        except PeerError as exc:
            if exc.errno == errno.EINVAL:  # the master refused for a reason the user must fix
                raise UsageError(str(exc)) from None
            raise
        await self._sync()
        return self.entry(ino)

    def where(self, ino: int) -> dict:
        """Master, members and their states, epoch, generation of a file (local metadata)."""
        e = self.file_entry(ino)
        fs = self.files.get(ino)
        return {
            "path": self.state.path_of(ino), "fid": ino, "epoch": e.epoch, "master": e.master,
            "replicas": e.replicas, "gen": e.gen,
            "members": {n: {"state": s, "alive": self.alive(n)} for n, s in sorted(e.members.items())},
            "in_sync": e.in_sync(),
            "split_brain": sorted(n for n, s in e.members.items() if s == SPLIT),
            "local": {"copy": bool(fs and fs.lf) or (self.store is not None and self.store.exists(ino)),
                      "readable": self.node == e.master or self.can_read_locally(e, fs)},
        }

    def in_sync_nodes(self, inos: list[int]) -> list[str]:
        """Nodes holding an in-sync copy of every one of these files, alive ones only, sorted."""
        common: set[str] | None = None
        for ino in inos:
            e = self.file_entry(ino)
            s = set(e.in_sync())
            common = s if common is None else common & s
        return sorted(n for n in (common or set()) if self.alive(n))

    async def status(self) -> dict:
        """This node's view of the cluster (for `gfvm status`)."""
        c = self.consensus
        nodes = {}
        for n in self.nodes:
            used, free = self.membership.usage_of(n) if self.membership else (
                self._usage_cache["used"], self._usage_cache["free"])
            nodes[n] = {"alive": self.alive(n),
                        "silent_for": round(self.membership.silent_for(n), 2) if self.membership else 0.0,
                        "used": used, "free": free, "leader": c.leader == n}
        mastered = sum(1 for e in self.state.files() if e.master == self.node)
        return {"node": self.node, "leader": c.leader, "term": c.term, "version": c.last[1],
                "commit": c.commit[1], "lease": self.lease_valid(), "nodes": nodes,
                "files": len(self.state.files()), "mastered_here": mastered,
                "incarnation": self.store.incarnation}

    # -- requests from peers --

    async def _dispatch(self, peer: str, msg):
        c = self.consensus
        if isinstance(msg, m.MetaAppend):
            return await c.handle_append(peer, msg)
        if isinstance(msg, m.MetaInstall):
            return await c.handle_install(peer, msg)
        if isinstance(msg, m.VoteRequest):
            return await c.handle_vote(peer, msg)
        if isinstance(msg, m.MetaSubmit):
            return await c.handle_submit(peer, msg)
        if isinstance(msg, m.Heartbeat):
            return await self.membership.handle(peer, msg)
        if isinstance(msg, m.NodeStatus):
            import json

            return m.NodeStatusReply(json.dumps(await self.status()).encode(), rid=m.PENDING)
        handler = self.request_handlers.get(type(msg))
        if handler is not None:
            return await handler(peer, msg)
        return await self.master.handle_request(peer, msg)

    async def _stream(self, peer: str, frames: list) -> list:
        return await self.master.handle_frames(peer, frames)

