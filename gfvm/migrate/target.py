"""The target's side of a migration (DESIGN.md step 8): restore the checkpoint, serve its memory,
hand it to the pager, let it run.

    prepare   reserve: remember what is coming, check memory and disk, create the output log
    check     (before epoch+1) every file of the process is in sync here, the index long enough
    restore   (we are master now)
      1. read /gfvm/procs/<id>/ckpt from the local copy, unpack, verify the manifest;
      2. gfvmd's LazyPagesServer listens on <work>/lazy-pages.socket, serving from CRIU's images,
         else the local copy of the paging file (PagingFileSource), else zeros; its keeper holds
         a duplicate of every uffd (a crash of this gfvmd blocks the process, never zero-fills);
      3. `criu restore --lazy-pages --leave-stopped`: the restore's own faults are served while it
         runs; every task ends SIGSTOPped, before its first instruction;
      4. the pages CRIU's images hold (unmanaged VMAs, init) are pushed in; then the server and
         keeper let go of CRIU's uffds (every range is unregistered when the last copy closes);
      5. `pager.adopt_restored`: the pager injects a WP-capable uffd of its own into each task
         (ptrace-stopped), registers its ranges; pages present at that instant count as dirty,
         missing ones come from the paging file's local copy;
      6. if we are still the files' master: SIGCONT every task. The freeze ends here.
      7. in the background, the recent hot set (pages flushed in the source's last pre-flush
         round and the final flush) is faulted in ahead of the process.

Why adopt before the first instruction rather than after running under CRIU's uffd for a
while: a process that runs under CRIU's uffd can fork, discard or move memory, and every such
change would have to be carried into the paging file's index before the swap. Swapping while
the tasks are still stopped by the restore costs a few ms of freeze (the uffd injection) and
removes that whole class of races.

A failure before step 6 kills whatever was restored (exactly one live copy: the source still
holds its frozen one) and raises; the source then rolls back.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from gfvm import native
from gfvm.errors import GfvmError, Unavailable, UsageError
from gfvm.migrate import ckptfile, criu, nodeinfo
from gfvm.migrate.images import ImageDir, ImageError
from gfvm.migrate.lazypages import LazyPagesServer, inner_to_host
from gfvm.migrate.manifest import verify_manifest
from gfvm.migrate.uffd_keeper import KeeperClient

log = logging.getLogger("gfvm.migrate")

PAGE = 4096
#: CRIU logs errors and warnings only (enough for a failure's message); -v4 costs ms in the freeze
CRIU_VERBOSITY = 2
WINDOW = 64 * PAGE  # the pager's fault loop serves 64-page windows: one touch per window


@dataclass
class Incoming:
    """One migration this node is the target of."""

    gfvm_id: str
    source: str
    spec: dict
    phase: str = "prepared"  # prepared | restoring | running | failed
    created: float = field(default_factory=time.monotonic)
    root_pid: int = 0
    host_pids: dict = field(default_factory=dict)  # inner pid -> host pid
    error: str = ""
    done: trio.Event = field(default_factory=trio.Event)
    result: dict = field(default_factory=dict)
    prefetch: dict = field(default_factory=dict)
    keeper: KeeperClient | None = None  # started at prepare: ~0.2 s we keep out of the freeze
    prep: object = None  # pager.AdoptionPrep: the paging file opened and indexed at prepare
    committed: bool = False  # `owner` names us: from here on the process runs here, come what may
    go: trio.Event = field(default_factory=trio.Event)  # MigCommit (or an abort) arrived
    aborted: bool = False

    def summary(self) -> dict:
        return {
            "id": self.gfvm_id,
            "source": self.source,
            "phase": self.phase,
            "root_pid": self.root_pid,
            "pids": {str(k): v for k, v in self.host_pids.items()},
            "error": self.error,
            "prefetch": dict(self.prefetch),
        }


def work_dir(run: Path, gfvm_id: str) -> Path:
    return run / "migrate" / f"{gfvm_id}.in"


class TargetSide:
    """Target-side operations; owned by MigrationService, called on the trio thread."""

    def __init__(self, service) -> None:
        self.svc = service
        self.incoming: dict[str, Incoming] = {}

    # ------------------------------------------------------------------ checks

    def refusal(self, gfvm_id: str, need_memory: int, need_disk: int) -> str:
        """Why this node cannot take `gfvm_id` now ("" if it can). Never blocks long."""
        svc = self.svc
        if gfvm_id in self.incoming and self.incoming[gfvm_id].phase in ("prepared", "restoring"):
            return f"{svc.node} is already receiving {gfvm_id}"
        if gfvm_id in svc.pager.trees:
            return f"{gfvm_id} already runs on {svc.node}"
        avail = nodeinfo.mem_available()
        if avail < need_memory + svc.settings.memory_reserve:
            return (
                f"{svc.node} has {_mib(avail)} MiB of free memory; the process needs "
                f"{_mib(need_memory)} MiB plus {_mib(svc.settings.memory_reserve)} MiB kept free"
            )
        free = nodeinfo.disk_free(svc.daemon.paths.state)
        if free < need_disk + svc.settings.disk_reserve:
            return (
                f"{svc.node} has {_mib(free)} MiB of free disk; the migration needs "
                f"{_mib(need_disk)} MiB plus {_mib(svc.settings.disk_reserve)} MiB kept free"
            )
        return ""

    async def prepare(self, gfvm_id: str, source: str, spec: dict) -> dict:
        refusal = await trio.to_thread.run_sync(
            self.refusal, gfvm_id, int(spec.get("need_memory", 0)), int(spec.get("need_disk", 0))
        )
        if refusal:
            raise UsageError(refusal)
        _check_spec(spec)
        inc = Incoming(gfvm_id, source, spec)
        self.incoming[gfvm_id] = inc
        try:
            await trio.to_thread.run_sync(self._prepare_blocking, inc)
        except BaseException:
            await trio.to_thread.run_sync(self._kill_restored, inc)
            self.incoming.pop(gfvm_id, None)
            raise
        self.svc.journal.save("in", gfvm_id, {"phase": "prepared", "source": source})
        return {"node": self.svc.node}

    def _prepare_blocking(self, inc: Incoming) -> None:
        wd = work_dir(self.svc.daemon.paths.run, inc.gfvm_id)
        shutil.rmtree(wd, ignore_errors=True)
        wd.mkdir(parents=True, mode=0o700)
        inc.keeper = KeeperClient.spawn(wd / "keeper.socket")
        # The paging file, opened and indexed now: during the freeze only what the source
        # appends meanwhile (its last flushes) is read and applied.
        inc.prep = self.svc.pager.prepare_adoption(inc.gfvm_id)
        # CRIU reopens the tree's stdout/stderr by path: it must exist here (append-only, so
        # CRIU does not check its size). It gets the end of the source's copy.
        log_path = inc.spec.get("log_path")
        if log_path:
            p = Path(log_path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tail = bytes.fromhex(inc.spec.get("log_tail", ""))
            with open(p, "wb") as f:
                f.write(tail)

    async def check(self, gfvm_id: str, paths: list[str], index_path: str,
                    index_bytes: int) -> dict:
        inc = self._get(gfvm_id, "prepared")
        files = self.svc.files
        if inc.spec.get("remote"):
            return {"in_sync": False, "remote": True}
        # In sync in the committed metadata means this copy acknowledged every write the
        # master's last fsync covered (the File Manager's protocol C): after the source's final
        # flush and checkpoint fsync, that is everything. Where this node may already read its
        # copy, the index length is checked too.
        for path in paths:
            w = await files.where(path)
            if self.svc.node not in w["in_sync"] or not w["local"]["copy"]:
                raise Unavailable(
                    f"{self.svc.node} holds no in-sync copy of /gfvm/{path} "
                    f"(master {w['master']}, in sync: {', '.join(w['in_sync'])})"
                )
            if path == index_path and w["local"]["readable"]:
                size = await (await files.open(index_path)).size()
                if size < index_bytes:
                    raise Unavailable(
                        f"{self.svc.node}'s copy of /gfvm/{index_path} has {size} bytes, "
                        f"the final flush left {index_bytes}"
                    )
        return {"in_sync": True}

    def _get(self, gfvm_id: str, *phases: str) -> Incoming:
        inc = self.incoming.get(gfvm_id)
        if inc is None:
            raise UsageError(f"{self.svc.node} was not prepared to receive {gfvm_id}")
        if phases and inc.phase not in phases:
            raise UsageError(f"{gfvm_id} on {self.svc.node} is {inc.phase}, not {'/'.join(phases)}")
        return inc

    # ------------------------------------------------------------------ restore

    async def restore(self, gfvm_id: str, spec: dict) -> dict:
        """Runs the restore in the service's own nursery (a dropped request does not cancel it)
        and waits for its result."""
        inc = self._get(gfvm_id, "prepared")
        inc.phase = "restoring"
        inc.spec.update(spec)
        self.svc.journal.save("in", gfvm_id, {"phase": "restoring", "source": inc.source})
        self.svc.spawn(self._restore_task, inc)
        await inc.done.wait()
        if inc.phase != "running" or inc.error:
            raise GfvmError(inc.error or "the restore failed")
        return inc.result

    async def _restore_task(self, inc: Incoming) -> None:
        try:
            inc.result = await self._restore(inc)
            inc.phase = "running"
        except BaseException as exc:
            if inc.committed:
                # Past the commit point the process is ours whatever happened next: it runs.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._release_adopted, inc)
                    await trio.to_thread.run_sync(_resume, list(inc.host_pids.values()))
                inc.phase = "running"
                inc.error = f"{inc.gfvm_id} runs on {self.svc.node}, but: {exc}"
                log.warning("%s: %s", inc.gfvm_id, inc.error)
            else:
                inc.phase = "failed"
                inc.error = f"restore on {self.svc.node} failed: {exc}"
                log.warning("%s: %s", inc.gfvm_id, inc.error)
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._kill_restored, inc)
            if not isinstance(exc, Exception):
                inc.done.set()
                raise
        finally:
            inc.done.set()
        self.svc.journal.remove("in", inc.gfvm_id)
        if inc.phase == "running":
            self.svc.spawn(self._prefetch_task, inc)
        if not (inc.phase == "running" and inc.spec.get("remote")):  # else its server reads it
            await trio.to_thread.run_sync(
                shutil.rmtree, work_dir(self.svc.daemon.paths.run, inc.gfvm_id), True)

    async def _restore(self, inc: Incoming) -> dict:
        svc = self.svc
        faults = svc.faults
        remote = bool(inc.spec.get("remote"))
        t = {}
        t0 = time.monotonic()
        await faults.hit("migrate.target.before_restore")
        wd = work_dir(svc.daemon.paths.run, inc.gfvm_id)
        images = wd / "images"
        ckpt_path = inc.spec["ckpt"]
        f = await svc.files.open(ckpt_path)
        blob = await f.read(0, await f.size())
        t["fetch_ckpt"] = time.monotonic() - t0
        log.info("%s: checkpoint read (%d bytes)", inc.gfvm_id, len(blob))
        t1 = time.monotonic()
        manifest = await trio.to_thread.run_sync(_unpack_and_verify, blob, images)
        t["verify"] = time.monotonic() - t1

        t1 = time.monotonic()
        pager = svc.pager
        paging_dir = f"procs/{inc.gfvm_id}"
        source, inc.prep = inc.prep, None
        await trio.to_thread.run_sync(source.refresh)
        t["refresh_paging_file"] = time.monotonic() - t1
        log.info("%s: paging file up to date", inc.gfvm_id)
        keeper, inc.keeper = inc.keeper, None
        server = None
        thread = None
        keep_serving = False
        try:
            if keeper is None:
                keeper = await trio.to_thread.run_sync(KeeperClient.spawn, wd / "keeper.socket")
            # Without a local copy (--allow-remote) the pages come through the File Manager
            # from the master, one lookup at a time: the python engine (no local fd to pread).
            server = LazyPagesServer(images, wd, page_source=source, keeper=keeper,
                                     engine="python" if remote else "auto")
            await trio.to_thread.run_sync(server.listen)
            thread = threading.Thread(target=_run_server, args=(server,), name="lazy-pages",
                                      daemon=True)
            thread.start()
            t1 = time.monotonic()
            result = await _restore_while_served(
                server, thread, 0.8 * svc.settings.restore_timeout,  # the source waits longer
                lambda: criu.restore(
                    images, work_dir=wd, pidfile=wd / "root.pid", lazy_pages=True,
                    require_manifest=False, extra=["--leave-stopped"], manage_cgroups="ignore",
                    verbosity=CRIU_VERBOSITY,
                ),
            )
            inc.root_pid = result.root_pid
            svc.watch_restored_root(result.root_pid)
            t["criu_restore"] = time.monotonic() - t1
            log.info("%s: criu restored the tree, root pid %d", inc.gfvm_id, result.root_pid)
            server.attach_root(result.root_pid)
            inc.host_pids = await trio.to_thread.run_sync(inner_to_host, result.root_pid)
            svc.journal.save("in", inc.gfvm_id, {"phase": "restored", "source": inc.source,
                                                 "root_pid": inc.root_pid,
                                                 "root_start": _start_time(inc.root_pid)})
            await faults.hit("migrate.target.after_restore")

            if remote:
                # Flushing: the lazy-pages server keeps serving over the network for as long
                # as the process lives; the pager does not take it over.
                keep_serving = True
            else:
                # Pages CRIU's images hold go in now: after the swap nobody serves them.
                t1 = time.monotonic()
                await trio.to_thread.run_sync(_push_image_pages, server, images, inc.host_pids)
                t["push_image_pages"] = time.monotonic() - t1
                if server.error is not None:
                    raise GfvmError(f"the lazy-pages server failed: {server.error}")
                stats = server.statistics()
                t1 = time.monotonic()
                await trio.to_thread.run_sync(_stop_server, server, thread, keeper)
                server = thread = keeper = None
                t["release_criu_uffds"] = time.monotonic() - t1

                t1 = time.monotonic()
                asids = [int(a) for a in inc.spec.get("asids", [])]
                host_pids = [inc.host_pids[a] for a in asids if a in inc.host_pids]
                prepared, source = source, None  # the pager's now
                await trio.to_thread.run_sync(self._adopt, inc, host_pids, prepared)
                t["adopt"] = time.monotonic() - t1
                log.info("%s: adopted by the pager", inc.gfvm_id)
                await faults.hit("migrate.target.after_adopt")

            # The commit point: `owner` names us, durable on every replica. Only the master of
            # the files can write it (a demoted node's write gets no acks), and a source that
            # takes its files back reads it before it thaws its own copy. The source says when
            # the handoff (which ran while we restored) is done.
            t1 = time.monotonic()
            with trio.move_on_after(svc.settings.restore_timeout):
                await inc.go.wait()
            if inc.aborted or not inc.go.is_set():
                raise GfvmError("aborted by the source" if inc.aborted
                                else "the source did not complete the handoff")
            t["wait_handoff"] = time.monotonic() - t1
            t1 = time.monotonic()
            if not remote:
                w = await svc.files.where(f"{paging_dir}/index")
                if w["master"] != svc.node:
                    raise GfvmError(
                        f"{svc.node} is no longer the master of the process's files "
                        f"({w['master']} is): not starting it here"
                    )
            await write_owner(svc.files, paging_dir, svc.node)
            inc.committed = True
            svc.journal.save("in", inc.gfvm_id, {"phase": "committed", "source": inc.source,
                                                 "root_pid": inc.root_pid,
                                                 "pids": sorted(inc.host_pids.values())})
            t["commit"] = time.monotonic() - t1
            t1 = time.monotonic()
            if not remote:
                # Only now may this node write the process's files (page-out, index records,
                # compaction): before `owner` the source may still take them back.
                await trio.to_thread.run_sync(self._release_adopted, inc)
            t["release"] = time.monotonic() - t1
            t1 = time.monotonic()
            await trio.to_thread.run_sync(_resume, list(inc.host_pids.values()))
            t["resume"] = time.monotonic() - t1
            t["total"] = time.monotonic() - t0
            if keep_serving:
                stats = server.statistics()
                svc.spawn(self._serve_remote, inc, server, thread, keeper, source)
                server = thread = keeper = source = None
        finally:
            if server is not None:
                await trio.to_thread.run_sync(_stop_server, server, thread, keeper)
            elif keeper is not None:
                await trio.to_thread.run_sync(_end_keeper, keeper)
            if source is not None:
                await trio.to_thread.run_sync(source.close)
        await faults.hit("migrate.target.after_run")
        return {
            "node": svc.node,
            "root_pid": inc.root_pid,
            "pids": {str(k): v for k, v in sorted(inc.host_pids.items())},
            "timings": {k: round(v, 6) for k, v in t.items()},
            "images_bytes": manifest.total_bytes,
            "lazy_pages": {k: stats.get(k) for k in ("faults", "pages_copied", "pages_zero",
                                                     "pages_prefetched")},
            "remote": remote,
        }

    async def _serve_remote(self, inc: Incoming, server, thread, keeper, source) -> None:
        """--allow-remote: serve the process's pages over the network until it exits."""
        try:
            await trio.to_thread.run_sync(thread.join, abandon_on_cancel=True)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_stop_server, server, thread, keeper)
                await trio.to_thread.run_sync(source.close)
                await trio.to_thread.run_sync(
                    shutil.rmtree, work_dir(self.svc.daemon.paths.run, inc.gfvm_id), True)
            log.info("%s: the remotely served process ended", inc.gfvm_id)

    def _adopt(self, inc: Incoming, host_pids: list[int], prepared) -> None:
        pager = self.svc.pager
        spec = inc.spec
        try:
            pager.adopt_restored(
                inc.gfvm_id, name=spec.get("name") or inc.gfvm_id,
                cmd=list(spec.get("cmd") or []), init_pid=inc.root_pid, host_pids=host_pids,
                mem_limit=spec.get("mem_limit"), prepared=prepared, hold=True,
            )
        finally:
            prepared.close()  # spent by adopt_restored unless it failed before taking it
        tree = pager.tree(inc.gfvm_id)
        if spec.get("log_path"):
            tree.rec.log_path = spec["log_path"]
            pager.save_record(tree.rec)

    def _release_adopted(self, inc: Incoming) -> None:
        """After the commit point: the adopted tree may write its paging file (blocking; a
        tree this node does not manage, e.g. --allow-remote, is left alone)."""
        pager = self.svc.pager
        tree = pager.trees.get(inc.gfvm_id)
        if tree is None or not tree.held:
            return
        try:
            pager.release_adopted(inc.gfvm_id)
        except Exception:  # noqa: BLE001 - the process runs here regardless; tracking reports it
            log.exception("%s: releasing the adopted tree", inc.gfvm_id)

    def _kill_restored(self, inc: Incoming) -> None:
        """Failure before the process ran here: no copy of it may survive on this node."""
        pager = self.svc.pager
        tree = pager.trees.get(inc.gfvm_id)
        if tree is not None:
            try:
                pager.abandon(inc.gfvm_id)
            except Exception:  # noqa: BLE001 - best effort; the kill below is what matters
                log.exception("abandoning %s", inc.gfvm_id)
        if inc.root_pid:
            kill_tree_root(inc.root_pid)
        if inc.keeper is not None:
            _end_keeper(inc.keeper)
            inc.keeper = None
        if inc.prep is not None:
            inc.prep.close()
            inc.prep = None
        self.svc.journal.remove("in", inc.gfvm_id)

    async def abort(self, gfvm_id: str, reason: str) -> dict:
        """Drops an incoming migration. {"state": "aborted"} means this node will never run the
        process (unless asked to restore it anew); {"state": "running"}: too late, it runs here;
        {"state": "unknown"}: nothing was known about it (nothing to drop)."""
        inc = self.incoming.get(gfvm_id)
        if inc is None:
            return {"state": "running" if gfvm_id in self.svc.pager.trees else "unknown"}
        if inc.phase == "restoring":
            if not inc.committed:
                inc.aborted = True
                inc.go.set()  # a restore waiting for the handoff gives up now
            await inc.done.wait()
        if inc.phase == "running":
            return {"state": "running"}
        log.info("%s: migration from %s aborted: %s", gfvm_id, inc.source, reason)
        await trio.to_thread.run_sync(self._kill_restored, inc)
        self.incoming.pop(gfvm_id, None)
        await trio.to_thread.run_sync(
            shutil.rmtree, work_dir(self.svc.daemon.paths.run, gfvm_id), True
        )
        return {"state": "aborted"}

    def commit(self, gfvm_id: str) -> dict:
        """MigCommit: the handoff is done; the restore may commit once it is ready."""
        inc = self._get(gfvm_id, "restoring", "running")
        if inc.aborted:
            raise UsageError(f"the migration of {gfvm_id} to {self.svc.node} was aborted")
        inc.go.set()
        return {"state": inc.phase}

    def query(self, gfvm_id: str) -> dict:
        inc = self.incoming.get(gfvm_id)
        running_here = gfvm_id in self.svc.pager.trees
        return {"known": inc is not None, "running_here": running_here,
                **(inc.summary() if inc else {})}

    # ------------------------------------------------------------------ after the restart

    async def _prefetch_task(self, inc: Incoming) -> None:
        mode = inc.spec.get("prefetch", "hot")
        if mode == "none":
            return
        try:
            started = time.monotonic()
            touched, pages = await trio.to_thread.run_sync(self._prefetch, inc, mode)
            inc.prefetch = {"mode": mode, "windows": touched, "pages": pages,
                            "seconds": round(time.monotonic() - started, 3)}
        except Exception as exc:  # noqa: BLE001 - prefetch is an optimisation only
            log.warning("%s: prefetch failed: %s", inc.gfvm_id, exc)
            inc.prefetch = {"mode": mode, "error": str(exc)}

    def _prefetch(self, inc: Incoming, mode: str) -> tuple[int, int]:
        """Faults in the hot set (or everything) through the pager's own fault loop, by reading
        one page per 64-page window of the running process (blocking)."""
        from gfvm.pager.pagefile import load_index

        pager = self.svc.pager
        paging_dir = f"procs/{inc.gfvm_id}"
        wanted: dict[int, set[int]] = {}
        if mode == "all":
            index = load_index(pager.backing, paging_dir)
            for asid in inc.host_pids:
                wanted[asid] = set(index.entries(asid))
        else:
            wanted = hot_pages(pager.backing.read_file(f"{paging_dir}/index"),
                               int(inc.spec.get("hot_from") or 0))
        touched = pages = 0
        buf = bytearray(PAGE)
        # First the argument and environment pages: the kernel reads /proc/PID/cmdline and
        # environ from there without faulting them in (ps would show an empty command).
        for host in inc.host_pids.values():
            for start, end in _arg_env_ranges(host):
                for addr in range(start - start % PAGE, end, PAGE):
                    try:
                        native.read_pages(host, [addr], buf)
                    except OSError:
                        break
        for asid, vpages in wanted.items():
            host = inc.host_pids.get(asid)
            if host is None:
                continue
            pages += len(vpages)
            last = -1
            for v in sorted(vpages):
                window = (v * PAGE) // WINDOW
                if window == last:
                    continue
                last = window
                try:
                    native.read_pages(host, [v * PAGE], buf)
                    touched += 1
                except OSError:
                    pass  # unmapped since, or the process is gone
        return touched, pages


OWNER = "owner"


async def write_owner(files, paging_dir: str, node: str) -> None:
    """Makes `<paging_dir>/owner` name `node`, durable on the master and every replica."""
    f = await files.open(f"{paging_dir}/{OWNER}", create=True)
    data = f"{node}\n".encode()
    await f.truncate(0)
    await f.write(0, data)
    await f.fsync()


async def read_owner(files, paging_dir: str) -> str:
    """The node `<paging_dir>/owner` names ("" when there is none). Unavailable when no
    up-to-date copy can be read."""
    from gfvm.errors import NotFound

    try:
        f = await files.open(f"{paging_dir}/{OWNER}")
    except NotFound:
        return ""
    return (await f.read(0, 64)).decode(errors="replace").strip()


def _arg_env_ranges(pid: int) -> list[tuple[int, int]]:
    """[arg_start, arg_end) and [env_start, env_end) of a process (/proc/PID/stat 48-51)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        a0, a1, e0, e1 = (int(fields[i]) for i in range(45, 49))
    except (OSError, ValueError, IndexError):
        return []
    return [(a0, a1), (e0, e1)]


def hot_pages(index_data: bytes, mark: int) -> dict[int, set[int]]:
    """asid -> vpages stored by the records appended at or after byte `mark` of an index file
    (the source's last pre-flush round and final flush). Empty when `mark` is not usable (a
    compaction rewrote the file meanwhile)."""
    from gfvm.pager.pagefile import HEADER, PUT, PUTS, parse_index

    if mark < HEADER.size or mark > len(index_data) or (mark - HEADER.size) % 32:
        return {}
    try:
        _, _, records, _ = parse_index(index_data[: HEADER.size] + index_data[mark:])
    except Exception:  # noqa: BLE001 - a hint only
        return {}
    out: dict[int, set[int]] = {}
    for rec in records:
        if rec.rtype == PUT:
            out.setdefault(rec.asid, set()).add(rec.a)
        elif rec.rtype == PUTS:
            out.setdefault(rec.asid, set()).update(rec.payload[0])
    return out


def _check_spec(spec: dict) -> None:
    """The JSON a source sends: types checked before anything acts on it."""
    cmd = spec.get("cmd", [])
    if not isinstance(cmd, list) or not all(isinstance(c, str) for c in cmd):
        raise UsageError("migration spec: cmd must be a list of strings")
    if not isinstance(spec.get("asids", []), list) or not all(
        isinstance(a, int) and 0 < a < 1 << 22 for a in spec.get("asids", [])
    ):
        raise UsageError("migration spec: asids must be pids")
    log_path = spec.get("log_path") or ""
    if log_path and (not isinstance(log_path, str) or not log_path.startswith("/run/gfvm/procs/")
                     or ".." in log_path.split("/")):
        raise UsageError(f"migration spec: log path {log_path!r} is not a gfvm output log")


def _unpack_and_verify(blob: bytes, images: Path):
    shutil.rmtree(images, ignore_errors=True)
    ckptfile.unpack(blob, images)
    return verify_manifest(images)


#: how long CRIU may take to fail on its own once the lazy-pages server ended
SERVER_GONE_GRACE = 2.0


async def _restore_while_served(server: LazyPagesServer, thread: threading.Thread,
                                timeout: float, run_restore):
    """Runs `run_restore()` (CRIU's lazy restore) while `thread` serves its faults. CRIU waits
    for every page it touches: when the server ends (an error: a page it cannot read), CRIU
    would wait forever, so it is cancelled (which kills what it restored so far); so it is
    after `timeout` seconds. Raises GfvmError in both cases."""
    box: dict = {}
    failure = ""

    async def restore(cancel_scope: trio.CancelScope) -> None:
        try:
            box["result"] = await run_restore()
        except Exception as exc:  # noqa: BLE001 - raised below as itself (no exception group)
            box["error"] = exc
        cancel_scope.cancel()

    with trio.move_on_after(timeout) as overall:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(restore, nursery.cancel_scope)
            while thread.is_alive():
                await trio.sleep(0.05)
            with trio.move_on_after(SERVER_GONE_GRACE):
                await trio.sleep_forever()  # CRIU's own failure, if it comes, says more
            failure = f"the lazy-pages server ended during the restore: {server.error or 'no error'}"
            nursery.cancel_scope.cancel()
    if "result" in box:
        return box["result"]
    if "error" in box:
        raise box["error"]
    if overall.cancelled_caught:
        failure = f"criu restore did not finish within {timeout:.0f} s"
    log.warning("%s", failure)
    raise GfvmError(failure)


def _run_server(server: LazyPagesServer) -> None:
    try:
        server.run()
    except BaseException:  # noqa: BLE001 - kept in server.error, checked by the restore
        pass


def _push_image_pages(server: LazyPagesServer, images: Path, host_pids: dict[int, int]) -> None:
    """Prefetches, task by task, every page CRIU's images hold (they are not in the paging
    file), and waits until they are in."""
    imgs = ImageDir(images)
    for inner in sorted(host_pids):
        try:
            mem = imgs.task_memory(inner)
        except (ImageError, FileNotFoundError):
            continue  # a task without memory images
        ranges = [(r.vaddr, r.end) for r in mem.runs if r.present]
        if not ranges:
            continue
        server.prefetch(inner, ranges)
        if not server.prefetched.wait(60):
            raise GfvmError(f"pushing the image pages of task {inner} did not finish in 60 s")


def _stop_server(server: LazyPagesServer, thread: threading.Thread | None, keeper) -> None:
    server.stop()
    if thread is not None:
        thread.join(30)
    if keeper is not None:
        _end_keeper(keeper)


def _end_keeper(keeper: KeeperClient) -> None:
    """Ends the keeper we spawned and waits until its uffd copies are closed. SIGKILL: the
    kernel closes its files at once, where a polite exit spends ~15 ms in the interpreter's
    shutdown while the process is frozen."""
    keeper.close()
    if keeper.proc is not None:
        keeper.proc.kill()
        keeper.proc.wait()
    else:
        keeper.release()


def _resume(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _start_time(pid: int) -> int:
    from gfvm.pager import procfs

    try:
        return procfs.start_time(pid)
    except ProcessLookupError:
        return 0


def kill_tree_root(pid: int, start_time: int | None = None) -> None:
    """SIGKILLs the init of a restored tree (its PID namespace dies with it). With `start_time`,
    only if the pid still names that process."""
    from gfvm.pager import procfs

    try:
        if start_time is not None and procfs.start_time(pid) != start_time:
            return
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _mib(n: int) -> int:
    return n >> 20
