"""`gfvm demo`: the whole story on a local 3-node namespace cluster.

Brings the cluster up, runs a self-checking workload under gfvm on n1 (256 MiB whose content is
a function of a step counter, with a 32 MiB hot set rewritten all the time), migrates it with
`--to auto`, prints the report, shows the workload checking its whole memory and making progress
on the target, and tears everything down, also when a step fails.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from gfvm.cluster import Cluster
from gfvm.errors import GfvmError

STEPS = 5


def add_commands(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="show a migration on a local 3-node namespace cluster",
        description="Bring up 3 namespace nodes, run a workload under gfvm on n1, migrate it "
        "with --to auto, print the report, show it still running correctly on the target, "
        "tear everything down.",
    )
    p.add_argument("--name", default="gfvmdemo", help="cluster name (default gfvmdemo)")
    p.add_argument("--mib", type=int, default=256, help="workload memory in MiB (default 256)")
    p.add_argument("--keep", action="store_true", help="leave the cluster up afterwards")
    p.set_defaults(func=_main)


def say(msg: str) -> None:
    print(msg, flush=True)


def _main(args) -> int:
    Cluster.down(args.name)  # a previous demo that was interrupted
    started = time.monotonic()
    say(f"[1/{STEPS}] bringing up 3 namespace nodes (cluster {args.name})")
    cluster = Cluster.up(3, name=args.name, progress=lambda m: say(f"      {m}"))
    work = Path(tempfile.mkdtemp(prefix="gfvm-demo-"))
    try:
        from gfvm.migrate import harness

        harness.wait_ready(cluster)
        for node in cluster.status()["nodes"]:
            say(f"      {node['name']} {node['address']}: gfvmd {node['daemon']}")
        _story(cluster, work, args.mib)
    except GfvmError as exc:
        say(f"demo failed: {exc}")
        return 1
    finally:
        if args.keep:
            say(f"cluster {args.name} left up: `gfvm cluster down --name {args.name}` removes it")
        else:
            say("tearing down")
            Cluster.down(args.name)
            shutil.rmtree(work, ignore_errors=True)
    say(f"demo finished in {time.monotonic() - started:.1f} s")
    return 0


def _story(cluster: Cluster, work: Path, mib: int) -> None:
    from gfvm.migrate import harness
    from gfvm.migrate import workload as wl
    from gfvm.migrate.cli import format_report

    say(f"[2/{STEPS}] running a workload under gfvm on n1: {mib} MiB, a 32 MiB hot set "
        "rewritten all the time, its memory a function of its step counter")
    binary = wl.build(work)
    proc = harness.run_workload(cluster, "n1", binary, work / "state", mib=mib,
                                hot_mib=min(32, mib), rate=20000)
    time.sleep(2)  # let the pager page the memory out in the background
    s = proc.client.status()
    say(f"      {proc.id} runs on n1 (pid {s.pid} in its own PID namespace), {s.steps} steps")
    say(f"      its own check of all {mib} MiB: ok at step {proc.client.verify()}")

    say(f"[3/{STEPS}] gfvm migrate {proc.id} --to auto")
    report = harness.migrate(cluster, proc, "auto", progress=lambda m: say(f"      {m}"))

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
