"""`gfvm demo`: the whole story on a local 3-node namespace cluster.

Brings the cluster up, runs a workload under gfvm on n1, migrates it with `--to auto`, prints the
report and tears everything down, also when a step fails. Steps whose parts are not built yet are
announced as such instead of being faked.
"""

from __future__ import annotations

import time

from gfvm.cluster import Cluster
from gfvm.errors import GfvmError


def add_commands(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="show a migration on a local 3-node namespace cluster",
        description="Bring up 3 namespace nodes, run a workload under gfvm on n1, migrate it "
        "with --to auto, print the report, tear everything down.",
    )
    p.add_argument("--name", default="gfvmdemo", help="cluster name (default gfvmdemo)")
    p.add_argument("--keep", action="store_true", help="leave the cluster up afterwards")
    p.set_defaults(func=_main)


def say(msg: str) -> None:
    print(msg, flush=True)


def _main(args) -> int:
    Cluster.down(args.name)  # a previous demo that was interrupted
    started = time.monotonic()
    say(f"[1/4] bringing up 3 namespace nodes (cluster {args.name})")
    cluster = Cluster.up(3, name=args.name, progress=lambda m: say(f"      {m}"))
    try:
        for node in cluster.status()["nodes"]:
            say(f"      {node['name']} {node['address']}: gfvmd {node['daemon']}")
        steps = _steps(cluster)
        for i, (title, step) in enumerate(steps, start=2):
            say(f"[{i}/4] {title}")
            step()
    except GfvmError as exc:
        say(f"demo failed: {exc}")
        return 1
    finally:
        if args.keep:
            say(f"cluster {args.name} left up: `gfvm cluster down --name {args.name}` removes it")
        else:
            say("tearing down")
            Cluster.down(args.name)
    say(f"demo finished in {time.monotonic() - started:.1f} s")
    return 0


def _steps(cluster: Cluster):
    def not_yet(what: str):
        return lambda: say(f"      not built yet: {what}")

    return [
        ("running a workload under gfvm on n1", not_yet("the pager (`gfvm run`)")),
        ("migrating it with --to auto", not_yet("migration (`gfvm migrate`)")),
        ("report", not_yet("the migration report")),
    ]
