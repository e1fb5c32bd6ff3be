"""`gfvm migrate <pid|id> --to auto|NODE`: move a managed process to another node.

Asks this node's gfvmd (the source) over its control socket; gfvmd runs the whole sequence with
the target's gfvmd and streams a progress line per step. The report at the end says where the
process went and why, how long it was frozen and where that time went, what was written and
sent while it was frozen, and its new PIDs. `--json` prints the report as JSON instead.
"""

from __future__ import annotations

import argparse
import json
import sys

from gfvm import control
from gfvm.config import NodePaths
from gfvm.errors import NotFound, UsageError


def add_commands(sub) -> None:
    p = sub.add_parser(
        "migrate",
        help="move a managed process to another node (--to auto: a node holding its replica)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("process", metavar="PID|ID", help="host pid, gfvm id or name of the process")
    p.add_argument("--to", default="auto", metavar="auto|NODE",
                   help="target node; auto (default): the least loaded alive node that holds an "
                   "in-sync replica of the process's paging file")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a target without a replica: it then reads the pages over the "
                   "network after the restart (the Flushing method), and the source must stay up")
    p.add_argument("--prefetch", choices=["hot", "all", "none"], default="hot",
                   help="after the restart, fault in ahead of the process its recent hot set "
                   "(default), all its pages, or nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_migrate)


def _migrate(args) -> int:
    target = args.process
    req: dict = {"to": args.to, "allow_remote": args.allow_remote, "prefetch": args.prefetch}
    if target.isdigit():
        req["pid"] = int(target)
    else:
        req["id"] = target

    def progress(item) -> None:
        if not args.json:
            print(f"  {item}", flush=True)

    try:
        report = control.call(NodePaths.from_env().control_socket, "migrate", req,
                              on_progress=progress)
    except control.RemoteError as exc:
        if exc.kind == "usage":
            raise UsageError(str(exc)) from None
        if exc.kind == "not-found":
            raise NotFound(str(exc)) from None
        raise
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        for line in format_report(report):
            print(line)
    return 0


def format_report(r: dict) -> list[str]:
    """The human report of a migration (also used by `gfvm demo`)."""
    ms = lambda s: f"{s * 1000:.0f} ms"  # noqa: E731
    b = r.get("freeze_breakdown_s", {})
    w = r.get("written_during_freeze", {})
    lines = [
        f"{r['id']} ({r.get('name', '')}) moved {r['source']} -> {r['target']}",
        f"  why {r['target']}: {r.get('why', '')}",
        f"  frozen for {ms(r['freeze_s'])}: final flush {ms(b.get('final_flush', 0))}, memory "
        f"release {ms(b.get('memory_release', 0))}, dump {ms(b.get('dump', 0))}, image "
        f"replication {ms(b.get('image_replication', 0))}, handoff {ms(b.get('handoff', 0))}, "
        f"restore {ms(b.get('restore', 0))}, other {ms(b.get('other', 0))}",
        f"  written while frozen: {w.get('pages', 0)} pages ({_size(w.get('bytes', 0))}) of "
        f"memory + {_size(w.get('checkpoint_bytes', 0))} of checkpoint",
        f"  network while frozen: {_size(r.get('network_bytes_during_freeze', 0))} through "
        f"{r['source']}'s link",
    ]
    pre = r.get("preflush")
    if pre:
        lines.append(f"  before the freeze: {len(pre['rounds'])} pre-flush rounds "
                     f"({' -> '.join(map(str, pre['rounds']))} pages) in {pre['seconds']:.2f} s")
    pids = r.get("new_pids") or {}
    if pids:
        lines.append("  new pids on " + r["target"] + ": " +
                     ", ".join(f"{host} (pid {inner} inside)" for inner, host in
                               sorted(pids.items(), key=lambda kv: int(kv[0]))))
    lines.append(f"  total {r.get('total_s', 0):.2f} s")
    return lines


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
