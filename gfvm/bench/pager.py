"""`gfvm bench pager`: what managing a process costs and how fast the pager moves pages.

(a) and (c) run a Pager in a temporary directory (its own keeper, local paging files, R=1);
(b) runs the real thing at R=2: a 3-node namespace cluster (real gfvmds, the File Manager keeping
every paging file on two nodes), the process started on n1 with `gfvm run`. Also (b) at R=1 on the
local Pager, for reference. The workload is the C program of gfvm/pager/workload.c. Prints a
table and writes JSON. Not a test: numbers are compared with the targets, nothing asserts. Needs
root and gcc. Blocking from start to end.

  (a) write throughput of a write-heavy workload, managed vs unmanaged (target >= 95 %)
  (b) page-out throughput with R=2: the background drain of freshly written memory, background
      page-out while the process keeps rewriting its memory, and flush_all of a frozen process
      with everything dirty (target >= 400 MB/s)
  (c) fault service from the paging file: 1 GiB touched sequentially and randomly after every
      page was evicted (target >= 250k pages/s sequential), per-touch p50/p99 and the fault
      loop's per-window latency, against plain first-touch kernel faults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

MiB = 1 << 20
PAGE = 4096


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--write-mb", type=int, default=256, help="region of the write benchmark (a)")
    p.add_argument("--write-seconds", type=float, default=2.0, help="duration of each run of (a)")
    p.add_argument("--flush-mb", type=int, default=512, help="dirty memory paged out in (b)")
    p.add_argument("--load-mb", type=int, default=2048,
                   help="region rewritten pass after pass in (b)'s page-out under load "
                   "(default 2048: one pass takes longer than the hot bound)")
    p.add_argument("--fault-mb", type=int, default=1024, help="memory faulted back in (c)")
    p.add_argument("--interval-ms", type=int, help="pager scan interval (default: the pager's; "
                   "(a) and (c) only: the cluster of (b) uses its gfvmds' settings)")
    p.add_argument("--pairs", type=int, default=8,
                   help="unmanaged/managed run pairs of (a) (default 8; the ratio is their median)")
    p.add_argument(
        "--json",
        dest="json_path",
        help="where to write the results " "(default bench-results/pager-<time>.json)",
    )
    p.add_argument(
        "--only", choices=["a", "b", "c"], action="append", help="run only these parts (repeatable)"
    )


class _Session:
    """A Pager in a temp dir plus the workload binary; closes everything it started."""

    def __init__(self, interval_ms: int | None) -> None:
        from gfvm.config import NodePaths
        from gfvm.control import ControlServer
        from gfvm.pager.service import Pager
        from gfvm.pager.tracker import PagerSettings
        from gfvm.pager.workload import build

        self.tmp = Path(tempfile.mkdtemp(prefix="gfvm-bench-pager-"))
        self.binary = build(self.tmp)
        settings = PagerSettings()
        if interval_ms:
            settings.interval = interval_ms / 1000
        node = f"bench{os.getpid()}"
        paths = NodePaths(
            etc=self.tmp / "etc",
            state=self.tmp / "state",
            run=self.tmp / "run",
            mount=self.tmp / "mnt",
        )
        daemon = SimpleNamespace(paths=paths, node_name=node, config=None, control=ControlServer())
        self.pager = Pager(daemon, settings=settings)
        self.pager.open_blocking()
        self.settings = settings
        self._plain: list[subprocess.Popen] = []

    def listener(self):
        """A unix socket for the next workload to connect to: (socket, its path)."""
        import socket as socketlib

        sock_path = self.tmp / f"w{time.monotonic_ns()}.sock"
        listener = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        listener.bind(str(sock_path))
        listener.listen(1)
        listener.settimeout(60)
        return listener, sock_path

    @staticmethod
    def accept(listener) -> "_Conn":
        conn, _ = listener.accept()
        listener.close()
        return _Conn(conn)

    def workload(self, npages: int, managed: bool):
        """Starts the workload (managed through the pager or plain); returns (conn, tree|None)."""
        listener, sock_path = self.listener()
        argv = [str(self.binary), str(sock_path), str(npages)]
        tree = None
        if managed:
            summary = self.pager.run_blocking(argv, "bench", None)
            tree = self.pager.tree(summary["id"])
        else:
            # its own session, as a managed tree's is: the kernel's autogroups then give both
            # the same share against this process (whose threads include the pager's)
            self._plain.append(subprocess.Popen(argv, start_new_session=True))
        return self.accept(listener), tree

    def close(self) -> None:
        from gfvm.config import cgroup_node_group, cgroup_roots

        for tree in list(self.pager.trees.values()):
            self.pager.kill_tree(tree.rec)
        keeper_pid = None
        try:
            keeper_pid = self.pager._keeper_call("ping")["pid"]
        except Exception:  # noqa: BLE001 - best effort
            pass
        self.pager.close_blocking()
        for popen in [*self.pager._launched.values(), *self._plain]:
            popen.kill()
            popen.wait()
        if keeper_pid:
            try:
                os.kill(keeper_pid, 9)
            except ProcessLookupError:
                pass
        for root in cgroup_roots():
            group = root / "gfvm" / cgroup_node_group(self.pager.cluster, self.pager.node)
            for d in sorted(
                (p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
            ):
                _rmdir(d)
            _rmdir(group)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _rmdir(d: Path) -> None:
    for _ in range(100):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            kill = d / "cgroup.kill"
            if kill.exists():
                kill.write_text("1")
            time.sleep(0.05)


class _Conn:
    def __init__(self, sock) -> None:
        sock.settimeout(600)
        self.f = sock.makefile("rw")
        self.sock = sock
        self.pid = int(self.cmd("pid").split()[1])

    def cmd(self, line: str) -> str:
        self.f.write(line + "\n")
        self.f.flush()
        answer = self.f.readline().strip()
        if not answer.startswith("ok"):
            raise RuntimeError(f"workload answered {answer!r} to {line!r}")
        return answer

    def close(self) -> None:
        try:
            self.cmd("exit 0")
        except (OSError, RuntimeError):
            pass
        self.f.close()
        self.sock.close()


def _freeze(tree):
    from gfvm.pager.cgroup import TreeCgroup

    return TreeCgroup(tuple(Path(p) for p in tree.rec.cgroup))


# --- (a) --------------------------------------------------------------------------------------


def bench_write(s: _Session, mb: int, seconds: float, pairs: int = 4) -> dict:
    """Alternates unmanaged and managed runs (this machine is shared and noisy: a ratio of
    neighbouring runs is steadier than two long runs) and reports medians. Also reports
    throughput per second of the workload's own CPU time, which other load does not skew.
    Both processes run in sessions of their own, and each run starts with nothing left for
    the pager to page out, so the unmanaged run pays nothing for the managed one."""
    npages = mb * MiB // PAGE
    runs: dict[str, list[tuple[float, float]]] = {"unmanaged": [], "managed": []}
    procs = {}
    for label, managed in (("unmanaged", False), ("managed", True)):
        conn, tree = s.workload(npages, managed)
        conn.cmd(f"fill 0 {npages} 1")
        if tree is not None:
            tree.call(tree.flush_all)
        procs[label] = (conn, tree)
    managed_tree = procs["managed"][1]
    for _ in range(pairs):
        for label in ("unmanaged", "managed"):
            conn, _tree = procs[label]
            # every run starts with the pager idle: what the managed run dirtied is paged out
            # before the next run, not during it (it would slow the unmanaged run down and
            # flatter the ratio)
            managed_tree.call(managed_tree.flush_all)
            wall, cpu = (float(x) for x in conn.cmd(f"bench {int(seconds * 1000)}").split()[1:])
            runs[label].append((wall, cpu))
    out: dict = {"runs": runs, "seconds_per_run": seconds, "region_mb": mb}
    tree = procs["managed"][1]
    snap = tree.snapshot()
    out["managed_pages_paged_out"] = snap["pages_paged_out"]
    out["managed_pager_counters"] = snap["counters"]
    for conn, _tree in procs.values():
        conn.close()
    ratios = [m[0] / u[0] for u, m in zip(runs["unmanaged"], runs["managed"], strict=False)]
    cpu_ratios = [m[1] / u[1] for u, m in zip(runs["unmanaged"], runs["managed"], strict=False)]
    out["unmanaged"] = _median([u[0] for u in runs["unmanaged"]])
    out["managed"] = _median([m[0] for m in runs["managed"]])
    out["ratio"] = _median(ratios)
    out["cpu_ratio"] = _median(cpu_ratios)
    return out


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


# --- (b) --------------------------------------------------------------------------------------


class _LocalPageout:
    """(b) on the local Pager of the session: R=1, local paging files."""

    replicas = 1

    def __init__(self, s: _Session) -> None:
        self.s = s
        self.tree = None

    def start(self, npages: int) -> _Conn:
        conn, self.tree = self.s.workload(npages, True)
        return conn

    def snapshot(self) -> dict:
        return self.tree.snapshot()

    def flush_all(self) -> dict:
        result = self.tree.call(self.tree.flush_all)
        return {"pages": result.pages, "bytes": result.bytes, "seconds": result.seconds}

    def cgroup(self):
        return _freeze(self.tree)

    def where(self) -> dict:
        return {"backing": "local files"}

    def close(self) -> None:
        pass


class _ClusterPageout:
    """(b) on node n1 of a 3-node namespace cluster at R=2: the process runs under n1's gfvmd
    (`gfvm run`), whose pager writes its paging file through the File Manager."""

    replicas = 2

    def __init__(self, s: _Session) -> None:
        from gfvm.cluster import Cluster
        from gfvm.migrate import harness

        self.s = s
        self.name = f"gfbp{os.getpid() % 10000}"
        Cluster.down(self.name)
        print(f"    bringing up 3 namespace nodes (cluster {self.name}, R=2)", flush=True)
        self.cluster = Cluster.up(3, name=self.name, replicas=2)
        try:
            harness.wait_ready(self.cluster)
        except BaseException:
            Cluster.down(self.name)
            raise
        self.id: str | None = None

    def _call(self, op: str, args: dict, timeout: float = 600) -> dict:
        from gfvm import control

        return control.call(self.cluster.control_socket("n1"), op, args, timeout=timeout)

    def start(self, npages: int) -> _Conn:
        listener, sock_path = self.s.listener()
        summary = self._call("run", {"cmd": [str(self.s.binary), str(sock_path), str(npages)]})
        self.id = summary["id"]
        return self.s.accept(listener)

    def snapshot(self) -> dict:
        return self._call("status", {"id": self.id})

    def flush_all(self) -> dict:
        return self._call("flush", {"id": self.id})

    def cgroup(self):
        from gfvm.pager.cgroup import TreeCgroup

        return TreeCgroup(tuple(Path(p) for p in self.snapshot()["cgroup"]))

    def where(self) -> dict:
        w = self._call("fm.where", {"path": f"procs/{self.id}/pages"})
        return {"master": w["master"], "in_sync": w["in_sync"]}

    def close(self) -> None:
        from gfvm.cluster import Cluster

        Cluster.down(self.name)


def bench_flush(target, mb: int, load_mb: int, load_mbps: int = 500) -> dict:
    """Page-out throughput of one managed process (see _LocalPageout, _ClusterPageout)."""
    npages = mb * MiB // PAGE
    conn = target.start(npages)
    out: dict = {"mb": mb, "replicas": target.replicas}
    # background drain: write everything once, time until it is all in the paging file
    t0 = time.monotonic()
    conn.cmd(f"fill 0 {npages} 1")
    t_written = time.monotonic()
    _wait_in_file(target, npages)
    t_done = time.monotonic()
    out["background_drain_s"] = t_done - t_written
    out["background_mb_per_s"] = mb / (t_done - t0) if t_done > t0 else None
    # flush_all of a frozen tree with everything dirty: first while the paging file grows
    # (new slots: the kernel allocates page cache), then in the steady state (freed slots reused)
    for label, gen in (("growing", 2), ("steady", 3)):
        conn.cmd(f"fill 0 {npages} {gen}")
        cg = target.cgroup()
        cg.freeze()
        try:
            result = target.flush_all()
        finally:
            cg.thaw()
        out[f"flush_all_{label}_pages"] = result["pages"]
        out[f"flush_all_{label}_s"] = result["seconds"]
        out[f"flush_all_{label}_mb_per_s"] = (
            result["bytes"] / MiB / result["seconds"] if result["seconds"] else None
        )
    conn.cmd("verify")
    out["paging_file"] = target.where()
    conn.close()
    out.update(_under_load(target, load_mb, load_mbps))
    return out


def _under_load(target, load_mb: int, load_mbps: int, seconds: float = 6.0) -> dict:
    """Background page-out while a process keeps writing: it rewrites a `load_mb` region
    sequentially, pass after pass, at `load_mbps` (sleeping when ahead, as a process waiting on
    anything else would). The region is large enough that a page is rewritten only after the
    hot bound: every page it writes goes cold, so what the pager writes per second is its
    throughput, not what its hot-page policy chose to defer (a region rewritten within a tick
    or two makes most pages hot, and they go out once per hot bound)."""
    npages = load_mb * MiB // PAGE
    conn = target.start(npages)
    # first touch and first page-out of the whole region, not timed: in memory, in the file
    conn.cmd(f"fill 0 {npages} 1")
    _wait_in_file(target, npages)
    before = target.snapshot()["bytes_paged_out"]
    t0 = time.monotonic()
    dirtied_mb = float(conn.cmd(f"fillloop {int(seconds * 1000)} {load_mbps}").split()[1])
    elapsed = time.monotonic() - t0
    written = target.snapshot()["bytes_paged_out"] - before
    conn.close()
    return {
        "under_load_region_mb": load_mb,
        "under_load_pass_s": load_mb * MiB / 1e6 / load_mbps,
        "under_load_dirtied_mb_per_s": dirtied_mb / elapsed,
        "under_load_mb_per_s": written / 1e6 / elapsed,
    }


def _wait_in_file(target, npages: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while target.snapshot()["pages_in_file"] < npages:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pager did not page out {npages} pages in {timeout:.0f} s")
        time.sleep(0.01)


# --- (c) --------------------------------------------------------------------------------------


def bench_faults(s: _Session, mb: int) -> dict:
    npages = mb * MiB // PAGE
    out: dict = {"mb": mb, "window_pages": s.settings.window_pages}
    for order in ("seq", "random"):
        conn, tree = s.workload(npages, True)
        conn.cmd(f"fill 0 {npages} 1")
        cg = _freeze(tree)
        cg.freeze()
        try:
            tree.call(tree.flush_all)
        finally:
            cg.thaw()
        evicted = tree.call(tree.evict)
        before = tree.loop.latency().buckets
        total_us, p50, p99 = (int(x) for x in conn.cmd(f"touch {order}").split()[1:])
        after = tree.loop.latency().buckets
        counters = tree.loop.counters()
        from gfvm.native import LatencyHistogram

        window = LatencyHistogram(tuple(a - b for a, b in zip(after, before, strict=False)))
        out[order] = {
            "pages_evicted": evicted,
            "pages_per_s": npages / (total_us / 1e6),
            "touch_p50_ns": p50,
            "touch_p99_ns": p99,
            "window_p50_us": (window.p50_ns or 0) / 1000,
            "window_p99_us": (window.p99_ns or 0) / 1000,
            "windows": window.count,
            "pages_copied": counters.pages_copied,
        }
        conn.cmd("verify")
        conn.close()
    for write in (False, True):
        conn, _ = s.workload(npages, False)
        total_us, p50, p99 = (
            int(x) for x in conn.cmd(f"touch seq{' write' if write else ''}").split()[1:]
        )
        out["kernel_first_touch_" + ("write" if write else "read")] = {
            "pages_per_s": npages / (total_us / 1e6),
            "touch_p50_ns": p50,
            "touch_p99_ns": p99,
        }
        conn.close()
    return out


# --- driver -----------------------------------------------------------------------------------


def run(args) -> int:
    if os.geteuid() != 0:
        print("gfvm bench pager: needs root (userfaultfd, ptrace, cgroups)", file=sys.stderr)
        return 1
    parts = set(args.only or ["a", "b", "c"])
    s = _Session(args.interval_ms)
    results: dict = {
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "settings": {
            "interval_s": s.settings.interval,
            "hot_bound_s": s.settings.hot_bound,
            "window_pages": s.settings.window_pages,
            "replicas": "(a), (c): 1, local paging files; (b): 2, through the File Manager "
            "of a 3-node namespace cluster (and 1, local, for reference)",
        },
    }
    try:
        if "a" in parts:
            print(
                f"(a) write-heavy workload, {args.write_mb} MiB, "
                f"{args.write_seconds:.0f} s per run ...",
                flush=True,
            )
            results["write"] = bench_write(s, args.write_mb, args.write_seconds, args.pairs)
        if "b" in parts:
            print(f"(b) page-out of {args.flush_mb} MiB, R=2 ...", flush=True)
            cluster = _ClusterPageout(s)
            try:
                results["pageout"] = bench_flush(cluster, args.flush_mb, args.load_mb)
            finally:
                cluster.close()
            print(f"(b) page-out of {args.flush_mb} MiB, R=1 (local paging file) ...", flush=True)
            results["pageout_r1"] = bench_flush(_LocalPageout(s), args.flush_mb, args.load_mb)
        if "c" in parts:
            print(f"(c) fault service, {args.fault_mb} MiB ...", flush=True)
            results["faults"] = bench_faults(s, args.fault_mb)
    finally:
        s.close()
    _print_table(results)
    path = Path(args.json_path or f"bench-results/pager-{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"results written to {path}")
    return 0


def _pageout_rows(b: dict) -> list[tuple[str, str, str]]:
    r = f"R={b['replicas']}"
    target = ">= 400 MB/s" if b["replicas"] == 2 else ""
    return [
        (
            f"(b) {r} background page-out under load",
            f"{b['under_load_mb_per_s']:.0f} MB/s "
            f"(process dirtied {b['under_load_dirtied_mb_per_s']:.0f} MB/s)",
            target,
        ),
        (f"(b) {r} background drain after one write", f"{b['background_mb_per_s']:.0f} MB/s", ""),
        (f"(b) {r} flush_all, steady state", f"{b['flush_all_steady_mb_per_s']:.0f} MB/s", target),
        (
            f"(b) {r} flush_all, paging file growing",
            f"{b['flush_all_growing_mb_per_s']:.0f} MB/s",
            "",
        ),
    ]


def _print_table(r: dict) -> None:
    rows = [("measure", "value", "target")]
    if "write" in r:
        w = r["write"]
        rows += [
            ("(a) unmanaged write throughput", f"{w['unmanaged'] / 1e9:.2f} GB/s", ""),
            ("(a) managed write throughput", f"{w['managed'] / 1e9:.2f} GB/s", ""),
            ("(a) managed / unmanaged (wall)", f"{w['ratio'] * 100:.1f} %", ">= 95 %"),
            ("(a) managed / unmanaged (per CPU s)", f"{w['cpu_ratio'] * 100:.1f} %", ""),
        ]
    for key in ("pageout", "pageout_r1"):
        if key in r:
            rows += _pageout_rows(r[key])
    if "faults" in r:
        c = r["faults"]
        for order in ("seq", "random"):
            o = c[order]
            rows += [
                (
                    f"(c) fault-in {order}",
                    f"{o['pages_per_s'] / 1e3:.0f}k pages/s",
                    ">= 250k pages/s" if order == "seq" else "",
                ),
                (
                    f"(c) {order}: touch p50 / p99",
                    f"{o['touch_p50_ns'] / 1e3:.1f} / {o['touch_p99_ns'] / 1e3:.1f} us",
                    "",
                ),
                (
                    f"(c) {order}: window p50 / p99",
                    f"{o['window_p50_us']:.0f} / {o['window_p99_us']:.0f} us "
                    f"({c['window_pages']} pages)",
                    "",
                ),
            ]
        for kind in ("read", "write"):
            k = c[f"kernel_first_touch_{kind}"]
            rows.append(
                (
                    f"(c) kernel first touch ({kind})",
                    f"{k['pages_per_s'] / 1e3:.0f}k pages/s, "
                    f"p50 {k['touch_p50_ns'] / 1e3:.1f} us, p99 {k['touch_p99_ns'] / 1e3:.1f} us",
                    "",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
