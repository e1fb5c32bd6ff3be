"""The pager as a gfvmd component: control ops, managed trees, the keeper, takeover at start.

Control ops (gfvm/pager/cli.py is their client): run, adopt, ls, status, flush.
Python API for the migration code (all blocking; call through trio.to_thread):
    pager.tree(id)                      -> ManagedTree (KeyError-free: NotFound)
    pager.flush_all(id)                 -> FlushResult; freeze the tree first for an exact result
    pager.release_memory(id)            -> pages dropped (tree frozen, after flush_all)
    pager.hand_over(id)                 -> stop tracking, return the uffds (see docs/paging-file.md)
    pager.paging_dir(id), pager.backing -> where the paging file is (load_index(backing, dir))

Lifetime: `serve` connects to (or starts) the keeper, takes back every tree recorded under
<run>/pager/procs from a previous gfvmd (uffds from the keeper, wake all ranges, everything
present treated as dirty), registers the control ops and runs until cancelled. On shutdown the
trees stop being tracked but keep running: the keeper's uffd copies make them wait for the next
gfvmd instead of reading zeros.

Locks: `_keeper_lock` serialises keeper requests (worker threads of several trees use it).
`trees` is changed only on the trio thread or under `_trees_lock` from worker threads.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from gfvm import native
from gfvm.errors import ConfigError, FeatureMissing, GfvmError, NotFound, UsageError
from gfvm.pager import procfs
from gfvm.pager.backing import LocalBacking, PagingBacking
from gfvm.pager.cgroup import TreeCgroup
from gfvm.pager.keeper import KeeperClient
from gfvm.pager.launch import start_tree
from gfvm.pager.pagefile import PagingFile
from gfvm.pager.source import PagingFileSource
from gfvm.pager.state import StateStore, TreeRecord
from gfvm.pager.backing import PAGE_SIZE
from gfvm.pager.tracker import (
    FlushResult,
    build_cindex,
    ManagedTree,
    PagerSettings,
    TreeDead,
    _pid_matches,
    inject_while_frozen,
)

log = logging.getLogger("gfvm.pager")


def settings_from_config(section: dict | None) -> PagerSettings:
    """PagerSettings from cluster.toml's [pager] table (interval_ms, hot_bound_ms, ...)."""
    s = PagerSettings()
    section = section or {}
    known = {"interval_ms", "hot_bound_ms", "batch_pages", "window_pages", "evict_target"}
    unknown = set(section) - known
    if unknown:
        raise ConfigError(f"[pager]: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    if "interval_ms" in section:
        s.interval = float(section["interval_ms"]) / 1000
    if "hot_bound_ms" in section:
        s.hot_bound = float(section["hot_bound_ms"]) / 1000
    for key in ("batch_pages", "window_pages"):
        if key in section:
            setattr(s, key, int(section[key]))
    if "evict_target" in section:
        s.evict_target = float(section["evict_target"])
    if not 0.01 <= s.interval <= 10 or s.hot_bound < s.interval:
        raise ConfigError("[pager]: interval_ms must be 10..10000 and hot_bound_ms >= interval_ms")
    return s


class Pager:
    """The pager component of gfvmd (see the module header)."""

    def __init__(
        self,
        daemon: Any,
        *,
        backing: PagingBacking | None = None,
        settings: PagerSettings | None = None,
    ) -> None:
        self.daemon = daemon
        self.paths = daemon.paths
        self.node = daemon.node_name
        self.cluster = daemon.config.name if daemon.config else "local"
        section = daemon.config.sections.get("pager") if daemon.config else None
        self.settings = settings or settings_from_config(section)
        # With a File Manager in this gfvmd, paging files live in /gfvm (its FmBacking, ready
        # once it serves); without one, in a local directory.
        self._fm = getattr(daemon, "fm", None)
        self.backing: PagingBacking = backing or LocalBacking(self.paths.state / "pager-local")
        self._backing_given = backing is not None
        self.run_dir = self.paths.run / "pager"
        self.store = StateStore(self.run_dir / "procs")
        self.keeper_path = self.run_dir / "keeper.sock"
        self.trees: dict[str, ManagedTree] = {}
        self.finished: dict[str, dict] = {}  # id -> last status of trees that ended
        self.tracer: native.Tracer | None = None
        self._keeper: KeeperClient | None = None
        self._keeper_lock = threading.Lock()
        self._trees_lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(8)
        self._launched: dict[str, subprocess.Popen] = {}
        self._unreaped: list[subprocess.Popen] = []  # launchers of trees given up (abandon)
        # Hooks of the migration service (None without one). `defer_takeover(id)`: leave that
        # tree to it at start; `may_remove_files(id)`: whether this node may delete the paging
        # file of a tree that ended (not when another node runs the process now). Both block.
        self.defer_takeover = None
        self.may_remove_files = None
        self._keeper_checked = 0.0

    # ------------------------------------------------------------------ component protocol

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Registers the control ops, takes back earlier trees, then runs until cancelled."""
        for op, handler in (
            ("run", self._op_run),
            ("adopt", self._op_adopt),
            ("ls", self._op_ls),
            ("status", self._op_status),
            ("flush", self._op_flush),
        ):
            self.daemon.control.register(op, handler)
        if self._fm is not None and not self._backing_given:
            await self._fm.fm.ready.wait()
            self.backing = self._fm.backing  # gfvm.fm.backing.FmBacking, set by its serve()
        try:
            await self._thread(self.open_blocking)
            task_status.started()
            while True:
                await trio.sleep(0.2)
                await self._thread(self.housekeeping)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.close_blocking)

    def open_blocking(self) -> list[str]:
        """Starts the pager without trio (gfvmd's serve, tests, benchmarks): tracer, keeper,
        takeover of earlier trees. Returns the takeover report. Blocks."""
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.tracer = native.Tracer()
        self._connect_keeper()
        return self.recover()

    async def _thread(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def housekeeping(self) -> None:
        """Notices trees that ended: reaps launched trees, records their exit status, cleans up;
        and checks about once a second that the keeper is alive (a new keeper gets every uffd
        again). Blocks briefly; gfvmd calls it every 0.2 s."""
        now = time.monotonic()
        self._unreaped = [p for p in self._unreaped if p.poll() is None]
        if self.trees and now - self._keeper_checked > 1.0:
            self._keeper_checked = now
            try:
                self._keeper_call("ping")
            except GfvmError as exc:
                log.error("keeper: %s", exc)
        for gfvm_id, tree in list(self.trees.items()):
            try:
                popen = self._launched.get(gfvm_id)
                if popen is not None and popen.poll() is not None:
                    tree.exit_status = popen.returncode
                    del self._launched[gfvm_id]
                    tree.post(tree.check_ended)
                if not tree.worker_alive() and tree.state not in ("ended", "killed"):
                    # Tracking stopped by a bug: nobody would serve its paged-out pages again.
                    tree.last_error = "internal error: the tree's worker thread ended"
                    tree.state = "killed"
                if tree.state in ("ended", "killed"):
                    self._finish_tree(tree)
            except Exception:  # noqa: BLE001 - one tree's trouble must not end gfvmd
                log.exception("housekeeping of %s", gfvm_id)

    def close_blocking(self) -> None:
        """Stops tracking every tree (they keep running; the keeper holds their uffds). Blocks."""
        for tree in list(self.trees.values()):
            tree.request_stop()
        for tree in list(self.trees.values()):
            tree.join(10)
        if self.tracer is not None:
            self.tracer.close()
        with self._keeper_lock:
            if self._keeper is not None:
                try:
                    if not self.trees:
                        self._keeper.exit()
                except OSError:
                    pass
                self._keeper.close()
                self._keeper = None

    # ------------------------------------------------------------------ keeper

    def _connect_keeper(self) -> None:
        with self._keeper_lock:
            self._keeper = self._open_keeper()

    def _open_keeper(self) -> KeeperClient:
        try:
            return KeeperClient(self.keeper_path)
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        code_root = str(Path(__file__).resolve().parents[2])
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [code_root, os.environ.get("PYTHONPATH")])),
        }
        with open(self.run_dir / "keeper.log", "ab") as logf:
            subprocess.Popen(
                [sys.executable, "-P", "-m", "gfvm.pager.keeper", str(self.keeper_path)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                cwd="/",
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while True:
            try:
                return KeeperClient(self.keeper_path)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise GfvmError(
                        f"the uffd keeper did not start (see {self.run_dir / 'keeper.log'})"
                    ) from None
                time.sleep(0.02)

    def _keeper_call(self, fn_name: str, *args) -> Any:
        restarted = False
        try:
            with self._keeper_lock:
                for attempt in (1, 2):
                    try:
                        if self._keeper is None:
                            self._keeper = self._open_keeper()
                            restarted = attempt == 2
                        return getattr(self._keeper, fn_name)(*args)
                    except (TimeoutError, ConnectionError, BrokenPipeError) as exc:
                        log.warning("keeper connection lost (%s): reconnecting", exc)
                        if self._keeper is not None:
                            self._keeper.close()
                        self._keeper = None
                        if attempt == 2:
                            raise GfvmError(f"the uffd keeper does not answer: {exc}") from None
        finally:
            if restarted:
                # A new keeper holds nothing: every tree gives it its uffds again.
                for tree in list(self.trees.values()):
                    tree.post(tree.rekeep)

    def keeper_put(self, key: str, fd: int, meta: dict) -> None:
        """Gives the keeper a duplicate of a uffd (blocking)."""
        self._keeper_call("put", key, fd, meta)

    def keeper_drop(self, key: str) -> None:
        try:
            self._keeper_call("drop", key)
        except GfvmError as exc:
            log.warning("keeper drop %s: %s", key, exc)

    # ------------------------------------------------------------------ helpers the trees call

    def save_record(self, rec: TreeRecord) -> None:
        self.store.save(rec)

    def kill_tree(self, rec: TreeRecord) -> None:
        """SIGKILLs every process of a tree (fail-stop). Blocking, brief."""
        TreeCgroup(tuple(Path(p) for p in rec.cgroup)).kill_all()
        if _pid_matches(rec.init_pid, rec.init_start_time):
            try:
                os.kill(rec.init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------------ public API

    def tree(self, ident: str) -> ManagedTree:
        """The tree with this id (or name). NotFound otherwise."""
        tree = self.trees.get(ident)
        if tree is None:
            matches = [t for t in self.trees.values() if t.rec.name == ident]
            if len(matches) == 1:
                tree = matches[0]
            elif len(matches) > 1:
                raise UsageError(f"several managed processes are named {ident!r}: use the id")
        if tree is None:
            raise NotFound(f"no managed process {ident!r} on node {self.node} (see `gfvm ls`)")
        return tree

    def flush_all(self, ident: str) -> FlushResult:
        """Every dirty page of the tree durable in its paging file (blocking). Freeze the tree
        first (TreeCgroup.freeze) when the result must be exact."""
        tree = self.tree(ident)
        return tree.call(tree.flush_all)

    def release_cold(self, ident: str) -> int:
        """Before a migration's freeze, the tree running: drops every clean page from memory
        (they come back from the local paging file on touch). Returns the pages dropped.
        Blocking."""
        tree = self.tree(ident)
        return tree.call(tree.release_cold)

    def release_memory(self, ident: str) -> int:
        """Migration step 5 (tree frozen, after flush_all): drops the tracked memory of every
        process so CRIU does not dump it; returns the pages dropped. Blocking."""
        tree = self.tree(ident)
        return tree.call(tree.release_memory)

    def reattach(self, ident: str) -> None:
        """Rollback after release_memory: the tree is tracked and served again here. Blocking."""
        tree = self.tree(ident)
        tree.call(tree.reattach)

    def hand_over(self, ident: str) -> str:
        """After a successful migration: forgets the tree on this node without touching its
        processes or its paging file (which now belongs to the target). Returns the paging dir.
        Blocking."""
        tree = self.tree(ident)
        if tree.state != "released":
            raise UsageError(f"{ident}: hand_over needs a tree whose memory was released")
        return self.abandon(ident)

    def abandon(self, ident: str) -> str:
        """Stops managing the tree on this node, whatever its state, without touching its
        processes or its paging file (the migration: a target whose restore failed, a source
        whose copy the target now runs). Returns the paging dir. Blocking."""
        tree = self.tree(ident)
        tree.request_stop()
        tree.join(10)
        with self._trees_lock:
            self.trees.pop(tree.rec.id, None)
        popen = self._launched.pop(tree.rec.id, None)
        if popen is not None:
            self._unreaped.append(popen)  # housekeeping reaps it once the tree has died
        tree.pf.close()
        self.store.remove(tree.rec.id)
        try:
            self._keeper_call("drop_prefix", f"{tree.rec.id}/")
        except GfvmError as exc:
            log.warning("keeper: %s", exc)
        return tree.rec.paging_dir

    def prepare_adoption(self, gfvm_id: str) -> AdoptionPrep:
        """A migration target's early work, before the source freezes the process: opens the
        paging file from this node's copy and builds the native indexes the fault loops will
        use. `AdoptionPrep.refresh()` later applies what the source appended meanwhile, so the
        work done during the freeze is proportional to that, not to the process's memory.
        Blocking (a full index replay)."""
        return AdoptionPrep(self.backing, f"procs/{gfvm_id}")

    def adopt_restored(
        self,
        gfvm_id: str,
        *,
        name: str,
        cmd: list[str],
        init_pid: int,
        host_pids: list[int],
        mem_limit: int | None = None,
        prepared: AdoptionPrep | None = None,
        hold: bool = False,
    ) -> dict:
        """Target side of a migration: manage the restored tree `gfvm_id`, whose paging file is
        already here (local copy). Preconditions: every process in `host_pids` (the tree's
        processes with memory, host pids) is alive, no other uffd is registered on its ranges
        (CRIU's lazy-pages uffd has been unregistered), and every page that is not in the paging
        file is present (served from CRIU's images). For each process a new uffd is injected and
        registered; pages present now count as dirty, missing ones come from the paging file.
        With `hold` (a migration target before its commit point) nothing is written to the
        paging file until `release_adopted`: no page-out, no records, no compaction, and an
        `abandon` leaves the file exactly as the source wrote it. Blocking."""
        if gfvm_id in self.trees:
            raise UsageError(f"{gfvm_id} is already managed here")
        paging_dir = f"procs/{gfvm_id}"
        if prepared is not None:
            pf, cindexes = prepared.take()  # refreshed by the caller; the tree owns them now
        else:
            pf, cindexes = PagingFile.open(self.backing, paging_dir), {}
        cgroup = TreeCgroup.for_tree(self.cluster, self.node, gfvm_id)
        cgroup.create()
        rec = TreeRecord(
            id=gfvm_id,
            name=name,
            cmd=list(cmd),
            node=self.node,
            created=time.time(),
            init_pid=init_pid,
            init_start_time=procfs.start_time(init_pid),
            adopted=False,
            paging_dir=paging_dir,
            cgroup=[str(p) for p in cgroup.paths],
            log_path="",
            mem_limit=mem_limit,
        )
        for pid in [init_pid, *procfs.descendants(init_pid)]:
            try:
                cgroup.add(pid)
            except OSError as exc:
                log.warning("moving %d into %s: %s", pid, cgroup.paths, exc)
        tree = ManagedTree(rec, pf, self)
        if hold:
            tree.hold()  # before its worker's first tick
        tree.start()
        assert self.tracer is not None
        try:
            for pid in host_pids:
                uffd = inject_while_frozen(
                    self.tracer, pid, lambda pid=pid: self.tracer.inject_userfaultfd(pid)
                )
                asid = procfs.inner_pid(pid)
                tree.call(
                    lambda pid=pid, uffd=uffd, asid=asid: tree.take_back_space(
                        pid, uffd, asid, api_done=False, check_stale=prepared is None,
                        cindex=cindexes.get(asid),
                    )
                )
            self.store.save(rec)
        except BaseException:
            tree.request_stop()
            tree.join(5)
            pf.close()
            raise
        with self._trees_lock:
            self.trees[gfvm_id] = tree
        return self._summary(tree)

    def release_adopted(self, ident: str) -> None:
        """The migration committed (`owner` names this node): the tree adopted with `hold`
        starts writing its paging file (records buffered meanwhile first; the pages present
        since the adoption are flushed by the next ticks). Blocking."""
        tree = self.tree(ident)
        tree.call(tree.release_hold)

    def paging_dir(self, ident: str) -> str:
        """The tree's paging-file directory, relative to `self.backing`."""
        return self.tree(ident).rec.paging_dir

    # ------------------------------------------------------------------ run / adopt

    def _new_id(self) -> str:
        while True:
            gfvm_id = "p" + secrets.token_hex(4)
            if gfvm_id not in self.trees and not self.backing.exists(f"procs/{gfvm_id}"):
                return gfvm_id

    def run_blocking(
        self,
        cmd: list[str],
        name: str | None,
        mem_limit: int | None,
        cwd: str = "/",
        env: dict | None = None,
    ) -> dict:
        """Starts `cmd` as a managed tree (see gfvm/pager/launch.py); returns its summary."""
        gfvm_id = self._new_id()
        name = name or os.path.basename(cmd[0])
        cgroup = TreeCgroup.for_tree(self.cluster, self.node, gfvm_id)
        cgroup.create()
        log_path = self.paths.run / "procs" / gfvm_id / "output.log"
        paging_dir = f"procs/{gfvm_id}"
        pf = PagingFile.create(
            self.backing,
            paging_dir,
            {"id": gfvm_id, "name": name, "cmd": cmd, "node": self.node, "created": time.time()},
        )
        launched = None
        tree = None
        try:
            launched = start_tree(cmd, cgroup, log_path, cwd=cwd or "/", env=env)
            rec = TreeRecord(
                id=gfvm_id,
                name=name,
                cmd=list(cmd),
                node=self.node,
                created=time.time(),
                init_pid=launched.init_pid,
                init_start_time=procfs.start_time(launched.init_pid),
                adopted=False,
                paging_dir=paging_dir,
                cgroup=[str(p) for p in cgroup.paths],
                log_path=str(log_path),
                mem_limit=mem_limit,
            )
            uffd = self._attach_at_exec(launched.shim_pid, log_path)
            tree = ManagedTree(rec, pf, self)
            tree.start()
            pid = launched.shim_pid
            tree.call(lambda: tree.attach_space(pid, uffd))
            self.store.save(rec)
        except BaseException:
            if tree is not None:
                tree.request_stop()
                tree.join(5)
            if launched is not None:
                cgroup.kill_all()
                launched.popen.kill()
                launched.popen.wait()
            try:
                cgroup.remove()
            except OSError:
                pass
            pf.close()
            self.backing.remove_tree(paging_dir)
            self.store.remove(gfvm_id)
            raise
        with self._trees_lock:
            self.trees[gfvm_id] = tree
        self._launched[gfvm_id] = launched.popen
        return self._summary(tree)

    def _attach_at_exec(self, shim_pid: int, log_path: Path) -> native.Userfaultfd:
        """Lets the stopped shim exec CMD and creates the uffd inside CMD's new address space.

        With the native layer's exec-stop support, before CMD's first instruction; otherwise
        right after the exec is seen (pages CMD wrote by then are still tracked: a fresh
        registration reports every present page as written)."""
        assert self.tracer is not None
        attach_at_exec = getattr(self.tracer, "inject_userfaultfd_at_exec", None)
        if attach_at_exec is not None:
            try:
                return attach_at_exec(shim_pid, lambda: os.kill(shim_pid, signal.SIGCONT))
            except ProcessLookupError as exc:  # the shim could not exec the command
                raise GfvmError(
                    f"the command exited at once ({exc.strerror}; see {log_path}):\n"
                    f"{_tail(log_path)}"
                ) from None
        before = _maps_signature(shim_pid)
        os.kill(shim_pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while _maps_signature(shim_pid) == before:
            if not _pid_alive(shim_pid):
                raise GfvmError(
                    f"the command exited at once (see {log_path}):\n" f"{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise GfvmError("the command did not start within 10 s")
            time.sleep(0.0005)
        try:
            return self.tracer.inject_userfaultfd(shim_pid)
        except ProcessLookupError:
            raise GfvmError(
                f"the command exited at once (see {log_path}):\n{_tail(log_path)}"
            ) from None

    def adopt_blocking(self, pid: int, name: str | None, mem_limit: int | None) -> dict:
        """Takes an already running process under management; errors name the cause."""
        self._check_adoptable(pid)
        for tree in self.trees.values():
            if any(s.host_pid == pid for s in tree.spaces.values()):
                raise UsageError(f"process {pid} is already managed as {tree.rec.id}")
        assert self.tracer is not None
        try:
            uffd = self.tracer.inject_userfaultfd(pid)
        except PermissionError as exc:
            cause = f"ptrace was refused ({exc.strerror})"
            tracer_tid = int(procfs.status(pid).get("TracerPid", "0"))
            if tracer_tid:
                try:
                    tracer_pid = procfs.tgid(tracer_tid)  # TracerPid is the tracing thread
                    with open(f"/proc/{tracer_pid}/comm") as f:
                        comm = f.read().strip()
                except (ProcessLookupError, FileNotFoundError):
                    tracer_pid, comm = tracer_tid, "?"
                cause = f"it is already being traced by pid {tracer_pid} ({comm})"
            raise GfvmError(f"cannot adopt process {pid}: not permitted: {cause}") from None
        except ProcessLookupError:
            raise NotFound(f"cannot adopt process {pid}: it exited") from None
        except OSError as exc:
            raise GfvmError(f"cannot adopt process {pid}: {exc}") from None
        gfvm_id = self._new_id()
        cmd = _cmdline(pid)
        name = name or (os.path.basename(cmd[0]) if cmd else str(pid))
        cgroup = TreeCgroup.for_tree(self.cluster, self.node, gfvm_id)
        paging_dir = f"procs/{gfvm_id}"
        pf = PagingFile.create(
            self.backing,
            paging_dir,
            {
                "id": gfvm_id,
                "name": name,
                "cmd": cmd,
                "node": self.node,
                "created": time.time(),
                "adopted": True,
            },
        )
        tree = None
        try:
            cgroup.create()
            cgroup.add(pid)
            rec = TreeRecord(
                id=gfvm_id,
                name=name,
                cmd=cmd,
                node=self.node,
                created=time.time(),
                init_pid=pid,
                init_start_time=procfs.start_time(pid),
                adopted=True,
                paging_dir=paging_dir,
                cgroup=[str(p) for p in cgroup.paths],
                log_path="",
                mem_limit=mem_limit,
            )
            tree = ManagedTree(rec, pf, self)
            tree.start()
            tree.call(lambda: tree.attach_space(pid, uffd))
            self.store.save(rec)
        except BaseException:
            if tree is not None:
                tree.request_stop()
                tree.join(5)
            uffd.close()
            pf.close()
            self.backing.remove_tree(paging_dir)
            self.store.remove(gfvm_id)
            raise
        with self._trees_lock:
            self.trees[gfvm_id] = tree
        return self._summary(tree)

    def _check_adoptable(self, pid: int) -> None:
        if pid <= 0:
            raise UsageError(f"{pid} is not a process id")
        try:
            state = procfs.state(pid)
            kernel_thread = procfs.is_kernel_thread(pid)
            tgid = procfs.tgid(pid)
        except ProcessLookupError:
            raise NotFound(f"cannot adopt process {pid}: there is no such process") from None
        if kernel_thread:
            raise UsageError(f"cannot adopt process {pid}: it is a kernel thread (no user memory)")
        if state in ("Z", "X"):
            raise UsageError(f"cannot adopt process {pid}: it is a zombie (it has exited)")
        if tgid != pid:
            raise UsageError(f"cannot adopt {pid}: it is a thread of process {tgid}; adopt {tgid}")
        if pid == os.getpid() or pid in _ancestors(os.getpid()):
            raise UsageError(
                f"cannot adopt process {pid}: it is gfvmd itself or one of its parents"
            )
        try:
            features = native.probe_uffd_features()
        except OSError as exc:
            raise FeatureMissing(
                f"cannot adopt process {pid}: userfaultfd is unusable here: {exc}"
            ) from None
        lacking = native.PAGER_FEATURES & ~features
        if lacking:
            raise FeatureMissing(
                f"cannot adopt process {pid}: this kernel's userfaultfd lacks "
                f"features {lacking:#x} (needs WP_ASYNC, WP_UNPOPULATED, events)"
            )

    # ------------------------------------------------------------------ takeover after a restart

    def recover(self) -> list[str]:
        """Takes back the trees a previous gfvmd managed (blocking). Returns what it did."""
        records, problems = self.store.load_all()
        for p in problems:
            log.warning("pager state: %s", p)
        try:
            held = {key: (meta, fd) for key, meta, fd in self._keeper_call("take_all")}
        except GfvmError as exc:
            log.warning("keeper: %s", exc)
            held = {}
        report = []
        for rec in records:
            if self.defer_takeover is not None and self.defer_takeover(rec.id):
                # Mid-migration: the migration service decides first where the process lives,
                # then asks for `retake` (or `forget_record`). Its uffds stay with the keeper.
                for k in [k for k in held if k.startswith(f"{rec.id}/")]:
                    os.close(held.pop(k)[1])
                report.append(f"{rec.id}: left to the interrupted migration to settle")
                continue
            try:
                report.append(self._recover_tree(rec, held))
            except Exception as exc:  # noqa: BLE001 - one bad tree must not stop the others
                log.exception("taking back %s", rec.id)
                report.append(f"{rec.id}: could not be taken back: {exc}")
        for key, (_meta, fd) in held.items():  # not claimed by any record
            os.close(fd)
            self.keeper_drop(key)
        for line in report:
            log.info("takeover: %s", line)
        return report

    def retake(self, ident: str) -> str:
        """Takes back one tree of a previous gfvmd (whose takeover `defer_takeover` postponed)
        from its state record and the keeper's uffds. Blocking. Raises what takeover raises."""
        if ident in self.trees:
            return f"{ident}: already managed"
        records, _ = self.store.load_all()
        rec = next((r for r in records if r.id == ident), None)
        if rec is None:
            raise NotFound(f"no state record of {ident} on {self.node}")
        held = {key: (meta, fd) for key, meta, fd in self._keeper_call("take_all")
                if key.startswith(f"{ident}/")}
        try:
            return self._recover_tree(rec, held)
        finally:
            for _meta, fd in held.values():
                os.close(fd)

    def forget_record(self, ident: str) -> None:
        """Forgets a tree this node no longer runs (another node does): its state record and
        the keeper's uffd copies go, its processes and paging file are not touched. Blocking."""
        if ident in self.trees:
            self.abandon(ident)
            return
        self.store.remove(ident)
        try:
            self._keeper_call("drop_prefix", f"{ident}/")
        except GfvmError as exc:
            log.warning("keeper: %s", exc)

    def _recover_tree(self, rec: TreeRecord, held: dict) -> str:
        prefix = f"{rec.id}/"
        mine = {k[len(prefix) :]: held.pop(k) for k in list(held) if k.startswith(prefix)}
        try:
            return self._recover_tree_with(rec, mine)
        except BaseException:
            for _meta, fd in mine.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise

    def _recover_tree_with(self, rec: TreeRecord, mine: dict) -> str:
        alive_spaces = [s for s in rec.spaces if _pid_matches(s.host_pid, s.start_time)]
        if not alive_spaces and not _pid_matches(rec.init_pid, rec.init_start_time):
            for _meta, fd in mine.values():
                os.close(fd)
            self._cleanup_record(rec)
            return f"{rec.id}: ended while gfvmd was down; cleaned up"
        pf = PagingFile.open(self.backing, rec.paging_dir)
        tree = ManagedTree(rec, pf, self)
        tree.start()
        try:
            return self._take_back_spaces(rec, tree, mine)
        except BaseException:
            tree.request_stop()
            tree.join(5)
            pf.close()
            raise

    def _take_back_spaces(self, rec: TreeRecord, tree: ManagedTree, mine: dict) -> str:
        lost = []
        for s in rec.spaces:
            entry = mine.pop(str(s.asid), None)
            if not _pid_matches(s.host_pid, s.start_time):
                if entry:
                    os.close(entry[1])
                tree.call(lambda s=s: tree.pf.forget(s.asid))
                continue
            if entry is None:
                lost.append(s)
                continue
            uffd = native.Userfaultfd(entry[1])
            tree.call(lambda s=s, uffd=uffd: tree.take_back_space(s.host_pid, uffd, s.asid))
        for key, (meta, fd) in mine.items():  # forks not identified before the crash
            uffd = native.Userfaultfd(fd)
            tree.call(lambda meta=meta, uffd=uffd, key=key: tree.take_back_orphan(meta, uffd, key))
        for s in lost:
            if tree.pf.index.released.get(s.asid):
                why = (
                    f"the uffd of pid {s.host_pid} was lost with both gfvmd and the keeper, and "
                    "some of its pages live only in the paging file"
                )
                tree.call(lambda why=why: tree._fail_stop(why))
                break
            try:
                uffd = self.tracer.inject_userfaultfd(s.host_pid)
                tree.call(
                    lambda s=s, uffd=uffd: tree.take_back_space(
                        s.host_pid, uffd, s.asid, api_done=False
                    )
                )
            except OSError as exc:
                why = f"pid {s.host_pid} could not be re-attached: {exc}"
                tree.call(lambda why=why: tree._fail_stop(why))
                break
        with self._trees_lock:
            self.trees[rec.id] = tree
        return f"{rec.id}: taken back ({len(tree.spaces)} processes)"

    def _cleanup_record(self, rec: TreeRecord) -> None:
        try:
            TreeCgroup(tuple(Path(p) for p in rec.cgroup)).remove()
        except OSError as exc:
            log.warning("removing cgroup of %s: %s", rec.id, exc)
        if self.may_remove_files is not None and not self.may_remove_files(rec.id):
            log.info("%s: its paging file belongs to another node now; kept", rec.id)
        else:
            try:
                self.backing.remove_tree(rec.paging_dir)
            except OSError as exc:
                log.warning("removing paging file of %s: %s", rec.id, exc)
        self.store.remove(rec.id)
        try:
            self._keeper_call("drop_prefix", f"{rec.id}/")
        except GfvmError:
            pass

    def _finish_tree(self, tree: ManagedTree) -> None:
        """A tree ended (or was killed): stop tracking, clean up, remember its last status."""
        status = self._status(tree)
        tree.request_stop()
        tree.join(10)
        if tree.state == "killed":
            self.kill_tree(tree.rec)
        if tree.state == "killed":
            status["state"] = "killed (fail-stop)"
        elif tree.exit_status is not None:
            status["state"] = f"exited ({_describe_status(tree.exit_status)})"
            status["exit_status"] = tree.exit_status
        else:
            status["state"] = "exited"
        status["rss"] = 0
        with self._trees_lock:
            self.trees.pop(tree.rec.id, None)
            self.finished[tree.rec.id] = status
        tree.pf.close()
        if tree.state == "released" or tree.held:
            # Dumped for a migration (the paging file is the process's memory now), or an
            # uncommitted migration target's copy (the files are still the source's): keep it.
            self.store.remove(tree.rec.id)
            return
        self._cleanup_record(tree.rec)

    # ------------------------------------------------------------------ status

    def _summary(self, tree: ManagedTree) -> dict:
        main = _main_space(tree)
        return {
            "id": tree.rec.id,
            "name": tree.rec.name,
            "node": self.node,
            "pid": main.host_pid if main else tree.rec.init_pid,
            "inner_pid": main.asid if main else None,
            "init_pid": tree.rec.init_pid,
            "log": tree.rec.log_path or None,
            "paging_dir": tree.rec.paging_dir,
        }

    def _status(self, tree: ManagedTree) -> dict:
        snap = tree.snapshot()
        rec = tree.rec
        main = _main_space(tree)
        if main is not None:
            tree.main_pid = main.host_pid
        return {
            "id": rec.id,
            "name": rec.name,
            "node": self.node,
            "cmd": rec.cmd,
            "state": snap["state"],
            "adopted": rec.adopted,
            "pid": main.host_pid if main else (tree.main_pid or rec.init_pid),
            "init_pid": rec.init_pid,
            "spaces": snap["spaces"],
            "rss": snap["rss"],
            "managed_bytes": snap["managed_bytes"],
            "mem_limit": rec.mem_limit,
            "dirty_pages": snap["dirty_pages"],
            "pages_paged_out": snap["pages_paged_out"],
            "bytes_paged_out": snap["bytes_paged_out"],
            "pages_in_file": snap["pages_in_file"],
            "pages_evicted": snap["pages_evicted"],
            "flush_lag_s": snap["flush_lag_s"],
            "faults_served": snap["faults_served"],
            "pages_faulted_in": snap["pages_faulted_in"],
            "pages_zero_filled": snap["pages_zero_filled"],
            "paging_dir": _backing_path(self.backing, rec.paging_dir),
            "log_path": rec.log_path,
            "cgroup": rec.cgroup,
            "last_error": snap["last_error"],
            "exit_status": tree.exit_status,
            "counters": snap["counters"],
        }

    # ------------------------------------------------------------------ control ops

    async def _op_run(self, args: dict, progress) -> dict:
        cmd = args.get("cmd")
        if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
            raise UsageError("run: `cmd` must be a non-empty list of strings")
        env = args.get("env")
        if env is not None and not (
            isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        ):
            raise UsageError("run: `env` must map strings to strings")
        return await self._thread(
            self.run_blocking, cmd, args.get("name"), _limit_arg(args), args.get("cwd") or "/", env
        )

    async def _op_adopt(self, args: dict, progress) -> dict:
        pid = args.get("pid")
        if not isinstance(pid, int):
            raise UsageError("adopt: `pid` must be an integer")
        return await self._thread(self.adopt_blocking, pid, args.get("name"), _limit_arg(args))

    async def _op_ls(self, args: dict, progress) -> dict:
        def collect() -> list[dict]:
            out = [self._status(t) for t in list(self.trees.values())]
            out += list(self.finished.values())
            return out

        return {"processes": await self._thread(collect)}

    async def _op_status(self, args: dict, progress) -> dict:
        ident = args.get("id")
        if not isinstance(ident, str):
            raise UsageError("status: `id` must be a string")
        if ident in self.finished:
            return self.finished[ident]
        tree = self.tree(ident)
        return await self._thread(self._status, tree)

    async def _op_flush(self, args: dict, progress) -> dict:
        ident = args.get("id")
        if not isinstance(ident, str):
            raise UsageError("flush: `id` must be a string")
        try:
            result = await self._thread(self.flush_all, ident)
        except TreeDead as exc:
            raise NotFound(str(exc)) from None
        return asdict(result)


class AdoptionPrep(PagingFileSource):
    """A paging file opened early on a migration target (see Pager.prepare_adoption): the file
    and one native page index per address space, kept up to date by `refresh`. Serves the
    lazy-pages server during the restore (`native_sources`, and PagingFileSource's `lookup`),
    then goes to the pager (`take`). Blocking methods; one thread at a time."""

    def __init__(self, backing: PagingBacking, directory: str) -> None:
        super().__init__(backing, directory)
        self.backing = backing
        self.directory = directory
        self.cindexes = {a: build_cindex(e) for a, e in self.pf.index.spaces.items() if e}

    def refresh(self) -> int:
        """Applies what the writer appended since; returns the records applied (a compacted
        file is opened again)."""
        records = self.pf.refresh()
        if records is None:
            self.pf.close()
            self.pf = PagingFile.open(self.backing, self.directory)
            self.cindexes = {a: build_cindex(e) for a, e in self.pf.index.spaces.items() if e}
            return -1
        for rec in records:
            self._apply(rec)
        return len(records)

    def _apply(self, rec) -> None:
        from gfvm.pager.pagefile import CLONE, DROP, FORGET, MOVE, PUT, PUTS

        ci = self.cindexes.get(rec.asid)
        if rec.rtype in (PUT, PUTS) and ci is None:
            ci = self.cindexes[rec.asid] = native.PageIndex()
        if rec.rtype == PUT:
            ci.set(rec.a << 12, rec.b, rec.c)  # with its checksum: the loop verifies it
        elif rec.rtype == PUTS:
            vp, sl, cr = rec.payload
            ci.set_many([v << 12 for v in vp], list(sl), crcs=list(cr))
        elif rec.rtype == DROP and ci is not None:
            ci.remove_range(rec.a << 12, (rec.a + rec.b) << 12)
        elif rec.rtype == MOVE and ci is not None:
            ci.remove_range(rec.b << 12, (rec.b + rec.c) << 12)
            ci.move_range(rec.a << 12, rec.b << 12, rec.c << 12)
        elif rec.rtype in (CLONE, FORGET):
            target = rec.a if rec.rtype == CLONE else rec.asid
            entries = self.pf.index.entries(target)
            if entries:
                self.cindexes[target] = build_cindex(entries)
            else:
                self.cindexes.pop(target, None)

    def native_sources(self, inner_pid: int) -> list:
        ci = self.cindexes.get(inner_pid)
        if ci is None:
            return []
        return [native.Source(ci.clone(), self.pf.pages_read_fd())]

    def take(self) -> tuple[PagingFile, dict]:
        """Hands the file and the indexes over (to the pager); this object is spent."""
        pf, cindexes = self.pf, self.cindexes
        self.pf, self.cindexes = None, {}
        return pf, cindexes

    def close(self) -> None:
        if self.pf is not None:
            self.pf.close()
            self.pf = None


def _describe_status(rc: int) -> str:
    """Popen returncode -> words: 3 -> "status 3", -9 -> "signal 9 (SIGKILL)"."""
    if rc < 0:
        try:
            return f"signal {-rc} ({signal.Signals(-rc).name})"
        except ValueError:
            return f"signal {-rc}"
    return f"status {rc}"


def _limit_arg(args: dict) -> int | None:
    limit = args.get("mem_limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1 << 20):
        raise UsageError("mem_limit must be an integer number of bytes >= 1 MiB")
    return limit


def _main_space(tree: ManagedTree):
    spaces = [s for s in tree.spaces.values() if s.resolved]
    if not spaces:
        return None
    return min(spaces, key=lambda s: s.asid)


def _backing_path(backing: PagingBacking, rel: str) -> str:
    path = getattr(backing, "path", None)
    return str(path(rel)) if callable(path) else rel


def _maps_signature(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return f.read(4096)
    except FileNotFoundError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        return procfs.state(pid) not in ("Z", "X")
    except ProcessLookupError:
        return False


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except FileNotFoundError:
        return []


def _ancestors(pid: int) -> set[int]:
    out = set()
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ValueError, IndexError):
            break
        out.add(pid)
    return out
