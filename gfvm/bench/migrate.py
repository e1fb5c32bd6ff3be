"""`gfvm bench migrate`: how long a process is frozen when it moves, gfvm against the baselines.

On a local 3-node namespace cluster (R=2, real gfvmds, real CRIU), for each memory size
(default 256 MiB, 1 GiB, 4 GiB) the migration workload (gfvm/migrate/workload.c: its memory a
function of a step counter, a 32 MiB hot set rewritten all the time) is moved from n1 by:

  gfvm               `gfvm migrate --to auto`: a node holding a replica of the paging file
  flushing           `gfvm migrate --allow-remote` to the node without a replica (the paper's
                     Flushing: pages come back over the network after the restart)
  criu-stop-and-copy criu dump with a page server on the target, criu restore there
  criu-lazy          criu dump --lazy-pages + lazy-pages daemon + restore --lazy-pages
                     (Copy-On-Reference: the source serves pages until all are moved)
  criu-pre-copy      needs soft-dirty tracking: reported unsupported on this kernel

and reports the freeze time (process stopped on n1 until it runs on the target), the total
time, the bytes that crossed the source's link while the process was frozen, and the time of
the workload's first full memory check on the target (every page read once: local for gfvm,
over the network for flushing; skipped for flushing above 1 GiB, where it takes minutes, in
favour of a progress check). Every run ends with a passing check. The gfvm and flushing
runs start from a process whose memory has been paged out (steady state); the CRIU ones from
the same workload without gfvm. Prints a table with the ratios the project targets, writes
JSON. Not a test: nothing asserts. Needs root, gcc, CRIU, tini. Blocks for minutes.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
HOT_MIB = 32
METHODS = ("gfvm", "flushing", "criu-stop-and-copy", "criu-lazy", "criu-pre-copy")
#: above this, flushing's full memory check (every page fetched over the network) is skipped
FLUSHING_CHECK_MAX_MIB = 1024


def add_arguments(p) -> None:
    p.add_argument("--sizes", default="256,1024,4096",
                   help="memory sizes in MiB, comma-separated (default 256,1024,4096)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"which methods to run (default all: {','.join(METHODS)})")
    p.add_argument("--rate", type=int, default=8192,
                   help="hot pages rewritten per second (default 8192: the 32 MiB hot set "
                   "once a second)")
    p.add_argument("--name", default="gfbench", help="cluster name (default gfbench)")
    p.add_argument("--json", dest="json_path",
                   help="where to write the results (default bench-results/migrate-<time>.json)")


def say(msg: str) -> None:
    print(msg, flush=True)


class _Bench:
    def __init__(self, args) -> None:
        from gfvm.cluster import Cluster
        from gfvm.migrate import harness
        from gfvm.migrate import workload as wl

        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="gfvm-bench-migrate-", dir="/var/tmp"))
        Cluster.down(args.name)
        say(f"bringing up 3 namespace nodes (cluster {args.name}, R=2)")
        self.cluster = Cluster.up(3, name=args.name, replicas=2)
        harness.wait_ready(self.cluster)
        self.binary = wl.build(self.work)
        self.n = 0

    def close(self) -> None:
        from gfvm.cluster import Cluster

        Cluster.down(self.args.name)
        shutil.rmtree(self.work, ignore_errors=True)

    def statedir(self) -> Path:
        self.n += 1
        return self.work / f"wl{self.n}"

    # -- gfvm and flushing --------------------------------------------------------------------

    def run_gfvm(self, mib: int, remote: bool) -> dict:
        from gfvm import control
        from gfvm.migrate import harness

        c = self.cluster
        proc = harness.run_workload(c, "n1", self.binary, self.statedir(), mib=mib,
                                    hot_mib=min(HOT_MIB, mib), rate=self.args.rate)
        try:
            # steady state: the initial fill is in the paging file (as after running a while)
            control.call(c.control_socket("n1"), "flush", {"id": proc.id})
            time.sleep(2)
            where = control.call(c.control_socket("n1"), "fm.where",
                                 {"path": f"procs/{proc.id}/index"})
            to = "auto"
            if remote:
                to = next(n for n in c.nodes if n not in where["members"])
            t0 = time.monotonic()
            report = harness.migrate(c, proc, to, allow_remote=remote)
            total = time.monotonic() - t0
            check = None
            if not remote or mib <= FLUSHING_CHECK_MAX_MIB:
                t1 = time.monotonic()
                proc.client.verify(timeout=1800)
                check = time.monotonic() - t1
            else:  # every page over the network, one at a time: minutes; progress at least
                steps = proc.client.status().steps
                time.sleep(1)
                if proc.client.status().steps <= steps:
                    raise RuntimeError("the remotely served workload makes no progress")
            return {
                "method": "flushing" if remote else "gfvm",
                "freeze_seconds": report["freeze_s"],
                "total_seconds": total,
                "bytes_moved_during_freeze": report["network_bytes_during_freeze"],
                "first_full_check_seconds": check,
                "target": report["target"],
                "breakdown": report["freeze_breakdown_s"],
                "target_timings": report.get("target_timings_s", {}),
                "written_during_freeze": report["written_during_freeze"],
                "preflush": report.get("preflush"),
            }
        finally:
            self._exit(proc.client)

    # -- CRIU baselines -------------------------------------------------------------------------

    def _start_plain(self, mib: int):
        """The workload without gfvm, under tini in its own PID namespace on n1."""
        from gfvm.config import find_tini
        from gfvm.migrate import workload as wl

        statedir = self.statedir()
        statedir.mkdir(parents=True)
        argv = wl.argv(self.binary, statedir, mib=mib, hot_mib=min(HOT_MIB, mib),
                       rate=self.args.rate)
        inner = ["unshare", "--pid", "--fork", "setsid", find_tini() or "tini", "-s", "--", *argv]
        log = statedir / "out.log"
        script = f'exec "$@" </dev/null >>{shlex.quote(str(log))} 2>&1'  # opened in the node
        launcher = self.cluster.popen("n1", ["sh", "-c", script, "sh", *inner],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        client = wl.WorkloadClient(statedir, self.cluster.node("n1").netns_path)
        client.wait_ready(timeout=600, alive=lambda: launcher.poll() is None)
        kids = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        return launcher, int(kids[0]), client

    def run_criu(self, mib: int, method: str) -> dict:
        from gfvm.migrate import criu_baselines

        if method == "criu-pre-copy":
            r = criu_baselines.pre_copy()
            return {"method": method, "supported": False, "reason": r.reason}
        launcher, root, client = self._start_plain(mib)
        work = self.work / f"criu{self.n}"
        try:
            time.sleep(2)
            if method == "criu-stop-and-copy":
                r = criu_baselines.stop_and_copy(self.cluster, "n1", "n2", root, work)
            else:
                r = criu_baselines.lazy_post_copy(self.cluster, "n1", "n2", root, work)
            client.netns = self.cluster.node("n2").netns_path
            t1 = time.monotonic()
            client.verify(timeout=1800)
            check = time.monotonic() - t1
            return {
                "method": method,
                "freeze_seconds": r.freeze_seconds,
                "total_seconds": r.total_seconds,
                "bytes_moved_during_freeze": r.bytes_moved_during_freeze,
                "first_full_check_seconds": check,
                "target": "n2",
                "breakdown": r.steps,
            }
        finally:
            self._exit(client)
            launcher.kill()
            launcher.wait()
            shutil.rmtree(work, ignore_errors=True)

    def _exit(self, client) -> None:
        try:
            client.command("exit", timeout=30)
        except Exception:  # noqa: BLE001 - gone already; the cluster teardown kills the rest
            pass
        time.sleep(1)  # its gfvmd cleans up its paging file


def _fmt_s(v) -> str:
    return "-" if v is None else (f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s")


def _fmt_b(v) -> str:
    return "-" if v is None else f"{v / MiB:.1f} MiB"


def _table(results: dict) -> list[str]:
    lines = [f"{'size':>6}  {'method':<19} {'freeze':>9} {'total':>9} {'net in freeze':>14} "
             f"{'1st full check':>14}"]
    for size, runs in results["runs"].items():
        for r in runs:
            if r.get("supported") is False:
                lines.append(f"{size:>6}  {r['method']:<19} unsupported here: {r['reason']}")
                continue
            if "error" in r:
                lines.append(f"{size:>6}  {r['method']:<19} failed: {r['error']}")
                continue
            lines.append(f"{size:>6}  {r['method']:<19} {_fmt_s(r['freeze_seconds']):>9} "
                         f"{_fmt_s(r['total_seconds']):>9} "
                         f"{_fmt_b(r['bytes_moved_during_freeze']):>14} "
                         f"{_fmt_s(r.get('first_full_check_seconds')):>14}")
    return lines


def _ratios(results: dict) -> dict:
    def freeze(size: str, method: str):
        for r in results["runs"].get(size, []):
            if r["method"] == method and r.get("freeze_seconds"):
                return r["freeze_seconds"]
        return None

    out = {}
    for size in results["runs"]:
        g, s = freeze(size, "gfvm"), freeze(size, "criu-stop-and-copy")
        if g and s:
            out[f"gfvm/stop-and-copy freeze at {size}"] = g / s
        lz = freeze(size, "criu-lazy")
        if g and lz:
            out[f"gfvm/lazy freeze at {size}"] = g / lz
        fl = freeze(size, "flushing")
        if g and fl:
            out[f"gfvm/flushing freeze at {size}"] = g / fl
    sizes = list(results["runs"])
    if len(sizes) >= 2:
        small, big = freeze(sizes[0], "gfvm"), freeze(sizes[-1], "gfvm")
        if small and big:
            out[f"gfvm freeze {sizes[-1]} / {sizes[0]}"] = big / small
    return out


def run(args) -> int:
    """Runs the benchmark (blocking, minutes); prints the table, writes the JSON."""
    if os.geteuid() != 0:
        print("gfvm bench migrate: needs root (namespaces, CRIU, userfaultfd)", file=sys.stderr)
        return 1
    sizes = [int(x) for x in args.sizes.split(",") if x]
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        print(f"gfvm bench migrate: unknown methods {sorted(unknown)}", file=sys.stderr)
        return 2
    bench = _Bench(args)
    results: dict = {
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "settings": {"hot_mib": HOT_MIB, "rate_pages_s": args.rate, "nodes": 3, "replicas": 2},
        "runs": {},
    }
    old_handler = signal.getsignal(signal.SIGINT)
    try:
        for mib in sizes:
            size = f"{mib} MiB" if mib < 1024 else f"{mib // 1024} GiB"
            runs = results["runs"].setdefault(size, [])
            for method in methods:
                say(f"[{size}] {method} ...")
                try:
                    if method in ("gfvm", "flushing"):
                        r = bench.run_gfvm(mib, remote=method == "flushing")
                    else:
                        r = bench.run_criu(mib, method)
                except Exception as exc:  # noqa: BLE001 - recorded; the other runs go on
                    r = {"method": method, "error": str(exc)[:500]}
                runs.append(r)
                if "freeze_seconds" in r:
                    say(f"      frozen {_fmt_s(r['freeze_seconds'])}, total "
                        f"{_fmt_s(r['total_seconds'])}")
    finally:
        signal.signal(signal.SIGINT, old_handler)
        bench.close()
    results["ratios"] = _ratios(results)
    say("")
    for line in _table(results):
        say(line)
    say("")
    for name, value in results["ratios"].items():
        say(f"{name}: {value:.3f}")
    targets = {"1 GiB": 0.1}
    for size, limit in targets.items():
        v = results["ratios"].get(f"gfvm/stop-and-copy freeze at {size}")
        if v is not None:
            say(f"target gfvm freeze <= {limit:g} x stop-and-copy at {size}: "
                f"{'met' if v <= limit else 'NOT met'} ({v:.3f})")
    key = next((k for k in results["ratios"] if k.startswith("gfvm freeze ")), None)
    if key:
        v = results["ratios"][key]
        say(f"target {key} <= 1.5: {'met' if v <= 1.5 else 'NOT met'} ({v:.2f})")
    path = Path(args.json_path or f"bench-results/migrate-{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True))
    say(f"results written to {path}")
    return 0
