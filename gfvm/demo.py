"""`gfvm demo`: the whole migration story, on a local 3-node namespace cluster or on a real one.

The story (one function, `_story`, for both): a self-checking workload runs under gfvm on a node
(256 MiB whose content is a function of a step counter, with a 32 MiB hot set rewritten all the
time); it is migrated with `--to auto`; the report is printed; the workload checks its whole
memory and keeps making progress on the target.

The two ways to reach the nodes (gfvm/migrate/harness.py):
  - `gfvm demo`: brings up a namespace cluster, drives it from the host, tears it down (also when
    a step fails);
  - `gfvm demo --cluster`: on a node of a configured cluster, through this node's gfvmd only. The
    workload's binary and state directory live under the mount (`/gfvm/demo/...`) because after
    the migration the process runs on another node; it ends the workload and removes that
    directory afterwards, also when a step fails or on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from gfvm.errors import ConfigError, GfvmError, UsageError

STEPS = 5
DEFAULT_NAME = "gfvmdemo"


def add_commands(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="show a migration on a local 3-node namespace cluster (--cluster: on this cluster)",
        description="Run a self-checking workload under gfvm, migrate it with --to auto, print\n"
        "the report and show it still running correctly on the target.\n\n"
        "  gfvm demo            brings up 3 local namespace nodes, runs the workload on n1 and\n"
        "                       tears everything down afterwards (needs no configured cluster)\n"
        "  gfvm demo --cluster  on a node of a real cluster (gfvmd running, e.g. after\n"
        "                       deploy/provision-node or `vagrant up`): runs the workload on this\n"
        "                       node, moves it to another one, then ends it and removes its\n"
        "                       files (under /gfvm/demo); needs gcc",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cluster", action="store_true",
                   help="use the configured cluster this node belongs to instead of a local one")
    p.add_argument("--name", help=f"local cluster name (default {DEFAULT_NAME}; not with --cluster)")
    p.add_argument("--mib", type=int, default=256, help="workload memory in MiB (default 256)")
    p.add_argument("--keep", action="store_true",
                   help="leave the local cluster up afterwards (not with --cluster)")
    p.set_defaults(func=_main)


def say(msg: str) -> None:
    print(msg, flush=True)


def _main(args) -> int:
    if args.mib < 1:
        raise UsageError("--mib must be at least 1")
    if args.cluster:
        if args.name is not None or args.keep:
            raise UsageError("--name and --keep are for the local cluster, not with --cluster")
        return _main_cluster(args)
    return _main_local(args.name or DEFAULT_NAME, args)


def _main_local(name: str, args) -> int:
    from gfvm.cluster import Cluster
    from gfvm.migrate import harness
    from gfvm.migrate import workload as wl

    Cluster.down(name)  # a previous demo that was interrupted
    started = time.monotonic()
    say(f"[1/{STEPS}] bringing up 3 namespace nodes (cluster {name})")
    cluster = Cluster.up(3, name=name, progress=lambda m: say(f"      {m}"))
    work = Path(tempfile.mkdtemp(prefix="gfvm-demo-"))
    try:
        harness.wait_ready(cluster)
        for node in cluster.status()["nodes"]:
            say(f"      {node['name']} {node['address']}: gfvmd {node['daemon']}")
        _story(harness.NamespaceNodes(cluster), "n1", wl.build(work), work / "state", args.mib)
    except GfvmError as exc:
        say(f"demo failed: {exc}")
        return 1
    finally:
        if args.keep:
            say(f"cluster {name} left up: `gfvm cluster down --name {name}` removes it")
        else:
            say("tearing down")
            Cluster.down(name)
            shutil.rmtree(work, ignore_errors=True)
    say(f"demo finished in {time.monotonic() - started:.1f} s")
    return 0


def _main_cluster(args) -> int:
    from gfvm.config import NodePaths
    from gfvm.migrate import harness
    from gfvm.migrate import workload as wl

    started = time.monotonic()
    paths = NodePaths.from_env()
    work = Path(tempfile.mkdtemp(prefix="gfvm-demo-"))
    statedir: Path | None = None
    nodes = None
    try:
        say(f"[1/{STEPS}] checking this node's gfvmd ({paths.control_socket})")
        try:
            nodes = harness.ThisNode(paths)
        except ConfigError as exc:
            raise ConfigError(f"{exc}\n(`gfvm demo` without --cluster shows a migration on a "
                              "local namespace cluster)") from None
        status = nodes.wait_ready()
        for n in nodes.config.nodes:
            v = status["nodes"].get(n.name, {})
            say(f"      {n.name} {n.address}: {'alive' if v.get('alive') else 'not reachable'}"
                f"{', metadata leader' if v.get('leader') else ''}"
                f"{' (this node)' if n.name == nodes.name else ''}")
        if not any(v.get("alive") for name, v in status["nodes"].items() if name != nodes.name):
            raise GfvmError("no other node is alive to migrate to: start gfvmd there "
                            "(`systemctl start gfvmd`) and check `gfvm status`")
        # Every node must see the binary and the state directory at the same paths.
        statedir = paths.mount / "demo" / f"{nodes.name}-{os.getpid()}-{time.time_ns()}"
        statedir.mkdir(parents=True)
        binary = statedir / "gfvm-migrate-workload"
        shutil.copyfile(wl.build(work), binary)
        binary.chmod(0o700)
        _story(nodes, nodes.name, binary, statedir, args.mib)
    except (GfvmError, OSError, KeyboardInterrupt) as exc:
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed: {exc}"
        say(f"demo {what}")
        if nodes is not None:
            for proc in nodes.started:
                left = nodes.end(proc)
                say(f"      ended {proc.id}" if left is None else f"      {left}")
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if statedir is not None:
            shutil.rmtree(statedir, ignore_errors=True)
            try:
                statedir.parent.rmdir()  # /gfvm/demo, unless another demo runs
            except OSError:
                pass
    say(f"demo finished in {time.monotonic() - started:.1f} s")
    return 0


def _story(nodes, first: str, binary: Path, statedir: Path, mib: int) -> None:
    """Steps 2 to 5 on `nodes` (harness.NamespaceNodes or ThisNode): the workload starts on
    `first`. Blocks."""
    from gfvm.migrate.cli import format_report

    say(f"[2/{STEPS}] running a workload under gfvm on {first}: {mib} MiB, a {min(32, mib)} MiB "
        "hot set rewritten all the time, its memory a function of its step counter")
    proc = nodes.run_workload(first, binary, statedir, mib=mib, hot_mib=min(32, mib), rate=20000)
    time.sleep(2)  # let the pager page the memory out in the background
    s = proc.client.status()
    say(f"      {proc.id} runs on {first} (pid {s.pid} in its own PID namespace), {s.steps} steps")
    say(f"      its own check of all {mib} MiB: ok at step {proc.client.verify()}")

    say(f"[3/{STEPS}] gfvm migrate {proc.id} --to auto")
    report = nodes.migrate(proc, "auto", progress=lambda m: say(f"      {m}"))

    say(f"[4/{STEPS}] report")
    for line in format_report(report):
        say(f"      {line}")

    say(f"[5/{STEPS}] the workload on {proc.node}")
    before = proc.client.status().steps
    checked = proc.client.verify()
    say(f"      its own check of all {mib} MiB on {proc.node}: ok at step {checked}")
    time.sleep(2)
    after = proc.client.status()
    say(f"      still running: {after.steps - before} more steps in 2 s, {after.bad} failed checks")
    proc.client.command("exit")
