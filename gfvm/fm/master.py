"""A file's master and its members: write ordering, replication, FLUSH, resync, handoff.

Master side, per file (state in core.FileRuntime):
- Ready: before serving an epoch the master reconciles the in-sync members. Each reports the
  chunks it may hold differently (its intent log: everything since the last flush that every
  copy completed); the master sends those chunks (and its own hot ones) from its copy, then a
  FLUSH that confirms the member for this epoch. A master that restarted with an unclean copy
  first fetches its own hot chunks from an in-sync member (it may be behind after a power
  loss: "a crashed master receives its hot extents"). After a failover promotion it also waits
  one lease, so no node still acts on the old configuration.
- Write: under the file lock: next seq, queue the frames to every target (in-sync members, and
  members catching up), queue the local write behind the file's earlier ones (applied in that
  order by one task, `_run_local`: the local order is the seq order). Then, without the lock,
  wait for the local write and the in-sync members' acks; a local write that failed first
  gives the members our version of the chunks back, then fails the write. A member that fails,
  or whose link delivers no ack at all for `write_timeout` (one frame may wait behind megabytes
  of earlier ones on a slow link: that is not a failure), is dropped: its missing chunks go to a bitmap
  (persisted), it is marked outdated in the metadata (new generation id), and the write waits
  one lease before it is acknowledged. The write is acknowledged only if at least
  min(min_copies, R) in-sync copies (master included) have it; otherwise it fails (EIO).
  Invariant: whoever needs the local copy to reflect every frame sent so far (FLUSH, resync
  reads, handoff, truncate) waits for the local queue under the lock (`_local_barrier`).
- FLUSH (fsync): a frame after the writes it covers; each member fsyncs and acks; the master
  fsyncs in parallel; success once all in-sync members acked (protocol C).
- Resync of an outdated member: incremental (its bitmap, when its generation is the bitmap's
  base) or full; the member gets live writes meanwhile, and chunks read under the file lock
  (verified against their sums at the source); a final FLUSH, then the member is marked in sync.
- Handoff (promote): under the file lock, FLUSH everyone, check that the target's copy has our
  size (else it is dropped and not promoted), then commit epoch+1 with the new master; every
  acknowledged write is on every in-sync copy, so nobody needs a resync.
- A member is declared in sync only if it is still a target when that is committed (checked
  before and after the commit): a live write it failed (refused, or a lost channel) while
  catching up removes it from the targets (it missed it); one that is only slow stays a
  target, and its resync's final FLUSH is acknowledged only after every earlier frame. Every
  acknowledged change was acknowledged by each member in sync when its frames were queued, or
  that member was dropped first.

Member side: frames arrive in order on the master's channel; each is checked against our
metadata (epoch fencing: an older epoch is refused; a newer one waits for our metadata to catch
up; the sender must be the master of that epoch), then applied (data frames that queued up
behind a slow one are applied together, `handle_frames`). A frame that fails marks the copy
broken (not readable, further frames refused) until the master restarts a resync.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from functools import partial

import trio

from gfvm.errors import GfvmError, Unavailable, UsageError
from gfvm.fm import messages as m
from gfvm.fm.errors import StaleView
from gfvm.fm.meta import IN_SYNC, OUTDATED, SPLIT, Entry, MetaError
from gfvm.fm.peers import PeerError
from gfvm.fm.store import CHUNK_SHIFT, CorruptData, LocalFile, MissingCopy, StoreError, atomic_write, chunks_of

log = logging.getLogger(__name__)

CATCHING_UP = "catching_up"
_DATA_FRAMES = (m.ReplWrite, m.ReplPages)
FRAME_PIECE = 256 * 1024  # replication frames of a big write
RESYNC_WINDOW = 8  # chunks in flight per resync


class NotMaster(StaleView):
    """This node is not (or no longer) the file's master in the epoch the caller assumed."""


class _LocalJob:
    """One local change of the master, queued in write order (see Master._queue_local)."""

    __slots__ = ("fn", "lf", "done", "error")

    def __init__(self, fn, lf: LocalFile) -> None:
        self.fn = fn
        self.lf = lf
        self.done = trio.Event()
        self.error: Exception | None = None


def _run_jobs(batch: list[_LocalJob]) -> None:
    """Worker thread: applies local changes in order; each failure stays with its job."""
    for job in batch:
        try:
            job.fn(job.lf)
        except Exception as exc:  # noqa: BLE001 - reported to the writer waiting for this job
            job.error = exc


class Master:
    def __init__(self, fm) -> None:
        self.fm = fm
        self._preparing: set[int] = set()

    # -- small helpers --

    @property
    def node(self) -> str:
        return self.fm.node

    def _seq(self, fs) -> int:
        fs.counter += 1
        fs.last_seq = (self.fm.store.incarnation << 40) | fs.counter
        return fs.last_seq

    def _still_master(self, fs, epoch: int) -> Entry:
        e = self.fm.file_entry(fs.fid)
        if e.master != self.node or e.epoch != epoch or fs.ready_epoch != epoch:
            raise NotMaster(f"file {fs.fid}: this node is no longer its master at epoch {epoch}")
        if not self.fm.lease_valid():
            raise Unavailable("this node has no metadata lease (cut off from the majority?)")
        return e

    def _need(self, e: Entry) -> int:
        return max(1, min(self.fm.min_copies, e.replicas or len(e.members)))

    def _mark(self, fs, chunks) -> None:
        """Chunks just changed: remembered until a flush everywhere, and by every bitmap."""
        fs.wcount = getattr(fs, "wcount", 0) + 1
        for c in chunks:
            fs.since_flush[c] = fs.wcount
        for node, bm in fs.bitmaps.items():
            if bm is not None:
                bm.update(chunks)

    def _send(self, fs, make, *, only_in_sync: bool = False) -> dict:
        """Queues frames to every target: `make(token)` builds one frame, or a list of such
        builders several (in order). Returns node -> (kind, [waiters])."""
        makers = make if isinstance(make, list) else [make]
        waits = {}
        for node, kind in list(fs.targets.items()):
            if only_in_sync and kind != IN_SYNC:
                continue
            link = self.fm.net.link(node)
            ws = []
            for mk in makers:
                token = link.next_token()
                ws.append(link.send_stream(mk(token), token))
            waits[node] = (kind, ws)
        return waits

    def _expected(self, fs) -> set[str]:
        """The members (other than us) whose copy is in sync now: every change sent from here on
        must reach each of them before it is acknowledged, or they are dropped first (call
        under fs.lock, where the change's frames are queued)."""
        return {n for n in self.fm.file_entry(fs.fid).in_sync() if n != self.node}

    async def _await_acks(self, fs, e: Entry, waits: dict, expected: set[str]) -> list[str]:
        """Waits for every ack (up to write_timeout each); drops in-sync members that failed.
        `expected`: the members that were in sync when the frames were queued (`_expected`).

        Promise 1 holds for whatever the caller acknowledges next: every member that is in
        sync when this returns and was in sync when the frames were queued acknowledged them,
        or it has been dropped (marked outdated) before we return. A member that was in sync
        but got no frame (it left `fs.targets` without being marked outdated) is dropped too.
        A member that was catching up and refused a frame (or lost its channel) stops being a
        target; if it has become in sync meanwhile, it is dropped. One that is only slow stays a
        target (see `one`).
        Returns the nodes that failed."""
        failed: list[tuple[str, str, str]] = []
        acked: set[str] = set()

        async def one(node, kind, ws):
            try:
                for w in ws:
                    if not await self._ack_or_stall(w, node):
                        if kind == IN_SYNC:
                            failed.append((node, kind, f"no ack within {self.fm.timing.write_timeout:g} s "
                                                       "(and none for earlier frames either)"))
                        return
                acked.add(node)
            except GfvmError as exc:
                failed.append((node, kind, str(exc)))
            # a member catching up that is slow is not failing: its acks count for nothing yet,
            # and its resync's final FLUSH, queued behind this frame, is acknowledged only once
            # this frame is applied (a frame that fails there breaks its copy: the FLUSH fails)

        async with trio.open_nursery() as n:
            for node, (kind, ws) in waits.items():
                n.start_soon(one, node, kind, ws)
        for node, kind, reason in failed:
            now = self.fm.file_entry(fs.fid).members.get(node)
            if kind == IN_SYNC or now == IN_SYNC or fs.targets.get(node) == IN_SYNC:
                await self.drop(fs, node, reason)
            else:
                fs.targets.pop(node, None)  # its resync fails (see resync) and starts again later
        # A member that failed was dropped above. If it is in sync again by now, a resync that
        # began after that drop brought it every change queued before: dropping it again would
        # only cost another resync, a full one (found in a test: both members of a file resynced
        # twice after one failed write).
        for node in sorted(expected - acked - {f[0] for f in failed}):
            if self.fm.file_entry(fs.fid).members.get(node) == IN_SYNC:
                log.warning("file %d: in-sync member %s did not receive a change (not a target)",
                            fs.fid, node)
                await self.drop(fs, node, "it did not receive a change that is being acknowledged")
        return [f[0] for f in failed]

    async def _ack_or_stall(self, w, node: str, timeout: float | None = None) -> bool:
        """Waits for the ack of frame `w` to `node`: True once acknowledged, False once the
        member stalls: no ack at all on its link for `timeout` (write_timeout). Frames are
        applied in order, so while acks for earlier frames keep coming the member is working
        (a slow link queues megabytes ahead of this frame: a deadline per frame would drop a
        healthy member, and again after every resync). Raises what `w.wait` raises."""
        timeout = timeout or self.fm.timing.write_timeout
        link = self.fm.net.link(node)
        while True:
            with trio.move_on_after(timeout):
                await w.wait()
                return True
            if not link.acking(timeout):
                return False

    def _check_copies(self, fs, epoch: int) -> None:
        e = self.fm.file_entry(fs.fid)
        if e.master != self.node or e.epoch != epoch:
            raise NotMaster(f"file {fs.fid}: mastership moved while writing")
        have = len(e.in_sync())
        need = self._need(e)
        if have < need:
            raise Unavailable(f"file {fs.fid}: only {have} in-sync cop{'y' if have == 1 else 'ies'}, "
                              f"{need} needed to acknowledge a write")

    # -- becoming ready --

    async def ensure_ready(self, fs, e: Entry) -> None:
        """Prepares this node to serve file `e` as its master in epoch e.epoch (see the header)."""
        if fs.ready_epoch == e.epoch:
            return
        async with fs.ready_lock:
            e = self.fm.file_entry(fs.fid)
            if e.master != self.node:
                raise NotMaster(f"file {fs.fid}: master is {e.master}")
            if fs.ready_epoch == e.epoch:
                return
            if not self.fm.lease_valid():
                raise Unavailable("no metadata lease yet")
            await self._prepare(fs, e)
            fs.ready_epoch = e.epoch
            log.info("file %d: master on %s at epoch %d (in sync: %s)", fs.fid, self.node, e.epoch,
                     ", ".join(self.fm.file_entry(fs.fid).in_sync()))

    async def ensure_ready_quietly(self, fid: int) -> None:
        if fid in self._preparing:
            return
        self._preparing.add(fid)
        try:
            e = self.fm.file_entry(fid)
            if e.master == self.node:
                await self.ensure_ready(self.fm.runtime(fid), e)
        except (GfvmError, OSError) as exc:
            log.info("file %d: not ready as master yet: %s", fid, exc)
        finally:
            self._preparing.discard(fid)

    async def _prepare(self, fs, e: Entry) -> None:
        fm = self.fm
        lf = await fm.local(fs)
        if lf.damaged:
            raise Unavailable(f"file {fs.fid}: the master's copy is damaged ({lf.damaged})")
        if fs.promoted_at is not None and not fs.handoff:
            wait = fs.promoted_at + fm.timing.lease - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
        fs.targets = {}
        fs.since_flush = {}
        fs.flush_counter = 0
        fs.flushed_everywhere = 0
        fs.wcount = 0
        my_hot = await fm.io(lf.hot_chunks)
        others = [n for n in e.in_sync() if n != self.node]
        crashed = fs.promoted_at is None and lf.unclean_at_open
        # bitmaps of outdated members, from disk (plus everything that may have changed since)
        await self._load_bitmaps(fs, e, lf, my_hot)
        if crashed and others:
            await fm.faults.hit("recover.before_fetch")
            await self._recover_hot(fs, e, lf, my_hot, others)
        elif crashed:
            log.info("file %d: sole copy after a crash: accepting its hot extents as they are", fs.fid)
            await fm.io(lf.recompute_hot_sums)
            my_hot = set()
        lf.unclean_at_open = False
        for c in my_hot:
            fs.since_flush[c] = 0
        # reconcile every in-sync member (they may differ within hot chunks)
        for node in others:
            try:
                await self._reconcile(fs, e, lf, node, my_hot,
                                      identical=fs.handoff and fs.promoted_at is not None)
            except (Unavailable, PeerError, GfvmError, OSError) as exc:
                log.warning("file %d: member %s could not be reconciled: %s", fs.fid, node, exc)
                fs.ready_epoch = e.epoch  # drop() needs to act as master
                try:
                    await self.drop(fs, node, f"reconcile failed: {exc}")
                finally:
                    fs.ready_epoch = 0
                e = fm.file_entry(fs.fid)

    async def _recover_hot(self, fs, e: Entry, lf: LocalFile, hot: set[int], sources: list[str]) -> None:
        """Restarted master: take our hot chunks from an in-sync member (we may be behind)."""
        last: Exception | None = None
        for src in sources:
            try:
                for chunk in sorted(hot):
                    r = await self.fm.net.request(src, m.FetchChunk(fs.fid, chunk))
                    await self.fm.io(lf.write_chunk, chunk, bytes(r.data), list(r.sums), r.size)
                log.info("file %d: restarted master took %d hot chunk(s) from %s", fs.fid, len(hot), src)
                return
            except (Unavailable, PeerError, StoreError) as exc:
                last = exc
                log.warning("file %d: hot chunks from %s: %s", fs.fid, src, exc)
        raise Unavailable(f"file {fs.fid}: restarted master cannot get its hot extents from any "
                          f"in-sync member ({last})")

    async def _reconcile(self, fs, e: Entry, lf: LocalFile, node: str, my_hot: set[int], *,
                         identical: bool = False) -> None:
        """Brings in-sync member `node` to exactly our content and confirms it for this epoch."""
        fm = self.fm
        r = await fm.net.request(node, m.Probe(fs.fid, e.epoch))
        if not r.exists or not r.usable or (r.gen and r.gen not in e.gens):
            raise Unavailable(f"its copy is {'missing' if not r.exists else 'unusable'}"
                              f"{' (generation ' + r.gen + ' unknown)' if r.gen and r.gen not in e.gens else ''}")
        if identical:
            # a handoff flushed every in-sync copy under the old master's lock: they are
            # identical, so confirming them is enough (this keeps a migration cheap)
            chunks: set[int] | None = set()
        else:
            chunks = set(my_hot) | set(r.hot_chunks) if r.hot_known else None
        fs.targets[node] = IN_SYNC
        await self._push(fs, e, lf, node, chunks, full=chunks is None, final_flush=True)

    async def _push(self, fs, e: Entry, lf: LocalFile, node: str, chunks: set[int] | None, *,
                    full: bool, final_flush: bool) -> None:
        """Sends `chunks` (None: all) of our copy to `node`, then a confirming FLUSH."""
        fm = self.fm
        link = fm.net.link(node)
        async with fs.lock:
            await self._local_barrier(fs)
            size = lf.size
            token = link.next_token()
            waits = [link.send_stream(m.ResyncStart(fs.fid, e.epoch, token, size, full), token)]
        if chunks is None:
            chunks = set(range((size + (1 << CHUNK_SHIFT) - 1) >> CHUNK_SHIFT))
        for chunk in sorted(chunks):
            await fm.faults.hit("resync.chunk")
            async with fs.lock:
                if fs.targets.get(node) is None:
                    raise Unavailable(f"{node} stopped receiving frames")
                await self._local_barrier(fs)  # the chunk as every frame sent so far left it
                if (chunk << CHUNK_SHIFT) >= lf.size:
                    continue
                try:
                    data, sums = await fm.io(lf.read_chunk, chunk)
                except CorruptData as exc:
                    log.warning("%s (resync source); repairing first", exc)
                    await fm.repair_from(fs, lf, exc.pages, [n for n in e.in_sync() if n not in (self.node, node)])
                    data, sums = await fm.io(lf.read_chunk, chunk)
                token = link.next_token()
                waits.append(link.send_stream(
                    m.ReplChunk(fs.fid, e.epoch, token, chunk, lf.size, data, sums), token))
            while len(waits) > RESYNC_WINDOW:
                await self._wait_one(waits.pop(0), node)
        if final_flush:
            async with fs.lock:
                if fs.targets.get(node) is None:
                    # a frame to it failed meanwhile (see _await_acks): it may lack that change
                    raise Unavailable(f"{node} stopped receiving frames")
                token = link.next_token()
                fid_flush = self._flush_id(fs)
                waits.append(link.send_stream(m.ReplFlush(fs.fid, e.epoch, fs.last_seq, token, e.gen,
                                                          fid_flush, fs.flushed_everywhere), token))
                fs.targets[node] = IN_SYNC  # from here on its acks count (see resync)
        for w in waits:
            await self._wait_one(w, node)

    async def _wait_one(self, w, node: str) -> None:
        if not await self._ack_or_stall(w, node, self.fm.timing.write_timeout * 4):
            raise Unavailable(f"{node} did not acknowledge resync frames in time")

    async def _restore_members(self, fid: int, chunks: set[int], waits: dict) -> None:
        """After a write that failed here but may have been applied by members: send them our
        version of those chunks, so every in-sync copy is identical again (or drop them)."""
        fs = self.fm.files.get(fid)
        for node, (kind, ws) in waits.items():
            with trio.move_on_after(self.fm.timing.write_timeout):
                for w in ws:
                    try:
                        await w.wait()
                    except GfvmError:
                        pass
        if fs is None:
            return
        e = self.fm.file_entry(fid)
        lf = await self.fm.local(fs)
        for node in [n for n in e.in_sync() if n != self.node]:
            try:
                await self._push(fs, e, lf, node, set(chunks), full=False, final_flush=True)
            except (GfvmError, OSError) as exc:
                await self.drop(fs, node, f"could not restore it after a failed write: {exc}")

    def _flush_id(self, fs) -> int:
        fs.flush_counter = getattr(fs, "flush_counter", 0) + 1
        return (self.fm.store.incarnation << 32) | fs.flush_counter

    # -- bitmaps --

    def _bitmap_path(self, fs, node: str):
        return self.fm.store.path_of(fs.fid) / f"bitmap.{node}"

    async def _load_bitmaps(self, fs, e: Entry, lf: LocalFile, my_hot: set[int]) -> None:
        fs.bitmaps, fs.bitmap_base = {}, {}
        for node, state in e.members.items():
            if node == self.node or state != OUTDATED:
                continue
            path = self._bitmap_path(fs, node)

            def load(path=path):
                try:
                    return json.loads(path.read_bytes())
                except (FileNotFoundError, ValueError):
                    return None

            d = await self.fm.io(load)
            if d and d.get("chunks") is not None:
                fs.bitmaps[node] = set(d["chunks"]) | my_hot
                fs.bitmap_base[node] = d.get("base", "")
            else:
                fs.bitmaps[node] = None  # unknown: full resync

    async def _save_bitmaps(self, fs) -> None:
        items = {node: ({"base": fs.bitmap_base.get(node, ""), "chunks": sorted(bm) if bm is not None else None})
                 for node, bm in fs.bitmaps.items()}

        def save():
            for node, d in items.items():
                atomic_write(self._bitmap_path(fs, node), json.dumps(d).encode())

        try:
            await self.fm.io(save)
        except OSError as exc:
            log.warning("file %d: saving resync bitmaps: %s", fs.fid, exc)

    # -- master operations --

    async def read(self, fs, e: Entry, offset: int, length: int) -> bytes:
        await self.ensure_ready(fs, e)
        if not self.fm.lease_valid():
            raise Unavailable("this node has no metadata lease")
        lf = await self.fm.local(fs)
        try:
            return await self.fm.io(lf.read, offset, length)
        except CorruptData as exc:
            log.warning("%s; fetching the chunks from an in-sync member", exc)
            await self.fm.repair_from(fs, lf, exc.pages, [n for n in e.in_sync() if n != self.node])
            return await self.fm.io(lf.read, offset, length)

    async def write(self, fs, e: Entry, offset: int, data, *, from_kernel: bool = False) -> None:
        """Applies `data` at `offset` here and on every target; returns once acknowledged."""
        await (await self.begin_write(fs, e, offset, data, from_kernel=from_kernel))()

    async def begin_write(self, fs, e: Entry, offset: int, data, *, from_kernel: bool = False):
        """The ordered half of `write`: returns once the write has its place in the file's
        order (applied here, frames queued); the returned coroutine function waits for the
        acknowledgements (see `_ordered`)."""
        # big writes travel as several frames, so a member starts applying the first piece
        # while the next ones are still being encrypted and sent
        mv = memoryview(data)
        pieces = [(offset + i, mv[i : i + FRAME_PIECE]) for i in range(0, max(len(mv), 1), FRAME_PIECE)]

        def frames(seqs):
            return [(lambda token, o=o, p=p, q=q: m.ReplWrite(fs.fid, e.epoch, q, token, o, p))
                    for (o, p), q in zip(pieces, seqs)]

        return await self._ordered(fs, e, chunks_of(offset, len(data)), lambda lf: lf.write(offset, data),
                                   frames, from_kernel, nseq=len(pieces))

    async def write_pages(self, fs, e: Entry, offsets: list[int], data, *, from_kernel: bool = False) -> None:
        await (await self.begin_write_pages(fs, e, offsets, data, from_kernel=from_kernel))()

    async def begin_write_pages(self, fs, e: Entry, offsets: list[int], data, *, from_kernel: bool = False):
        """The ordered half of `write_pages` (as `begin_write`)."""
        chunks = {off >> CHUNK_SHIFT for off in offsets}
        return await self._ordered(
            fs, e, chunks, lambda lf: lf.write_pages(offsets, data),
            lambda seq: (lambda token: m.ReplPages(fs.fid, e.epoch, seq, token, offsets, data)), from_kernel)

    async def truncate(self, fs, e: Entry, size: int, *, from_kernel: bool = False) -> None:
        lf = await self.fm.local(fs)

        def chunks():  # under the lock, every earlier change applied: lf.size is current
            lo, hi = sorted((lf.size, size))
            return chunks_of(lo, max(hi - lo, 1))

        await (await self._ordered(fs, e, chunks, lambda lf: lf.truncate(size),
                                   lambda seq: (lambda token: m.ReplTruncate(fs.fid, e.epoch, seq, token, size)),
                                   from_kernel))()

    async def _ordered(self, fs, e: Entry, chunks, apply_local, make_frame, from_kernel: bool,
                       *, nseq: int = 0):
        """One change, in order: `make_frame(seq)` builds its frame (or, with `nseq`, takes a list
        of nseq seqs and builds that many frames); `apply_local(lf)` applies it here. `chunks`:
        the chunks it touches, or a function computing them once every earlier change is
        applied here.

        Returns once the change has its place in the file's order: its frames are queued to
        every target and its local write is queued behind the earlier ones (so changes started
        one after the other are ordered). The returned coroutine function then waits for the
        local write and the acknowledgements, and raises if either failed or too few copies have
        the change. The caller must await it: a change counts as written only when it
        returned."""
        fm = self.fm
        await self.ensure_ready(fs, e)
        lf = await fm.local(fs)
        epoch = e.epoch  # Entry objects are live: keep the epoch this write belongs to
        async with fs.lock:
            self._still_master(fs, epoch)
            await fm.faults.hit("master.before_local_write")
            if callable(chunks):  # needs the local copy as every earlier change left it
                await self._local_barrier(fs)
                chunks = chunks()
            seq = [self._seq(fs) for _ in range(nseq)] if nseq else self._seq(fs)
            self._mark(fs, chunks)
            expected = self._expected(fs)
            # queue the frames first, so the members apply while we apply locally; the local
            # write is queued behind the earlier ones (the same order as the frames on every
            # member's stream) and the lock is released at once, so the next change can go out
            waits = self._send(fs, make_frame(seq))
            job = self._queue_local(fs, lf, apply_local)
        touched = set(chunks)

        async def acknowledged() -> None:
            await job.done.wait()
            if job.error is not None:
                # nothing is acknowledged; members that applied it get our version back before
                # the caller hears of the failure (so no copy holds more than ours by then)
                log.warning("file %d: local write failed (%s); restoring the members' copies",
                            fs.fid, job.error)
                try:
                    await self._restore_members(fs.fid, touched, waits)
                except (GfvmError, OSError) as exc:
                    log.warning("file %d: restoring the members' copies: %s", fs.fid, exc)
                raise job.error
            await fm.faults.hit("master.after_local_write")
            if not from_kernel:
                await fm.invalidate_kernel(fs)
            await fm.faults.hit("master.after_send")
            await self._await_acks(fs, e, waits, expected)
            self._check_copies(fs, epoch)

        return acknowledged

    # -- the master's local writes, in order --

    def _queue_local(self, fs, lf: LocalFile, apply_local) -> "_LocalJob":
        """Queues `apply_local(lf)` behind the file's earlier local changes (call with fs.lock
        held, so the local order is the order of the seqs). Never blocks."""
        job = _LocalJob(apply_local, lf)
        fs.local_jobs.append(job)
        if not fs.local_running:
            fs.local_running = True
            fs.local_idle = trio.Event()
            self.fm.spawn(self._run_local, fs)
        return job

    async def _run_local(self, fs) -> None:
        """Applies the queued local changes in order; those queued meanwhile go together in one
        worker-thread call. A change that fails reports its error; the next ones still run (as
        they did when each waited for the lock)."""
        try:
            while fs.local_jobs:
                batch = list(fs.local_jobs)
                fs.local_jobs.clear()
                try:
                    await self.fm.io(_run_jobs, batch)
                finally:
                    for job in batch:
                        job.done.set()
        finally:
            fs.local_running = False
            fs.local_idle.set()

    async def _local_barrier(self, fs) -> None:
        """With fs.lock held: returns once every local change queued so far is applied, so the
        local copy reflects every change whose frames went out."""
        while fs.local_running:
            await fs.local_idle.wait()

    async def fsync(self, fs, e: Entry) -> None:
        fm = self.fm
        await self.ensure_ready(fs, e)
        lf = await fm.local(fs)
        epoch = e.epoch
        async with fs.lock:
            self._still_master(fs, epoch)
            await self._local_barrier(fs)  # our flush below covers every write before the FLUSH
            gen = e.gen
            seq = fs.last_seq
            cut = fs.wcount
            flush_id = self._flush_id(fs)
            expected = self._expected(fs)
            waits = self._send(fs, lambda token: m.ReplFlush(fs.fid, epoch, seq, token, gen, flush_id,
                                                              fs.flushed_everywhere), only_in_sync=True)
        local_cut: list = []

        async def local():
            try:
                local_cut.append(await fm.io(lambda: lf.flush(gen=gen, epoch=epoch, seq=seq, clear=False)))
            except OSError as exc:
                local_cut.append(exc)

        # Our fsync runs beside the wait for the acks. What the wait raises is kept and raised
        # after the nursery, as it is: raised inside it, it would leave wrapped in an exception
        # group, and the caller would not retry an Unavailable (a member's drop that could not be
        # committed yet) but fail the fsync with EIO at once.
        acks_error: list[Exception] = []
        async with trio.open_nursery() as n:
            n.start_soon(local)
            try:
                failed = await self._await_acks(fs, e, waits, expected)
            except (GfvmError, OSError) as exc:
                acks_error.append(exc)
        if isinstance(local_cut[0], OSError):
            raise local_cut[0]  # our own fsync failed: nothing is acknowledged
        if acks_error:
            raise acks_error[0]
        if not failed:
            fs.flushed_everywhere = flush_id
            fs.since_flush = {c: w for c, w in fs.since_flush.items() if w > cut}
            await fm.io(lf.clear_hot, local_cut[0])
        if fs.bitmaps:
            await self._save_bitmaps(fs)
        await fm.faults.hit("master.before_flush_ack")
        self._check_copies(fs, epoch)

    # -- losing and regaining members --

    async def drop(self, fs, node: str, reason: str) -> None:
        """Marks in-sync member `node` outdated (it missed or may have missed a frame)."""
        # A drop of it under way is waited for, then this one goes on: that drop need not cover
        # our caller's frame. It commits early and then waits out a lease; a resync may declare
        # the member in sync meanwhile, and our caller's frame may be one that member refused
        # or lost while being caught up (found here: returning after the wait acknowledged a
        # write the member, back "in sync", never got). If the member is outdated by now, the
        # checks below return at once; a resync under way loses it as a target (it may lack
        # the frame) and starts again.
        while (ev := fs.dropping.get(node)) is not None:
            await ev.wait()
        ev = fs.dropping[node] = trio.Event()
        try:
            fs.targets.pop(node, None)
            e = self.fm.file_entry(fs.fid)
            if e.master != self.node or e.members.get(node) != IN_SYNC:
                return
            log.warning("file %d: dropping member %s from the in-sync set: %s", fs.fid, node, reason)
            # The bitmap exists from the moment the member stopped being a target (no await in
            # between): every write ordered from now on adds its chunks to it (`_mark`), where a
            # bitmap built after the awaits below lost the writes ordered meanwhile (the member
            # then came back "in sync" without them).
            # A member dropped again before its resync finished keeps what it lacked then (None:
            # it needs a full resync).
            old = fs.bitmaps.get(node, set())
            bm = fs.bitmaps[node] = None if old is None else set(fs.since_flush) | old
            if bm is not None:
                try:
                    lf = await self.fm.local(fs)
                    bm |= await self.fm.io(lf.hot_chunks)
                except StoreError:
                    pass
            await self.fm.faults.hit("drop.collect")
            fs.bitmap_base[node] = e.gen
            await self._save_bitmaps(fs)
            await self.fm.faults.hit("drop.before_commit")
            members = dict(e.members)
            members[node] = OUTDATED
            try:
                await self.fm._submit({"op": "config", "ino": fs.fid, "epoch": e.epoch, "master": self.node,
                                       "members": members, "new_gen": True, "expect_epoch": e.epoch,
                                       "expect_members": e.members})
            except MetaError as exc:
                if exc.errno != errno.ESTALE:
                    raise
                e2 = self.fm.file_entry(fs.fid)
                if e2.members.get(node) == IN_SYNC:
                    raise Unavailable(f"could not mark {node} outdated: {exc}") from None
            await self.fm.faults.hit("drop.after_commit")
            # the dropped node may still read its copy until its lease runs out
            await trio.sleep(self.fm.timing.lease)
        finally:
            ev.set()
            fs.dropping.pop(node, None)

    def demoted(self, fs) -> None:
        fs.ready_epoch = 0
        fs.targets = {}
        fs.bitmaps = {}
        fs.resyncing = set()

    def fail_waiters(self, fs, reason: str) -> None:
        self.demoted(fs)

    def peer_restarted(self, peer: str) -> None:
        """A member's daemon restarted: its copies must be re-confirmed (or resynced)."""
        for e in self.fm.state.files():
            fs = self.fm.files.get(e.ino)
            if e.master == self.node and fs is not None and fs.ready_epoch == e.epoch and \
                    e.members.get(peer) == IN_SYNC:
                self.fm.spawn(self._reconfirm, fs.fid, peer)

    def peer_link_down(self, peer: str) -> None:
        pass  # frames in flight fail and drop the member; nothing to do otherwise

    async def _reconfirm(self, fid: int, node: str) -> None:
        fs = self.fm.files.get(fid)
        if fs is None or node in fs.resyncing:
            return
        fs.resyncing.add(node)
        try:
            e = self.fm.file_entry(fid)
            if e.master != self.node or e.members.get(node) != IN_SYNC:
                return
            lf = await self.fm.local(fs)
            await self._reconcile(fs, e, lf, node, set(fs.since_flush))
            log.info("file %d: restarted member %s re-confirmed", fid, node)
        except (GfvmError, OSError) as exc:
            log.warning("file %d: restarted member %s: %s", fid, node, exc)
            e = self.fm.file_entry(fid)
            if e.master == self.node and fs.ready_epoch == e.epoch:
                await self.drop(fs, node, str(exc))
        finally:
            fs.resyncing.discard(node)

    async def resync(self, fid: int, node: str) -> None:
        """Brings outdated member `node` back in sync (incremental when its bitmap applies)."""
        fm = self.fm
        fs = fm.files.get(fid)
        if fs is None or node in fs.resyncing:
            return
        fs.resyncing.add(node)
        try:
            e = fm.file_entry(fid)
            if e.master != self.node or fs.ready_epoch != e.epoch or e.members.get(node) != OUTDATED:
                return
            lf = await fm.local(fs)
            r = await fm.net.request(node, m.Probe(fid, e.epoch))
            bm = fs.bitmaps.get(node)
            # its copy is where the bitmap starts, or it already took the FLUSH of a resync
            # since (that failed later): the bitmap still holds every chunk changed since
            full = not (r.exists and r.usable and bm is not None and r.gen and
                        r.gen in (fs.bitmap_base.get(node), e.gen) and r.hot_known)
            chunks = None if full else (set(bm) | set(r.hot_chunks))
            log.info("file %d: %s resync of %s (%s chunks)", fid, "full" if full else "incremental", node,
                     "all" if chunks is None else len(chunks))
            fs.targets[node] = CATCHING_UP
            await self._push(fs, e, lf, node, chunks, full=full, final_flush=True)
            await fm.faults.hit("resync.before_in_sync")
            # A live write it failed to acknowledge meanwhile removed it from the targets: it
            # misses that write, and would miss every later one (found here: a member declared
            # in sync this way was 8 MiB short, was promoted, and cut the others to its size).
            if fs.targets.get(node) is None:
                raise Unavailable(f"{node} stopped receiving frames")
            e2 = fm.file_entry(fid)
            members = dict(e2.members)
            members[node] = IN_SYNC
            if fs.targets.get(node) != IN_SYNC:
                raise Unavailable(f"{node} stopped receiving frames before it was marked in sync")
            await fm._submit({"op": "config", "ino": fid, "epoch": e2.epoch, "master": self.node,
                              "members": members, "expect_epoch": e.epoch, "expect_members": e2.members})
            if fs.targets.get(node) != IN_SYNC:
                # a frame to it failed while the commit was under way: it may lack a change
                # that is acknowledged, so it is outdated again (with its bitmap)
                await self.drop(fs, node, "a frame failed while it was being marked in sync")
                return
            fs.bitmaps.pop(node, None)
            fs.bitmap_base.pop(node, None)
            try:
                await fm.io(os.unlink, self._bitmap_path(fs, node))
            except FileNotFoundError:
                pass
            log.info("file %d: %s is in sync again", fid, node)
        except (GfvmError, OSError) as exc:
            log.warning("file %d: resync of %s failed: %s", fid, node, exc)
            if fs.targets.get(node) == CATCHING_UP or (fs.targets.get(node) == IN_SYNC and
                                                        fm.file_entry(fid).members.get(node) != IN_SYNC):
                fs.targets.pop(node, None)
        finally:
            fs.resyncing.discard(node)

    async def replace(self, fid: int, reason: str) -> None:
        """Puts a copy on one more node (it joins as outdated, then resyncs in full)."""
        fm = self.fm
        e = fm.file_entry(fid)
        cands = [n for n in fm.nodes if n not in e.members and fm.alive(n)]
        if not cands:
            return
        cands.sort(key=lambda n: (fm.membership.usage_of(n)[0], n))
        new = cands[0]
        members = dict(e.members)
        members[new] = OUTDATED
        log.info("file %d: adding %s as a new member (%s)", fid, new, reason)
        fs = fm.runtime(fid)
        fs.bitmaps[new] = None
        await fm._submit({"op": "config", "ino": fid, "epoch": e.epoch, "master": self.node,
                          "members": members, "expect_epoch": e.epoch, "expect_members": e.members})

    async def retire(self, fid: int, dead: str) -> None:
        """Enough in-sync copies again: forget a long-dead outdated member."""
        fm = self.fm
        e = fm.file_entry(fid)
        members = dict(e.members)
        members.pop(dead, None)
        await fm._submit({"op": "config", "ino": fid, "epoch": e.epoch, "master": self.node,
                          "members": members, "expect_epoch": e.epoch, "expect_members": e.members})

    # -- mastership changes --

    async def handoff(self, fs, e: Entry, target: str, force: bool) -> None:
        """This master hands file `e` to `target` (see the module header)."""
        fm = self.fm
        await self.ensure_ready(fs, e)
        members = dict(e.members)
        if target not in members:
            if not force:
                raise UsageError(f"{target} holds no copy")
            members[target] = OUTDATED
        stale = members[target] != IN_SYNC
        if stale and not force:
            raise UsageError(f"{target}'s copy is {members[target]}: refusing to promote a stale copy")
        async with fs.lock:
            e = self._still_master(fs, e.epoch)
            await self._local_barrier(fs)
            # FLUSH every in-sync member while no write can start
            seq = fs.last_seq
            flush_id = self._flush_id(fs)
            expected = self._expected(fs)
            waits = self._send(fs, lambda token: m.ReplFlush(fs.fid, e.epoch, seq, token, e.gen, flush_id,
                                                              fs.flushed_everywhere), only_in_sync=True)
            lf = await fm.local(fs)
            await fm.io(lambda: lf.flush(gen=e.gen, epoch=e.epoch, seq=seq, clear=False))
            await self._await_acks(fs, e, waits, expected)
            if not stale:
                await self._check_identical(fs, e, lf, target)
            e = fm.file_entry(fs.fid)
            members = dict(e.members)
            members.setdefault(target, OUTDATED)
            if stale:
                # split brain on purpose: the in-sync copies hold newer data; keep them aside
                for n, s in list(members.items()):
                    if s == IN_SYNC and n != target:
                        members[n] = SPLIT
                members[target] = IN_SYNC
            elif members.get(target) != IN_SYNC:
                raise Unavailable(f"{target} fell out of sync during the handoff")
            await fm.faults.hit("promote.before_commit")
            old_epoch = e.epoch
            await fm._submit({"op": "config", "ino": fs.fid, "epoch": old_epoch + 1, "master": target,
                              "members": members, "handoff": not stale, "force": stale,
                              "new_gen": stale, "expect_epoch": old_epoch, "expect_members": dict(e.members)})
            await fm.faults.hit("promote.after_commit")
        log.info("file %d: handed over to %s (epoch %d)", fs.fid, target, old_epoch + 1)

    async def _check_identical(self, fs, e: Entry, lf: LocalFile, target: str) -> None:
        """Handoff, after the FLUSH: the target's copy must have our size. The new master only
        confirms the other copies (they are identical after that FLUSH), and its reconcile sets
        every member to its own size: a target whose copy is shorter than ours, though in
        sync, would cut ours (found here: a member that came back from a resync 8 MiB short
        was promoted, and its reconcile cut the old master's copy to its size). Such a target
        is dropped (a full resync follows) and the handoff refused."""
        r = await self.fm.net.request(target, m.Probe(fs.fid, e.epoch))
        if r.exists and r.size == lf.size:
            return
        why = (f"its copy has {r.size} bytes after the handoff's flush, the master's {lf.size}"
               if r.exists else "its copy is missing")
        log.warning("file %d: not handing over to %s: %s", fs.fid, target, why)
        await self.drop(fs, target, why)
        fs.bitmaps[target] = None  # what differs is unknown: a full resync
        await self._save_bitmaps(fs)
        raise Unavailable(f"{target}'s copy of file {fs.fid} differs from the master's ({why})")

    async def take_over(self, fs, e: Entry, force: bool) -> None:
        """The master is gone: this node becomes master if its copy is in sync and usable."""
        fm = self.fm
        me = self.node
        state = e.members.get(me)
        if state != IN_SYNC and not force:
            raise UsageError(f"{me}'s copy is {state}: refusing to promote a stale copy")
        try:
            lf = await fm.local(fs)
        except MissingCopy:
            raise Unavailable(f"{me} has no usable copy of file {fs.fid}: it cannot become its master") from None
        if lf.damaged or (lf.info.gen and lf.info.gen not in e.gens) or (not lf.info.gen and state == IN_SYNC):
            raise Unavailable(f"{me}'s copy of file {fs.fid} is not a copy of this file's data")
        old_master, old_epoch = e.master, e.epoch
        members = dict(e.members)
        members[old_master] = OUTDATED if members.get(old_master) == IN_SYNC else members.get(old_master, OUTDATED)
        if state != IN_SYNC:
            for n, s in list(members.items()):
                if s == IN_SYNC and n != me:
                    members[n] = SPLIT
        members[me] = IN_SYNC
        await fm._submit({"op": "config", "ino": fs.fid, "epoch": old_epoch + 1, "master": me,
                          "members": members, "new_gen": True, "failover_from": old_master,
                          "force": state != IN_SYNC, "expect_epoch": old_epoch,
                          "expect_members": dict(e.members)})
        log.warning("file %d: %s took over from %s (epoch %d)", fs.fid, me, old_master, old_epoch + 1)

    # -- maintenance --

    async def maintenance_loop(self) -> None:
        fm = self.fm
        checked = 0.0
        while True:
            await trio.sleep(fm.timing.heartbeat)
            try:
                await self._maintain_once(trio.current_time() - checked > 5 * fm.timing.heartbeat)
            except Exception:  # noqa: BLE001 - keep maintaining the other files
                log.exception("file maintenance failed")
            checked = trio.current_time() if trio.current_time() - checked > 5 * fm.timing.heartbeat else checked

    async def _maintain_once(self, check_copies: bool) -> None:
        fm = self.fm
        me = self.node
        auto_failover = (fm.config.sections.get("fm", {}) if fm.config else {}).get("auto_failover", True)
        for e in list(fm.state.files()):
            if e.master == me:
                fs = fm.runtime(e.ino)
                if fs.ready_epoch != e.epoch:
                    if fm.lease_valid():
                        fm.spawn(self.ensure_ready_quietly, e.ino)
                    continue
                in_sync = e.in_sync()
                outdated = [n for n, st in e.members.items() if st == OUTDATED]
                alive_outdated = [n for n in outdated if fm.alive(n)]
                for node in alive_outdated:
                    if node not in fs.resyncing:
                        fm.spawn(self.resync, e.ino, node)
                if fm.membership is None or "+replace" in fs.resyncing:
                    continue
                want = e.replicas or 1
                long_dead = [n for n in outdated if not fm.alive(n)
                             and fm.membership.silent_for(n) > fm.timing.rereplicate_after]
                if len(in_sync) < self._need(e) and not alive_outdated:
                    # writes are blocked (too few copies to acknowledge): add a copy now
                    reason = "too few in-sync copies to acknowledge writes"
                elif long_dead and len(in_sync) + len(alive_outdated) < want:
                    reason = f"{', '.join(long_dead)} down for more than {fm.timing.rereplicate_after:g} s"
                elif long_dead and len(in_sync) >= want:
                    fs.resyncing.add("+replace")
                    fm.spawn(self._guarded, fs, "+replace", self.retire(e.ino, long_dead[0]))
                    continue
                else:
                    continue
                fs.resyncing.add("+replace")
                fm.spawn(self._guarded, fs, "+replace", self.replace(e.ino, reason))
            elif e.members.get(me) == IN_SYNC and fm.membership is not None:
                fs = fm.files.get(e.ino)
                # only a copy the master confirmed can be "lost" (one being created is not)
                if check_copies and fs is not None and fs.confirmed_epoch == e.epoch and \
                        not fs.broken and not fm.store.exists(e.ino):
                    fm.spawn(self._report_lost, e.ino, "local copy missing")
                silent = fm.membership.silent_for(e.master)
                if not auto_failover or silent <= fm.timing.failover_after or not fm.lease_valid():
                    continue
                cands = [n for n in e.in_sync() if n != e.master and fm.alive(n)]
                if me in cands and silent > fm.timing.failover_after * (1 + cands.index(me)):
                    fs = fm.runtime(e.ino)
                    if e.master in fs.resyncing or trio.current_time() < getattr(fs, "takeover_backoff", 0):
                        continue
                    fs.takeover_backoff = trio.current_time() + fm.timing.failover_after
                    fs.resyncing.add(e.master)
                    fm.spawn(self._guarded, fs, e.master, self._auto_take_over(e.ino))

    async def _guarded(self, fs, key: str, coro) -> None:
        try:
            await coro
        except (GfvmError, OSError) as exc:
            log.warning("file %d: %s", fs.fid, exc)
        finally:
            fs.resyncing.discard(key)

    async def _auto_take_over(self, fid: int) -> None:
        e = self.fm.file_entry(fid)
        log.warning("file %d: master %s silent for %.1f s: taking over", fid, e.master,
                    self.fm.membership.silent_for(e.master))
        await self.take_over(self.fm.runtime(fid), e, False)

    async def _report_lost(self, fid: int, reason: str) -> None:
        e = self.fm.file_entry(fid)
        fs = self.fm.runtime(fid)
        fs.broken = True
        fs.confirmed_epoch = 0
        try:
            await self.fm.net.request(e.master, m.CopyLost(fid, reason))
        except (Unavailable, PeerError) as exc:
            log.warning("file %d: could not report the lost copy to %s: %s", fid, e.master, exc)

    # -- member side: frames from the master --

    async def _entry_at(self, fid: int, epoch: int) -> Entry:
        """Our entry for `fid`, once our metadata has caught up with `epoch`."""
        fm = self.fm
        with trio.move_on_after(fm.timing.rpc_timeout * 2):
            while True:
                e = fm.state.entries.get(fid)
                if e is not None and e.epoch >= epoch:
                    break
                await fm.consensus.wait_changed()
        await fm.consensus.wait_idle()  # an op being applied finishes (local copy created...)
        e = fm.state.entries.get(fid)
        if e is None or e.kind != "file":
            raise MetaError(errno.ENOENT, f"file {fid} unknown here")
        if epoch < e.epoch:
            raise NotMaster(f"file {fid}: epoch {epoch} is stale (current {e.epoch})")
        if epoch > e.epoch:
            raise Unavailable(f"file {fid}: epoch {epoch} not known here yet")
        return e

    async def handle_frames(self, peer: str, frames: list) -> list[BaseException | None]:
        """Applies replication frames from `peer` in order (see `handle_stream`); returns, per
        frame, None or the error that refused it. Consecutive data frames of one file and epoch
        are applied in one worker-thread call (they arrived while earlier ones were applied),
        with the same outcome as one by one: a frame that fails breaks the copy, and the frames
        after it are refused. With a member.* fault point armed, frames go one by one."""
        out: list[BaseException | None] = []
        armed = any(p.startswith("member.") for p in self.fm.faults.armed)
        i = 0
        while i < len(frames):
            j = i + 1
            if not armed and isinstance(frames[i], _DATA_FRAMES):
                first = frames[i]
                while j < len(frames) and isinstance(frames[j], _DATA_FRAMES) and \
                        frames[j].fid == first.fid and frames[j].epoch == first.epoch:
                    j += 1
            if j - i > 1:
                out += await self._apply_run(peer, frames[i:j])
            else:
                try:
                    await self.handle_stream(peer, frames[i])
                    out.append(None)
                except Exception as exc:  # noqa: BLE001 - reported in the frame's ack
                    out.append(exc)
            i = j
        return out

    async def _apply_run(self, peer: str, run: list) -> list[BaseException | None]:
        """Consecutive ReplWrite/ReplPages frames of one file and epoch (see handle_frames)."""
        fm = self.fm
        first = run[0]
        try:
            for _ in run:
                await fm.faults.hit("member.before_apply")
            e = await self._entry_at(first.fid, first.epoch)
            if e.master != peer:
                raise NotMaster(f"file {first.fid}: {peer} is not its master at epoch {first.epoch}")
            state = e.members.get(self.node)
            if state is None or state == SPLIT:
                raise PeerError(errno.EINVAL, f"{self.node} is not a member of file {first.fid}")
            fs = fm.runtime(first.fid)
            if fs.broken:
                raise GfvmError(f"file {first.fid}: an earlier frame failed here; waiting for a resync")
        except Exception as exc:  # noqa: BLE001 - every frame of the run gets this answer
            return [exc] * len(run)
        try:
            lf = await fm.local(fs)
        except BaseException as exc:
            fs.broken = True
            fs.confirmed_epoch = 0
            if not isinstance(exc, Exception):
                raise
            return [exc] * len(run)
        todo = [msg for msg in run if (msg.epoch, msg.seq) > fs.applied]
        done: list = []

        def apply_all() -> None:
            for msg in todo:
                if isinstance(msg, m.ReplWrite):
                    lf.write(msg.offset, msg.data, cached=True)
                else:
                    lf.write_pages(list(msg.offsets), msg.data, cached=True)
                done.append(msg)

        failure: BaseException | None = None
        try:
            await fm.io(apply_all)
        except BaseException as exc:
            failure = exc
        if done:
            fs.applied = (done[-1].epoch, done[-1].seq)
        if failure is not None:
            fs.broken = True
            fs.confirmed_epoch = 0
            if not isinstance(failure, Exception):
                raise failure  # cancelled: the channel is closing
            bad = todo[len(done)]
            later = GfvmError(f"file {first.fid}: an earlier frame failed here; waiting for a resync")
            return [None if msg.seq < bad.seq else failure if msg is bad else later for msg in run]
        try:
            await fm.invalidate_kernel(fs)
        except BaseException:
            fs.broken = True
            fs.confirmed_epoch = 0
            raise
        for _ in run:
            await fm.faults.hit("member.before_ack")
        return [None] * len(run)

    async def handle_stream(self, peer: str, msg) -> None:
        fm = self.fm
        await fm.faults.hit("member.before_apply")
        e = await self._entry_at(msg.fid, msg.epoch)
        if e.master != peer:
            raise NotMaster(f"file {msg.fid}: {peer} is not its master at epoch {msg.epoch}")
        state = e.members.get(self.node)
        if state is None or state == SPLIT:
            raise PeerError(errno.EINVAL, f"{self.node} is not a member of file {msg.fid}")
        fs = fm.runtime(msg.fid)
        if isinstance(msg, m.ResyncStart):
            fs.broken = False
            fs.confirmed_epoch = 0
            if not fm.store.exists(msg.fid):  # missing or damaged: start from a new empty copy
                if fs.lf is not None:
                    fm.store.release(fs.lf)
                    fs.lf = None
                await fm.io(fm.store.create, msg.fid, "")
        elif fs.broken:
            raise GfvmError(f"file {msg.fid}: an earlier frame failed here; waiting for a resync")
        try:
            lf = await fm.local(fs)
            if isinstance(msg, m.ReplWrite):
                if (msg.epoch, msg.seq) > fs.applied:
                    await fm.io(partial(lf.write, msg.offset, msg.data, cached=True))
                    fs.applied = (msg.epoch, msg.seq)
            elif isinstance(msg, m.ReplPages):
                if (msg.epoch, msg.seq) > fs.applied:
                    await fm.io(partial(lf.write_pages, list(msg.offsets), msg.data, cached=True))
                    fs.applied = (msg.epoch, msg.seq)
            elif isinstance(msg, m.ReplTruncate):
                if (msg.epoch, msg.seq) > fs.applied:
                    await fm.io(lf.truncate, msg.size)
                    fs.applied = (msg.epoch, msg.seq)
            elif isinstance(msg, m.ReplFlush):
                await fm.faults.hit("member.before_flush")
                cut = await fm.io(lambda: lf.flush(gen=msg.gen, epoch=msg.epoch, seq=msg.seq, clear=False))
                cuts = getattr(fs, "flush_cuts", None)
                if cuts is None or getattr(fs, "cuts_epoch", None) != msg.epoch:
                    cuts = fs.flush_cuts = {}
                    fs.cuts_epoch = msg.epoch
                cuts[msg.flush_id] = cut
                if msg.clear_id in cuts:
                    await fm.io(lf.clear_hot, cuts[msg.clear_id])
                    for k in [k for k in cuts if k <= msg.clear_id]:
                        if k != msg.flush_id:
                            del cuts[k]
                if len(cuts) > 64:
                    for k in sorted(cuts)[:-32]:
                        del cuts[k]
                fs.confirmed_epoch = msg.epoch
            elif isinstance(msg, m.ReplChunk):
                if msg.size < lf.size:
                    log.warning("file %d: resync chunk %d from %s cuts this copy from %d to %d bytes",
                                msg.fid, msg.chunk, peer, lf.size, msg.size)
                await fm.io(lf.write_chunk, msg.chunk, msg.data, list(msg.sums), msg.size)
            elif isinstance(msg, m.ResyncStart):
                if msg.size < lf.size:
                    log.warning("file %d: %s resync from %s cuts this copy from %d to %d bytes",
                                msg.fid, "full" if msg.full else "incremental", peer, lf.size,
                                msg.size)
                if msg.full:
                    await fm.io(lf.reset, msg.size)
                elif lf.size != msg.size:
                    await fm.io(lf.truncate, msg.size)
            await fm.invalidate_kernel(fs)
        except BaseException:
            fs.broken = True
            fs.confirmed_epoch = 0
            raise
        await fm.faults.hit("member.before_ack")

    # -- requests (any node -> master or member) --

    async def handle_request(self, peer: str, msg):
        fm = self.fm
        if isinstance(msg, (m.ClientRead, m.ClientWrite, m.ClientPages, m.ClientTruncate, m.ClientFsync,
                            m.FileStat)):
            e = fm.file_entry(msg.fid)
            if e.master != self.node:
                raise NotMaster(f"file {msg.fid}: {self.node} is not its master ({e.master} is)")
            fs = fm.runtime(msg.fid)
            if isinstance(msg, m.ClientRead):
                data = await self.read(fs, e, msg.offset, msg.length)
                return m.ReadReply(fs.lf.size, data, rid=m.PENDING)
            if isinstance(msg, m.ClientWrite):
                await self.write(fs, e, msg.offset, bytes(msg.data))
                return m.Done(len(msg.data), rid=m.PENDING)
            if isinstance(msg, m.ClientPages):
                await self.write_pages(fs, e, list(msg.offsets), bytes(msg.data))
                return m.Done(len(msg.data), rid=m.PENDING)
            if isinstance(msg, m.ClientTruncate):
                await self.truncate(fs, e, msg.size)
                return m.Done(msg.size, rid=m.PENDING)
            if isinstance(msg, m.ClientFsync):
                await self.fsync(fs, e)
                return m.Done(0, rid=m.PENDING)
            await self.ensure_ready(fs, e)
            lf = await fm.local(fs)
            return m.FileStatReply(lf.size, e.mtime_ns, fs.last_seq, rid=m.PENDING)
        if isinstance(msg, m.Probe):
            await self._entry_at(msg.fid, msg.epoch)  # our metadata (and copy) caught up first
            fs = fm.runtime(msg.fid)
            try:
                lf = await fm.local(fs)
            except MissingCopy:
                return m.ProbeReply(False, False, "", 0, 0, 0, False, (), rid=m.PENDING)
            known = not lf.hot.all
            hot = sorted(await fm.io(lf.hot_chunks)) if known else []
            return m.ProbeReply(True, not lf.damaged and not fs.broken, lf.info.gen, lf.info.epoch,
                                lf.info.seq, lf.size, known, hot, rid=m.PENDING)
        if isinstance(msg, m.FetchChunk):
            e = fm.file_entry(msg.fid)
            if e.members.get(self.node) != IN_SYNC:
                raise Unavailable(f"{self.node}'s copy of file {msg.fid} is not in sync")
            fs = fm.runtime(msg.fid)
            if fs.broken:
                raise Unavailable(f"{self.node}'s copy of file {msg.fid} is broken")
            lf = await fm.local(fs)
            data, sums = await fm.io(lf.read_chunk, msg.chunk)  # CorruptData: never copied on
            return m.ChunkReply(lf.size, data, sums, rid=m.PENDING)
        if isinstance(msg, m.Promote):
            e = fm.file_entry(msg.fid)
            fs = fm.runtime(msg.fid)
            if e.master == self.node:
                await self.handoff(fs, e, msg.target, msg.force)
            elif msg.target == self.node and not fm.alive(e.master):
                await self.take_over(fs, e, msg.force)
            else:
                raise NotMaster(f"file {msg.fid}: ask its master {e.master}")
            return m.Done(0, rid=m.PENDING)
        if isinstance(msg, m.CopyLost):
            e = fm.file_entry(msg.fid)
            if e.master != self.node:
                raise NotMaster(f"file {msg.fid}: {e.master} is its master")
            fs = fm.runtime(msg.fid)
            if e.members.get(peer) == IN_SYNC and fs.ready_epoch == e.epoch:
                await self.drop(fs, peer, f"it reports: {msg.reason}")
                fs.bitmaps[peer] = None
            return m.Done(0, rid=m.PENDING)
        raise PeerError(errno.EPROTO, f"unexpected request {type(msg).__name__}")
