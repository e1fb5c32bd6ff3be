"""The source's side of a migration: DESIGN.md's sequence, driven from here.

    1 pick      the target: --to NODE, or among the alive nodes holding an in-sync replica of
                the process's files (asked with MigProbe: free memory, disk, load), least loaded
    2 preflush  pager.flush_all while the process runs, until the dirty set stops shrinking
    3 freeze    the tree's cgroup (v2 cgroup.freeze, or the v1 freezer)
    4 flush     the final flush: what was dirtied since, durable on every replica
    5 release   pager.release_memory: the managed memory leaves the frozen process
    6 dump      criu dump --leave-running into a local staging dir; manifest; one file
                /gfvm/procs/<id>/ckpt, fsynced (= on every replica)
    7 handoff   the target confirms its copies are in sync (index at least as long as after
                the final flush); then every file is promoted to it (epoch+1, committed by a
                majority including us: this demotes us)
    8 restore   the target restores and runs the process (gfvm/migrate/target.py)
    9 done      our frozen copy is killed; the pager forgets the tree (hand_over)

Exactly one live copy: our copy stays frozen from step 3 until the target has started its own
(then it is killed); the target starts its copy only while it is the files' master. A failure
before the target runs the process rolls back here: the target is told to drop whatever it
restored, the files are promoted back to us if they had moved, the pager re-registers the
released ranges (missing pages are served from our local master copy) and the tree is thawed.
Nothing is lost: every page is in the paging file before it leaves memory. If the files cannot
be taken back (the target died after the handoff and the cluster will not fail it over yet),
the process stays frozen and the journal makes gfvmd retry (see MigrationService.reconcile).

Progress lines go to the `progress` callback; the result is the report (gfvm/migrate/report.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import trio

from gfvm.errors import GfvmError, NotFound, Unavailable, UsageError
from gfvm.migrate import ckptfile, criu, nodeinfo
from gfvm.migrate.manifest import write_manifest
from gfvm.migrate.target import CRIU_VERBOSITY, OWNER, read_owner, write_owner
from gfvm.migrate.messages import (
    MigAbort,
    MigCommit,
    MigDone,
    MigHandoffCheck,
    MigPrepare,
    MigProbe,
    MigProbeReply,
    MigRestore,
)
from gfvm.pager.cgroup import TreeCgroup
from gfvm.pager.tracker import TreeDead

log = logging.getLogger("gfvm.migrate")

FILES = ("pages", "index", "meta.json")
CKPT = "ckpt"
MIN_DISK = 64 << 20  # what a checkpoint may need on the target, beyond the paging file
LOG_TAIL = 64 << 10


class MigrationFailed(GfvmError):
    """A migration that was rolled back (or could not be): the message says which."""

    kind = "migration-failed"


class ProcessExited(GfvmError):
    kind = "process-exited"


class SourceMigration:
    """One outgoing migration (create, then `await run(progress)`)."""

    def __init__(self, service, tree, *, to: str, allow_remote: bool, prefetch: str) -> None:
        self.svc = service
        self.tree = tree
        self.id = tree.rec.id
        self.to = to
        self.allow_remote = allow_remote
        self.prefetch = prefetch
        self.dir = f"procs/{self.id}"
        self.paths = [f"{self.dir}/{n}" for n in FILES]
        self.ckpt_path = f"{self.dir}/{CKPT}"
        self.target: str | None = None
        self.remote = False
        self.step = "pick"
        self.frozen = False
        self.released = False
        self.handing_off = False  # promotions started: some files may have moved (see _fail)
        self.handed_off = False
        self.running_on_target = False
        self.prepared = False
        self.error: GfvmError | None = None  # set by _fail: what the user is told
        self.report: dict = {"id": self.id, "name": tree.rec.name, "source": service.node}
        self.cgroup = TreeCgroup(tuple(Path(p) for p in tree.rec.cgroup))
        self.stage = service.daemon.paths.run / "migrate" / f"{self.id}.out"
        self._progress = None

    # ------------------------------------------------------------------ helpers

    async def say(self, text: str) -> None:
        log.info("%s: %s", self.id, text)
        if self._progress is not None:
            await self._progress(text)

    async def request(self, node: str, msg, timeout: float) -> dict:
        """One request to a peer; the MigDone info as a dict. Unavailable / PeerError raise."""
        reply = await self.svc.fm.net.request(node, msg, timeout=timeout)
        if isinstance(reply, MigProbeReply):
            return {"mem_available": reply.mem_available, "disk_free": reply.disk_free,
                    "managed": reply.managed, "refusal": reply.refusal}
        if not isinstance(reply, MigDone):
            raise GfvmError(f"{node} answered {type(reply).__name__} to {type(msg).__name__}")
        info = json.loads(bytes(reply.info) or b"{}")
        if not isinstance(info, dict):
            raise GfvmError(f"{node} sent a malformed answer to {type(msg).__name__}")
        return info

    async def thread(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self.svc.limiter)

    def journal(self, phase: str) -> None:
        rec = self.tree.rec
        self.svc.journal.save("out", self.id, {"phase": phase, "target": self.target,
                                               "handed_off": self.handed_off,
                                               "remote": self.remote, "cgroup": rec.cgroup,
                                               "init_pid": rec.init_pid,
                                               "init_start": rec.init_start_time})

    async def index_size(self) -> int:
        f = await self.svc.files.open(f"{self.dir}/index")
        return await f.size()

    def check_alive(self) -> None:
        tree = self.tree
        if tree.state in ("ended", "killed") or not tree.worker_alive():
            raise ProcessExited(f"process {self.id} ({tree.rec.name}) exited during the migration")
        from gfvm.pager.tracker import _pid_matches

        if not _pid_matches(tree.rec.init_pid, tree.rec.init_start_time):
            raise ProcessExited(f"process {self.id} ({tree.rec.name}) exited during the migration")

    def gone(self) -> bool:
        try:
            self.check_alive()
            return False
        except ProcessExited:
            return True

    # ------------------------------------------------------------------ the sequence

    async def run(self, progress) -> dict:
        self._progress = progress
        started = time.monotonic()
        try:
            await self._run()
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await self._fail(exc)
            if isinstance(exc, Exception) and self.error is not None and self.error is not exc:
                raise self.error from None
            raise
        finally:
            with trio.CancelScope(shield=True):
                await self.thread(shutil.rmtree, self.stage, True)
        self.report["total_s"] = round(time.monotonic() - started, 4)
        return self.report

    async def _run(self) -> None:
        svc, faults = self.svc, self.svc.faults
        self.journal("picked")
        # 1. target
        await self.pick()
        await faults.hit("migrate.after_pick")
        # 2. pre-flush while running: clean pages out of memory, the dirty ones to the file
        # until that stops shrinking, the target prepared, one more round
        self.step = "pre-flush"
        await self.release_cold()
        await self.preflush()
        await self.prepare_target()
        hot_from = await self.preflush(final=True)
        await faults.hit("migrate.after_preflush")
        # 3. freeze
        self.step = "freeze"
        net0 = await self.thread(nodeinfo.network_bytes)
        t_freeze = time.monotonic()
        timings: dict[str, float] = {}
        self.check_alive()
        await self.thread(self.cgroup.freeze)
        self.frozen = True
        self.journal("frozen")
        self.check_alive()
        await self.say("frozen")
        await faults.hit("migrate.after_freeze")
        # 4. final flush
        self.step = "final flush"
        t = time.monotonic()
        try:
            flushed = await self.thread(svc.pager.flush_all, self.id)
        except TreeDead:
            raise ProcessExited(f"process {self.id} exited during the migration") from None
        index_bytes = await self.index_size()
        timings["final_flush"] = time.monotonic() - t
        await self.say(f"final flush: {flushed.pages} pages ({_mib(flushed.bytes)}) durable on "
                       f"every replica in {timings['final_flush'] * 1000:.0f} ms")
        await faults.hit("migrate.after_final_flush")
        # 5. release
        self.step = "memory release"
        t = time.monotonic()
        dropped = await self.thread(svc.pager.release_memory, self.id)
        self.released = True
        self.journal("released")
        timings["memory_release"] = time.monotonic() - t
        await self.say(f"released {dropped} pages ({_mib(dropped * 4096)}) from the process in "
                       f"{timings['memory_release'] * 1000:.0f} ms")
        await faults.hit("migrate.after_release")
        # 6. dump
        self.step = "dump"
        t = time.monotonic()
        images = self.stage / "images"
        await self.thread(shutil.rmtree, self.stage, True)
        images.mkdir(parents=True, mode=0o700)
        try:
            dump = await criu.dump(
                self.tree.rec.init_pid, images, work_dir=self.stage, leave_running=True,
                freeze_cgroup=str(self.cgroup.paths[0]), verbosity=CRIU_VERBOSITY,
            )
        except criu.CriuError:
            self.check_alive()
            raise
        timings["dump"] = time.monotonic() - t
        await self.say(f"dumped the tree with CRIU: {_kib(dump.images_bytes)} of images in "
                       f"{timings['dump'] * 1000:.0f} ms")
        await faults.hit("migrate.after_dump")
        t = time.monotonic()
        epoch = (await svc.files.where(f"{self.dir}/index"))["epoch"]
        await self.thread(lambda: write_manifest(
            images, epoch=epoch, seq=index_bytes, durable=False,
            extra={"id": self.id, "source": svc.node, "target": self.target}))
        blob = await self.thread(ckptfile.pack, images)
        f = await svc.files.open(self.ckpt_path, create=True)
        await f.truncate(0)
        await f.write(0, blob)
        await f.fsync()
        self.journal("dumped")
        timings["image_replication"] = time.monotonic() - t
        await self.say(f"checkpoint committed in /gfvm/{self.ckpt_path} ({_kib(len(blob))}, on "
                       f"every replica) in {timings['image_replication'] * 1000:.0f} ms")
        await faults.hit("migrate.after_images")
        # 7+8. handoff and restore, overlapping: the target restores (stopped, not yet
        # committed) while every file is promoted to it; then it is told to commit and run.
        self.step = "handoff"
        t = time.monotonic()
        files = self.all_files()
        await self.request(self.target, MigHandoffCheck(self.id, files, f"{self.dir}/index",
                                                        index_bytes), timeout=30)
        await faults.hit("migrate.before_handoff")
        self.journal("handing_off")
        self.handing_off = True
        restored: dict = {}

        async def restore() -> None:
            restored.update(await self.request(
                self.target,
                MigRestore(self.id, json.dumps({"ckpt": self.ckpt_path, "hot_from": hot_from,
                                                "prefetch": self.prefetch}).encode()),
                timeout=svc.settings.restore_timeout,
            ))

        async def handoff() -> None:
            if not self.remote:
                await self.promote_all(files, self.target)
            self.handed_off = True
            self.journal("handed_off")
            timings["handoff"] = time.monotonic() - t
            await self.say(
                f"handoff: {self.target} is master of the process's files (epoch {epoch + 1})"
                if not self.remote else f"handoff: {self.target} will read the files remotely"
            )
            await faults.hit("migrate.after_handoff")
            self.step = "restore"
            await self.request(self.target, MigCommit(self.id), timeout=30)

        await run_both(restore, handoff)
        timings["restore"] = time.monotonic() - t - timings["handoff"]
        self.running_on_target = True
        t_end = time.monotonic()
        net1 = await self.thread(nodeinfo.network_bytes)
        freeze = t_end - t_freeze
        timings["other"] = freeze - sum(timings.values())
        await self.say(f"running on {self.target} (restore {timings['restore'] * 1000:.0f} ms); "
                       f"frozen for {freeze * 1000:.0f} ms")
        await faults.hit("migrate.after_restart")
        # 9. forget it here
        self.step = "cleanup"
        await self.forget_local_copy()
        self.svc.journal.remove("out", self.id)
        self.report.update({
            "target": self.target,
            "remote": self.remote,
            "freeze_s": round(freeze, 4),
            "freeze_breakdown_s": {k: round(v, 4) for k, v in timings.items()},
            "written_during_freeze": {"pages": flushed.pages, "bytes": flushed.bytes,
                                      "checkpoint_bytes": len(blob)},
            "network_bytes_during_freeze": net1 - net0,
            "images_bytes": dump.images_bytes,
            "pages_released": dropped,
            "new_pids": restored.get("pids", {}),
            "new_root_pid": restored.get("root_pid"),
            "target_timings_s": restored.get("timings", {}),
            "lazy_pages": restored.get("lazy_pages", {}),
        })

    # ------------------------------------------------------------------ 1. pick

    async def pick(self) -> None:
        svc = self.svc
        nodes = [n.name for n in svc.daemon.config.nodes]
        in_sync = [n for n in await svc.files.in_sync_nodes(self.paths) if n != svc.node]
        snap = self.tree.snapshot()
        need_memory = int(snap.get("rss") or 0)
        if self.to != "auto":
            if self.to not in nodes:
                raise NotFound(f"unknown node {self.to!r} (nodes: {', '.join(nodes)})")
            if self.to == svc.node:
                raise UsageError(f"{self.id} already runs on {svc.node}: the target must be "
                                 "another node")
            if not svc.fm.alive(self.to):
                raise Unavailable(f"{self.to} is not alive (no heartbeat): cannot migrate there")
            if self.to not in in_sync and not self.allow_remote:
                raise UsageError(
                    f"{self.to} holds no in-sync replica of {self.id}'s paging file (replicas in "
                    f"sync: {', '.join(in_sync) or 'none'}); pick one of those, or pass "
                    "--allow-remote to read its pages over the network after the restart"
                )
            candidates = [self.to]
        elif in_sync:
            candidates = in_sync
        elif self.allow_remote:
            candidates = [n for n in nodes if n != svc.node and svc.fm.alive(n)]
        else:
            raise Unavailable(
                f"no alive node holds an in-sync replica of {self.id}'s paging file, so no node "
                "can restart it from a local copy; --allow-remote uses any node and reads the "
                "pages over the network"
            )
        if not candidates:
            raise Unavailable("no other node is alive")
        need_disk = MIN_DISK
        probes: dict[str, dict] = {}

        async def probe(node: str) -> None:
            try:
                probes[node] = await self.request(node, MigProbe(self.id, need_memory, need_disk),
                                                  timeout=10)
            except GfvmError as exc:
                probes[node] = {"refusal": f"{node} did not answer: {exc}"}

        async with trio.open_nursery() as n:
            for node in candidates:
                n.start_soon(probe, node)
        fit = [c for c in candidates if not probes[c].get("refusal")]
        if not fit:
            raise UsageError("no node can take the process: " +
                             "; ".join(probes[c]["refusal"] for c in candidates))
        fit.sort(key=lambda c: (-(probes[c]["mem_available"] >> 28), probes[c]["managed"], c))
        self.target = fit[0]
        self.remote = self.target not in in_sync
        p = probes[self.target]
        if self.to != "auto":
            why = "named with --to"
        else:
            why = (f"least loaded of {len(fit)} candidate(s)" if len(fit) > 1
                   else "the only candidate")
        why += (", holds an in-sync replica of the paging file (pages will be read locally)"
                if not self.remote else
                ", holds no replica: pages will be read over the network (--allow-remote)")
        why += f"; {p['managed']} managed processes, {_mib(p['mem_available'])} of free memory"
        self.report.update({"target": self.target, "why": why, "remote": self.remote,
                            "candidates": {c: probes[c] for c in candidates}})
        await self.say(f"target {self.target}: {why}")
        self.journal("picked")
        self._need = (need_memory, need_disk)

    async def prepare_target(self) -> None:
        """MigPrepare: the target reserves the migration and opens and indexes the paging file
        (proportional to the process's memory: done here, before the freeze)."""
        svc = self.svc
        need_memory, need_disk = self._need
        log_tail = await self.thread(_log_tail, self.tree.rec.log_path)
        spec = {
            "name": self.tree.rec.name, "cmd": self.tree.rec.cmd,
            "asids": sorted(s.asid for s in self.tree.spaces.values() if s.resolved),
            "log_path": self.tree.rec.log_path, "log_tail": log_tail.hex(),
            "need_memory": need_memory, "need_disk": need_disk, "remote": self.remote,
            "mem_limit": self.tree.rec.mem_limit,
        }
        await write_owner(svc.files, self.dir, svc.node)
        self.prepared = True
        t0 = time.monotonic()
        # The checkpoint's file exists before the freeze (creating one is a metadata commit).
        await svc.files.open(self.ckpt_path, create=True)
        await self.request(self.target, MigPrepare(self.id, svc.node, json.dumps(spec).encode()),
                           timeout=120)
        await self.say(f"{self.target} prepared (paging file opened and indexed there in "
                       f"{time.monotonic() - t0:.2f} s)")

    # ------------------------------------------------------------------ 2. pre-flush

    async def release_cold(self) -> None:
        """Clean pages leave memory now, while the process runs (it gets back from the local
        file what it touches): the release in the freeze then has only hot pages to drop."""
        t1 = time.monotonic()
        try:
            cold = await self.thread(self.svc.pager.release_cold, self.id)
        except TreeDead:
            raise ProcessExited(f"process {self.id} exited during the migration") from None
        cold_s = time.monotonic() - t1
        self.report["released_early"] = {"pages": cold, "seconds": round(cold_s, 4)}
        await self.say(f"{cold} clean pages ({_mib(cold * 4096)}) left memory in {cold_s:.2f} s "
                       "(process running)")

    async def preflush(self, final: bool = False) -> int:
        """Flushes while the process runs until the dirty set stops shrinking (again, with
        `final`, after the target's preparation let pages pile up). Returns the index length
        before the last round: what was flushed after it is the recent hot set."""
        rounds: list[int] = []
        before = self.report.get("preflush", {}).get("rounds", []) if final else []
        t0 = time.monotonic()
        mark = await self.index_size()
        for _ in range(self.svc.settings.preflush_rounds):
            self.check_alive()
            mark = await self.index_size()
            try:
                r = await self.thread(self.svc.pager.flush_all, self.id)
            except TreeDead:
                raise ProcessExited(f"process {self.id} exited during the migration") from None
            rounds.append(r.pages)
            if r.pages <= self.svc.settings.preflush_enough or (
                len(rounds) > 1 and r.pages >= rounds[-2]
            ):
                break
        seconds = time.monotonic() - t0
        if final:
            self.report["preflush"]["rounds"] = before + rounds
            self.report["preflush"]["seconds"] += round(seconds, 4)
            return mark
        self.report["preflush"] = {"rounds": rounds, "seconds": round(seconds, 4)}
        await self.say(f"pre-flush: {len(rounds)} rounds, dirty pages per round "
                       f"{' -> '.join(map(str, rounds))} ({seconds:.2f} s, process running)")
        return mark

    # ------------------------------------------------------------------ 7. handoff

    async def promote_all(self, files: list[str], node: str) -> None:
        await promote_all(self.svc, files, node)

    # ------------------------------------------------------------------ 9. success

    async def forget_local_copy(self) -> None:
        """Our frozen copy is obsolete: stop tracking it (keeping the files, the target's now)
        and kill it."""
        pager = self.svc.pager
        await self.thread(pager.hand_over, self.id)
        await self.thread(_kill_frozen, self.cgroup)

    # ------------------------------------------------------------------ failure

    async def _fail(self, exc: BaseException) -> None:
        """Rolls back what was done (see the module header) and turns `exc` into the error the
        user sees (raised by `run`'s caller from self.error)."""
        reason = _reason(exc)
        if self.running_on_target:
            # The target runs it: never thaw our copy; drop it if that is still to do.
            log.warning("%s: after the restart on %s: %s", self.id, self.target, reason)
            try:
                if self.id in self.svc.pager.trees:
                    await self.forget_local_copy()
                self.svc.journal.remove("out", self.id)
                self.error = MigrationFailed(
                    f"{self.id} runs on {self.target}; finishing on {self.svc.node} reported: "
                    f"{reason} (its copy there was dropped)")
            except Exception as exc2:  # noqa: BLE001 - the journal makes gfvmd retry
                self.error = MigrationFailed(
                    f"{self.id} runs on {self.target}, but dropping its frozen copy on "
                    f"{self.svc.node} failed: {exc2} (gfvmd retries)")
                self.svc.flag_unresolved()
            return
        if not self.frozen:
            # Nothing of the process has changed yet: drop the target's reservation and report
            # the cause itself (a refusal, the process exiting, a dead target...).
            if self.prepared:
                try:
                    await self.request(self.target, MigAbort(self.id, reason[:900]), timeout=10)
                except GfvmError as abort_exc:
                    log.warning("%s: abort on %s: %s", self.id, self.target, abort_exc)
            self.svc.journal.remove("out", self.id)
            if isinstance(exc, GfvmError) and self.step == "pick":
                self.error = exc
            elif isinstance(exc, ProcessExited) or (isinstance(exc, Exception) and self.gone()):
                self.error = ProcessExited(
                    f"process {self.id} ({self.tree.rec.name}) exited during the migration")
            elif isinstance(exc, Exception):
                self.error = MigrationFailed(
                    f"migration of {self.id} failed during {self.step}: {reason}; the process "
                    f"was not stopped and runs on {self.svc.node} as before")
            return
        await self.say(f"failed during {self.step}: {reason}; rolling back")
        undone = []
        aborted = False
        try:
            answer = await self.request(self.target, MigAbort(self.id, reason[:900]), timeout=10)
            if answer.get("state") == "running":
                await self._target_owns_it(reason)
                return
            aborted = True
        except GfvmError as abort_exc:
            log.warning("%s: abort on %s: %s", self.id, self.target, abort_exc)
        # A handoff cut short (the restore failed meanwhile and cancelled it) may have moved
        # some files, and a promotion whose caller was cancelled or timed out may still have
        # committed: every file is taken back (take_back decides on the committed
        # configuration; a file still ours is left as it is).
        files_may_have_moved = self.handing_off and not self.remote
        if self.handed_off or files_may_have_moved:
            if self.remote and not aborted:
                self.error = MigrationFailed(
                    f"migration of {self.id} to {self.target} failed during {self.step}: "
                    f"{reason}. {self.target} does not answer, so it is unknown whether it "
                    f"started the process: it stays frozen on {self.svc.node} and gfvmd retries "
                    "until it knows (nothing is lost)")
                return
            try:
                owner = await self.take_back() if not self.remote else self.svc.node
            except GfvmError as back_exc:
                self.error = MigrationFailed(
                    f"migration of {self.id} to {self.target} failed during {self.step}: "
                    f"{reason}. Its files could not be taken back from {self.target} "
                    f"({back_exc}): the process stays frozen on {self.svc.node} and gfvmd "
                    "retries the rollback until it can (nothing is lost)")
                return
            if owner == self.target:
                # It committed (and may run there) before we took the files back: it is the
                # live copy. Give the files back to it and drop ours.
                try:
                    await self.promote_all(self.all_files(), self.target)
                except GfvmError as exc2:
                    log.warning("%s: giving the files back to %s: %s", self.id, self.target, exc2)
                await self._target_owns_it(reason)
                return
            if not self.remote:
                undone.append(f"files promoted back to {self.svc.node}")
        try:
            if self.released:
                await self.thread(self.svc.pager.reattach, self.id)
                undone.append("memory served again from the local paging file")
            await self.thread(self.cgroup.thaw)
            undone.append("process thawed")
        except Exception as rb_exc:  # noqa: BLE001 - reported; the journal makes gfvmd retry
            if isinstance(exc, ProcessExited) or isinstance(rb_exc, TreeDead):
                self.svc.journal.remove("out", self.id)
                self.error = ProcessExited(
                    f"process {self.id} exited during the migration (nothing to move)")
                return
            log.exception("%s: rollback", self.id)
            self.error = MigrationFailed(
                f"migration of {self.id} failed during {self.step}: {reason}; rolling back "
                f"failed too: {rb_exc}")
            return
        self.svc.journal.remove("out", self.id)
        if isinstance(exc, ProcessExited):
            self.error = exc
            return
        where = f" to {self.target}" if self.target else ""
        self.error = MigrationFailed(
            f"migration of {self.id}{where} failed during {self.step}: {reason}. Rolled back: "
            f"{'; '.join(undone) or 'nothing had changed'}; the process runs on "
            f"{self.svc.node} as before (nothing lost)")

    async def _target_owns_it(self, reason: str) -> None:
        self.running_on_target = True
        await self.forget_local_copy()
        self.svc.journal.remove("out", self.id)
        self.error = MigrationFailed(
            f"{self.id} runs on {self.target}: it started the process, but the migration did "
            f"not finish cleanly ({reason}); the copy on {self.svc.node} was dropped")

    def all_files(self) -> list[str]:
        return process_files(self.id)

    async def take_back(self) -> str:
        """Promotes every file back to this node (epoch+1 again), retrying while the cluster
        cannot decide yet (a dead target is failed over only after its lease expired); then
        reads `owner` as the master, which no one else can change any more: the node that
        committed to running the process ("" or us: nobody did)."""
        return await take_back(self.svc, self.id, self.all_files())


def process_files(gfvm_id: str) -> list[str]:
    """Every file of a managed process that a migration hands over (its master moves with it)."""
    return [f"procs/{gfvm_id}/{n}" for n in (*FILES, CKPT, OWNER)]


async def run_both(first, second) -> None:
    """Runs two async functions concurrently; the first failure cancels the other and is raised
    as itself (not wrapped in an exception group)."""
    errors: list[BaseException] = []

    async with trio.open_nursery() as n:
        async def guarded(fn) -> None:
            try:
                await fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
                n.cancel_scope.cancel()

        n.start_soon(guarded, first)
        n.start_soon(guarded, second)
    if errors:
        raise errors[0]


async def promote_all(svc, files: list[str], node: str) -> None:
    """Promotes every file to `node`, concurrently (independent epochs); raises the first
    failure (after every promotion has ended)."""
    errors: list[Exception] = []

    async def one(path: str) -> None:
        try:
            await svc.files.promote(path, node)
        except Exception as exc:  # noqa: BLE001 - collected, the first is raised below
            errors.append(exc)

    async with trio.open_nursery() as n:
        for path in files:
            n.start_soon(one, path)
    if errors:
        err = errors[0]
        raise err if isinstance(err, GfvmError) else GfvmError(f"promotion failed: {err!r}")


async def take_back(svc, gfvm_id: str, files: list[str]) -> str:
    """See SourceMigration.take_back (also used by a restarted gfvmd)."""
    deadline = time.monotonic() + svc.settings.take_back_timeout
    while True:
        try:
            await promote_all(svc, files, svc.node)
            break
        except GfvmError as exc:
            if time.monotonic() > deadline:
                raise MigrationFailed(f"could not take the files back: {_reason(exc)}") from None
            log.info("%s: taking the files back: %s (retrying)", gfvm_id, _reason(exc))
            await trio.sleep(0.5)
    return await read_owner(svc.files, f"procs/{gfvm_id}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, trio.Cancelled):
        return "cancelled (gfvmd is shutting down)"
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_reason(e) for e in exc.exceptions)
    return str(exc) or type(exc).__name__


def _kill_frozen(cgroup: TreeCgroup) -> None:
    cgroup.kill_all()
    cgroup.thaw()  # the v1 freezer lets killed tasks die only once thawed
    deadline = time.monotonic() + 10
    while cgroup.pids() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        cgroup.remove()
    except OSError as exc:
        log.warning("removing %s: %s", cgroup.paths, exc)


def _log_tail(path: str) -> bytes:
    if not path:
        return b""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - LOG_TAIL))
            return f.read()
    except OSError:
        return b""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB"
