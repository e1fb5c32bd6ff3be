"""Migration as a gfvmd component: the `migrate` control op, the peer requests of the protocol
(gfvm/migrate/messages.py) and the recovery of migrations a dead gfvmd left in flight.

    control ops   migrate {id | pid, to, allow_remote, prefetch}   (gfvm migrate, with progress)
                  migrate.fault {name, action}                      (arm a fault point)
                  migrate.state {}                                  (what is in flight here)
    peer requests MigProbe, MigPrepare, MigHandoffCheck, MigRestore, MigCommit, MigAbort,
                  MigQuery
                  (on the File Manager's authenticated channels)

Needs the File Manager and the pager of the same gfvmd (`daemon.fm`, `daemon.pager`).
gfvmd becomes a child subreaper here: restored trees are re-parented to it when `criu restore`
exits, and it reaps their roots.

Recovery (`reconcile`, at start and then every few seconds while something is unresolved),
from the journals (gfvm/migrate/journal.py) and the process's `owner` file, which the target
writes, durably on every replica, right before it lets the process run (the commit point):
  source, not handed off   -> the files are still ours: thaw our copy (the pager has taken it
                              back and serves its released pages from the local file)
  source, handed off       -> owner names the target: it runs there, drop our copy;
                              else take the files back (epoch+1), read owner again as master
                              (authoritative now), thaw if nobody committed
  target, not committed    -> kill whatever was restored here
  target, committed        -> ours: let the restored tasks run (SIGCONT), then master the
                              files here again (the source may have taken them back meanwhile)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import trio

from gfvm.errors import ConfigError, GfvmError, NotFound, UsageError
from gfvm.fm.messages import PENDING
from gfvm.migrate import criu, nodeinfo
from gfvm.migrate.faults import POINTS, new_faults
from gfvm.migrate.journal import Journal
from gfvm.migrate.messages import (
    MigAbort,
    MigCommit,
    MigDone,
    MigHandoffCheck,
    MigPrepare,
    MigProbe,
    MigProbeReply,
    MigQuery,
    MigRestore,
)
from gfvm.migrate.source import SourceMigration, process_files, promote_all, take_back
from gfvm.migrate.target import TargetSide, kill_tree_root, read_owner

log = logging.getLogger("gfvm.migrate")

PREFETCH_MODES = ("hot", "all", "none")


@dataclass
class MigrateSettings:
    """cluster.toml [migrate] (sizes in MiB there, bytes here)."""

    memory_reserve: int = 256 << 20  #: a target keeps this much memory free
    disk_reserve: int = 256 << 20  #: and this much disk
    preflush_rounds: int = 8  #: at most this many flushes before the freeze
    preflush_enough: int = 256  #: stop pre-flushing once a round finds no more dirty pages
    restore_timeout: float = 120.0  #: seconds the source waits for the target's restore
    take_back_timeout: float = 30.0  #: seconds a rollback tries to get the files back
    prepared_timeout: float = 600.0  #: a target forgets a reservation nobody followed up


def settings_from_config(section: dict | None) -> MigrateSettings:
    s = MigrateSettings()
    section = section or {}
    known = {"memory_reserve_mib", "disk_reserve_mib", "preflush_rounds", "restore_timeout_s",
             "take_back_timeout_s"}
    unknown = set(section) - known
    if unknown:
        raise ConfigError(f"[migrate]: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    try:
        if "memory_reserve_mib" in section:
            s.memory_reserve = int(section["memory_reserve_mib"]) << 20
        if "disk_reserve_mib" in section:
            s.disk_reserve = int(section["disk_reserve_mib"]) << 20
        if "preflush_rounds" in section:
            s.preflush_rounds = int(section["preflush_rounds"])
        if "restore_timeout_s" in section:
            s.restore_timeout = float(section["restore_timeout_s"])
        if "take_back_timeout_s" in section:
            s.take_back_timeout = float(section["take_back_timeout_s"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[migrate]: {exc}") from None
    if s.memory_reserve < 0 or s.disk_reserve < 0 or not 1 <= s.preflush_rounds <= 100:
        raise ConfigError("[migrate]: reserves must be >= 0 and preflush_rounds 1..100")
    return s


class MigrationService:
    """The migration component of gfvmd (see the module header)."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.node = daemon.node_name
        section = daemon.config.sections.get("migrate") if daemon.config else None
        self.settings = settings_from_config(section)
        self.faults = new_faults()
        self.faults.arm_from_env(os.environ.get("GFVM_FAULT"))
        self.journal = Journal(daemon.paths.run / "migrate")
        self.target = TargetSide(self)
        self.outgoing: dict[str, SourceMigration] = {}
        self.limiter = trio.CapacityLimiter(4)
        self.nursery: trio.Nursery | None = None
        self._roots: set[int] = set()  # restored tree roots we must reap
        self._unresolved = False
        self._settling = trio.Lock()  # one reconcile at a time (housekeeping, `migrate`)
        daemon.migration = self
        # A tree caught mid-migration by a gfvmd restart is taken back by `reconcile`, once it
        # is known where the process lives; and a node whose process moved away must not
        # delete the paging file the target now uses.
        daemon.pager.defer_takeover = self._defer_takeover
        daemon.pager.may_remove_files = self._may_remove_files

    @property
    def pager(self):
        return self.daemon.pager

    @property
    def fm(self):
        return self.daemon.fm.fm

    @property
    def files(self):
        return self.daemon.fm.files

    # ------------------------------------------------------------------ lifetime

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        criu.become_subreaper()
        c = self.daemon.control
        c.register("migrate", self._op_migrate)
        c.register("migrate.fault", self._op_fault)
        c.register("migrate.state", self._op_state)
        handlers = {
            MigProbe: self._on_probe,
            MigPrepare: self._on_prepare,
            MigHandoffCheck: self._on_check,
            MigRestore: self._on_restore,
            MigCommit: self._on_commit,
            MigAbort: self._on_abort,
            MigQuery: self._on_query,
        }
        self.fm.request_handlers.update(handlers)
        async with trio.open_nursery() as n:
            self.nursery = n
            n.start_soon(self._housekeeping)
            task_status.started()

    async def _housekeeping(self) -> None:
        await self._reconcile_guarded()
        while True:
            await trio.sleep(0.5)
            try:
                self._reap()
                self._expire_prepared()
            except Exception:  # noqa: BLE001 - must not end gfvmd
                log.exception("migration housekeeping")
            if self._unresolved:
                await self._reconcile_guarded()
                await trio.sleep(2)

    def flag_unresolved(self) -> None:
        """Something is left to settle (a journal says so): reconcile soon."""
        self._unresolved = True

    def spawn(self, fn, *args) -> None:
        """Runs `fn(*args)` in the background; a failure is logged, never fatal to gfvmd."""

        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception:  # noqa: BLE001 - background work must not take gfvmd down
                log.exception("%s failed", getattr(fn, "__name__", fn))

        self.nursery.start_soon(guarded)

    def watch_restored_root(self, pid: int) -> None:
        """A restored tree's root is our child now (subreaper): reap it when it exits."""
        self._roots.add(pid)

    def _reap(self) -> None:
        for pid in list(self._roots):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._roots.discard(pid)

    def _expire_prepared(self) -> None:
        for gfvm_id, inc in list(self.target.incoming.items()):
            if _age(inc) < self.settings.prepared_timeout:
                continue
            if inc.phase == "prepared":
                log.info("%s: forgetting a reservation nobody followed up", gfvm_id)
                self.spawn(self.target.abort, gfvm_id, "expired")
            elif inc.phase in ("failed", "running"):
                self.target.incoming.pop(gfvm_id, None)

    # ------------------------------------------------------------------ control ops

    async def _op_migrate(self, args: dict, progress) -> dict:
        if self.daemon.config is None or len(self.daemon.config.nodes) < 2:
            raise UsageError("this node is not part of a cluster with other nodes: there is "
                             "nowhere to migrate to")
        to = args.get("to", "auto")
        if not isinstance(to, str) or not to:
            raise UsageError("migrate: `to` must be a node name or \"auto\"")
        prefetch = args.get("prefetch", "hot")
        if prefetch not in PREFETCH_MODES:
            raise UsageError(f"migrate: prefetch must be one of {', '.join(PREFETCH_MODES)}")
        tree = await trio.to_thread.run_sync(self._resolve, args)
        gfvm_id = tree.rec.id
        if gfvm_id in self.outgoing:
            other = self.outgoing[gfvm_id]
            raise UsageError(f"{gfvm_id} is already being migrated"
                             f"{' to ' + other.target if other.target else ''}: wait for it")
        if tree.state not in ("running", "starting"):
            raise UsageError(f"{gfvm_id} is {tree.state}: only a running process can migrate")
        mig = SourceMigration(self, tree, to=to, allow_remote=bool(args.get("allow_remote")),
                              prefetch=prefetch)
        async with self._settling:
            await self._settle_incoming(gfvm_id)
            self.outgoing[gfvm_id] = mig  # from here on, reconcile leaves its files alone
        try:
            return await mig.run(progress)
        finally:
            self.outgoing.pop(gfvm_id, None)

    async def _settle_incoming(self, gfvm_id: str) -> None:
        """Before `gfvm_id` migrates away: settles what the migration that brought it here left
        to do after a gfvmd restart (its files may still be mastered by its former node)."""
        rec = (await trio.to_thread.run_sync(self.journal.load_all, "in")).get(gfvm_id)
        if rec is None or gfvm_id in self.target.incoming:
            return
        try:
            await self._reconcile_in(gfvm_id, rec)
        except GfvmError as exc:
            raise UsageError(f"{gfvm_id}: the migration that brought it to {self.node} is not "
                             f"settled yet ({exc}); try again shortly") from None

    def _resolve(self, args: dict):
        """The managed tree named by `id` (id or name) or `pid` (any host pid of it). Blocks
        briefly (reads /proc)."""
        pager = self.pager
        pid = args.get("pid")
        ident = args.get("id")
        if pid is not None:
            if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
                raise UsageError("migrate: `pid` must be a positive integer")
            for tree in list(pager.trees.values()):
                if tree.rec.init_pid == pid or any(
                    s.host_pid == pid for s in list(tree.spaces.values())
                ):
                    return tree
            if os.path.exists(f"/proc/{pid}"):
                raise NotFound(f"process {pid} is not managed by gfvm on {self.node} (see "
                               f"`gfvm ls`; `gfvm adopt {pid}` puts it under management)")
            raise NotFound(f"there is no process {pid} on {self.node}")
        if not isinstance(ident, str) or not ident:
            raise UsageError("migrate: give the process's gfvm id, name or pid")
        return pager.tree(ident)

    async def _op_fault(self, args: dict, progress) -> dict:
        name, action = args.get("name", ""), args.get("action", "")
        if not name:
            return {"points": POINTS, "armed": {k: v[0] for k, v in self.faults.armed.items()}}
        self.faults.arm(str(name), str(action))
        return {"armed": {k: v[0] for k, v in self.faults.armed.items()}}

    async def _op_state(self, args: dict, progress) -> dict:
        return {
            "outgoing": {k: {"target": m.target, "step": m.step} for k, m in self.outgoing.items()},
            "incoming": {k: inc.summary() for k, inc in self.target.incoming.items()},
            "journal": {"out": self.journal.load_all("out"), "in": self.journal.load_all("in")},
            "unresolved": self._unresolved,
        }

    # ------------------------------------------------------------------ peer requests

    async def _on_probe(self, peer: str, msg: MigProbe):
        refusal = await trio.to_thread.run_sync(
            self.target.refusal, msg.gfvm_id, msg.need_memory, msg.need_disk
        )
        mem = await trio.to_thread.run_sync(nodeinfo.mem_available)
        disk = await trio.to_thread.run_sync(nodeinfo.disk_free, self.daemon.paths.state)
        return MigProbeReply(mem, disk, len(self.pager.trees), refusal[:1000], rid=PENDING)

    async def _on_prepare(self, peer: str, msg: MigPrepare):
        spec = _json(msg.spec)
        inc = self.target.incoming.get(msg.gfvm_id)
        if inc is not None and inc.phase == "prepared" and inc.source == peer:
            return _done({"node": self.node})  # a retried request
        return _done(await self.target.prepare(msg.gfvm_id, peer, spec))

    async def _on_check(self, peer: str, msg: MigHandoffCheck):
        self._from_source(peer, msg.gfvm_id)
        return _done(await self.target.check(msg.gfvm_id, list(msg.paths), msg.index_path,
                                             msg.index_bytes))

    async def _on_restore(self, peer: str, msg: MigRestore):
        inc = self._from_source(peer, msg.gfvm_id)
        if inc.phase in ("restoring", "running"):  # a retried request: same answer
            await inc.done.wait()
            if inc.phase != "running" or inc.error:
                raise GfvmError(inc.error or "the restore failed")
            return _done(inc.result)
        return _done(await self.target.restore(msg.gfvm_id, _json(msg.spec)))

    async def _on_commit(self, peer: str, msg: MigCommit):
        self._from_source(peer, msg.gfvm_id)
        return _done(self.target.commit(msg.gfvm_id))

    async def _on_abort(self, peer: str, msg: MigAbort):
        inc = self.target.incoming.get(msg.gfvm_id)
        if inc is not None and inc.source != peer:
            raise UsageError(f"{msg.gfvm_id} is coming from {inc.source}, not {peer}")
        state = await self.target.abort(msg.gfvm_id, msg.reason)
        return _done(state)

    async def _on_query(self, peer: str, msg: MigQuery):
        return _done(self.target.query(msg.gfvm_id))

    def _from_source(self, peer: str, gfvm_id: str):
        inc = self.target.incoming.get(gfvm_id)
        if inc is None:
            raise UsageError(f"{self.node} was not prepared to receive {gfvm_id}")
        if inc.source != peer:
            raise UsageError(f"{gfvm_id} is coming from {inc.source}, not {peer}")
        return inc

    # ------------------------------------------------------------------ recovery

    def _defer_takeover(self, gfvm_id: str) -> bool:
        """Pager hook (blocking): a journal names this tree, so reconcile decides first."""
        return any(gfvm_id in self.journal.load_all(side) for side in ("out", "in"))

    def _may_remove_files(self, gfvm_id: str) -> bool:
        """Pager hook (worker thread): the paging file of an ended tree may be deleted only when
        no migration is in flight and `owner` names this node or nobody. (A restore past its
        commit point is no migration in flight: the process is ours, only its files'
        mastership may still have to come back after a restart.)"""
        in_flight = gfvm_id in self.journal.load_all("out") or \
            self.journal.load_all("in").get(gfvm_id, {}).get("phase") not in (
                None, "committed", "resumed")
        if in_flight or gfvm_id in self.target.incoming:
            return False
        try:
            owner = trio.from_thread.run(read_owner, self.files, f"procs/{gfvm_id}",
                                         trio_token=self.daemon.fm.backing.token)
        except Exception:  # noqa: BLE001 - unknown: keep the file
            return False
        return owner in ("", self.node)

    async def _reconcile_guarded(self) -> None:
        try:
            async with self._settling:
                await self.reconcile()
        except Exception:  # noqa: BLE001 - retried later; must not end gfvmd
            log.exception("reconciling migrations")
            self._unresolved = True

    async def reconcile(self) -> None:
        """Finishes or undoes migrations a previous gfvmd left in flight (module header)."""
        unresolved = False
        for gfvm_id, rec in (await trio.to_thread.run_sync(self.journal.load_all, "in")).items():
            if gfvm_id in self.target.incoming:
                continue  # ours, live: not a leftover
            try:
                await self._reconcile_in(gfvm_id, rec)
            except GfvmError as exc:
                log.warning("%s: cannot settle the interrupted restore yet: %s", gfvm_id, exc)
                unresolved = True
        for gfvm_id, rec in (await trio.to_thread.run_sync(self.journal.load_all, "out")).items():
            if gfvm_id in self.outgoing:
                continue
            try:
                done = await self._reconcile_out(gfvm_id, rec)
            except GfvmError as exc:
                log.warning("%s: cannot settle the interrupted migration yet: %s", gfvm_id, exc)
                done = False
            unresolved |= not done
        self._unresolved = unresolved

    async def _reconcile_in(self, gfvm_id: str, rec: dict) -> None:
        phase = rec.get("phase")
        paging_dir = f"procs/{gfvm_id}"
        pager = self.pager
        if phase in ("committed", "resumed"):
            # We committed to running it (owner names us), and it has not moved on since: a
            # migration away settles this first (_settle_incoming).
            await self._run_committed(gfvm_id, rec)
        elif phase in ("restoring", "restored"):
            owner = await read_owner(self.files, paging_dir)  # Unavailable: retried later
            if owner == self.node:
                raise GfvmError(f"{gfvm_id}: owner names us but the journal says {phase}")
            log.info("%s: dropping a restore that never committed", gfvm_id)
            await trio.to_thread.run_sync(pager.forget_record, gfvm_id)
            root = int(rec.get("root_pid") or 0)
            if root:
                await trio.to_thread.run_sync(kill_tree_root, root, rec.get("root_start"))
        await trio.to_thread.run_sync(self.journal.remove, "in", gfvm_id)

    async def _run_committed(self, gfvm_id: str, rec: dict) -> None:
        """Takes the process back, lets it run, masters its files here again."""
        pager = self.pager
        if gfvm_id not in pager.trees:
            try:
                await trio.to_thread.run_sync(pager.retake, gfvm_id)
            except NotFound:
                if rec.get("phase") != "resumed":
                    raise
                # it ran here and has ended since (its state record went with it)
                log.info("%s: ended here; nothing left to settle", gfvm_id)
                return
        if rec.get("phase") == "committed":
            log.info("%s: resuming the restored process after a gfvmd restart", gfvm_id)
            await trio.to_thread.run_sync(_resume_pids, [int(p) for p in rec.get("pids", [])])
            await trio.to_thread.run_sync(self.journal.save, "in", gfvm_id,
                                          {**rec, "phase": "resumed"})
        # The source, finding us dead, took the files back and could not give them back (our
        # copies were outdated then). The process runs here, so its files are mastered here
        # again, once our copies are in sync (until then this is retried).
        if gfvm_id in pager.trees:
            await promote_all(self, process_files(gfvm_id), self.node)

    async def _reconcile_out(self, gfvm_id: str, rec: dict) -> bool:
        """True when settled (journal removed)."""
        from pathlib import Path

        from gfvm.migrate.source import _kill_frozen
        from gfvm.pager.cgroup import TreeCgroup
        from gfvm.pager.tracker import _pid_matches

        pager = self.pager
        paging_dir = f"procs/{gfvm_id}"
        files = process_files(gfvm_id)
        cgroup = TreeCgroup(tuple(Path(p) for p in rec.get("cgroup", [])))
        target = rec.get("target")
        init_pid, init_start = int(rec.get("init_pid") or 0), int(rec.get("init_start") or 0)

        async def drop_ours() -> bool:
            await trio.to_thread.run_sync(pager.forget_record, gfvm_id)
            await trio.to_thread.run_sync(_kill_frozen, cgroup)
            await trio.to_thread.run_sync(self.journal.remove, "out", gfvm_id)
            return True

        if not _pid_matches(init_pid, init_start):
            log.info("%s: the process is gone here; nothing to settle", gfvm_id)
            await trio.to_thread.run_sync(self.journal.remove, "out", gfvm_id)
            return True
        owner = await read_owner(self.files, paging_dir)
        if owner and owner != self.node:
            log.info("%s: %s runs it since the interrupted migration: dropping our copy",
                     gfvm_id, owner)
            return await drop_ours()
        # every file, not only the index: the promotions run concurrently, so an interrupted
        # handoff may have moved some files and not others
        masters = set()
        for path in files:
            try:
                masters.add((await self.files.where(path))["master"])
            except NotFound:
                pass  # not made yet (the interruption came before the dump)
        if target:
            try:
                await self.fm.net.request(target, MigAbort(gfvm_id, "source restarted"),
                                          timeout=10)
            except GfvmError as exc:
                log.info("%s: abort on %s: %s", gfvm_id, target, exc)
        if masters - {self.node}:
            owner = await take_back(self, gfvm_id, files)
            if owner and owner != self.node:
                try:
                    await promote_all(self, files, owner)
                except GfvmError as exc:
                    log.warning("%s: giving the files back to %s: %s", gfvm_id, owner, exc)
                return await drop_ours()
        log.info("%s: rolling back the interrupted migration: it runs on %s again", gfvm_id,
                 self.node)
        if gfvm_id not in pager.trees:
            await trio.to_thread.run_sync(pager.retake, gfvm_id)
        tree = pager.trees.get(gfvm_id)
        if tree is not None and tree.state == "released":
            await trio.to_thread.run_sync(pager.reattach, gfvm_id)
        await trio.to_thread.run_sync(cgroup.thaw)
        await trio.to_thread.run_sync(self.journal.remove, "out", gfvm_id)
        return True


def _resume_pids(pids: list[int]) -> None:
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _age(inc) -> float:
    import time

    return time.monotonic() - inc.created


def _json(raw) -> dict:
    try:
        value = json.loads(bytes(raw) or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"malformed migration request: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError("malformed migration request: not a JSON object")
    return value


def _done(info: dict) -> MigDone:
    return MigDone(True, json.dumps(info).encode(), rid=PENDING)
