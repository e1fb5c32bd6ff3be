"""`gfvm status`, `gfvm fm where`, `gfvm fm promote`: the File Manager seen from the command line.

Each command asks this node's gfvmd over its control socket (gfvm.control) and prints a short
human report, or JSON with --json.
"""

from __future__ import annotations

from gfvm import control
from gfvm.config import NodePaths
from gfvm.errors import NotFound, UsageError


STATUS_HELP = ("Shows every node of the cluster as this node's gfvmd sees it: alive or not "
               "(heartbeats), which one leads the metadata, and the disk space its File Manager uses.")


def add_commands(sub) -> None:
    existing = sub.choices.get("status")
    if existing is None:
        st = sub.add_parser("status", help="the cluster as this node sees it: nodes, alive/dead, disk use",
                            description=STATUS_HELP)
        st.add_argument("--json", action="store_true", help="machine-readable output")
        st.set_defaults(func=_status)
    else:
        # `gfvm status ID` (the pager's: one managed process) already exists: without an ID,
        # the same command shows the cluster (DESIGN.md lists one `status` command)
        _share_status(existing)

    p = sub.add_parser("fm", help="File Manager: where a file's copies are, move its master",
                       description="The File Manager keeps every file of /gfvm on several nodes.")
    fsub = p.add_subparsers(dest="fm_command", metavar="ACTION")
    fsub.required = True
    fst = fsub.add_parser("status", help="the cluster as this node sees it (as `gfvm status`)",
                          description=STATUS_HELP)
    fst.add_argument("--json", action="store_true", help="machine-readable output")
    fst.set_defaults(func=_status)
    w = fsub.add_parser("where", help="master, replicas, epoch and in-sync state of a file",
                        description="Shows which node is PATH's master, which nodes hold copies "
                        "and whether each copy is in sync (PATH under /gfvm, or relative to it).")
    w.add_argument("path", metavar="PATH")
    w.add_argument("--json", action="store_true", help="machine-readable output")
    w.set_defaults(func=_where)
    pr = fsub.add_parser(
        "promote", help="make NODE the master of a file (epoch + 1, by a majority)",
        description="Moves PATH's mastership to NODE. The current master flushes every copy first, "
        "so nothing acknowledged is lost. A NODE whose copy is not in sync is refused; --force "
        "promotes it anyway and keeps the newer copies aside as split-brain copies (never merged).")
    pr.add_argument("path", metavar="PATH")
    pr.add_argument("node", metavar="NODE")
    pr.add_argument("--force", action="store_true",
                    help="promote even a stale copy (loses what it missed; the others are kept aside)")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    pr.set_defaults(func=_promote)


def _share_status(parser) -> None:
    """Makes the positional ID of an existing `status` parser optional; no ID: cluster status."""
    for action in parser._actions:
        if action.dest == "id" and not action.option_strings:
            action.nargs = "?"
            action.default = None
    other = parser.get_default("func")
    parser.set_defaults(func=lambda args: _status(args) if getattr(args, "id", None) is None
                        else other(args))
    parser.description = (parser.description or "") + " Without ID: " + STATUS_HELP


def _call(op: str, args: dict | None = None, on_progress=None) -> dict:
    try:
        return control.call(NodePaths.from_env().control_socket, op, args or {}, on_progress=on_progress)
    except control.RemoteError as exc:
        if exc.kind in ("usage", "not-found"):  # the request itself was wrong: exit code 2
            raise (UsageError if exc.kind == "usage" else NotFound)(str(exc)) from None
        raise


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _status(args) -> int:
    st = _call("fm.status")
    if args.json:
        from gfvm.cli import print_json

        print_json(st)
        return 0
    print(f"node {st['node']}: metadata leader {st['leader'] or '(none)'}, term {st['term']}, "
          f"version {st['version']}, lease {'yes' if st['lease'] else 'NO'}; "
          f"{st['files']} files, {st['mastered_here']} mastered here")
    print(f"{'NODE':<10} {'STATE':<6} {'LEADER':<6} {'USED':>10} {'FREE':>10}  LAST HEARD")
    dead = 0
    for name, n in sorted(st["nodes"].items()):
        dead += not n["alive"]
        print(f"{name:<10} {'alive' if n['alive'] else 'DEAD':<6} {'*' if n['leader'] else '':<6} "
              f"{_size(n['used']):>10} {_size(n['free']):>10}  {n['silent_for']:.1f} s ago")
    return 1 if dead else 0


def _print_where(w: dict) -> None:
    print(f"{w['path']}: master {w['master']}, epoch {w['epoch']}, R={w['replicas']}")
    for name, m in w["members"].items():
        role = "master" if name == w["master"] else "replica"
        print(f"  {name:<10} {role:<8} {m['state']:<9} {'alive' if m['alive'] else 'DEAD'}")
    if w["split_brain"]:
        print(f"  split brain: diverged copies kept aside on {', '.join(w['split_brain'])} (not merged)")


def _where(args) -> int:
    w = _call("fm.where", {"path": args.path})
    if args.json:
        from gfvm.cli import print_json

        print_json(w)
    else:
        _print_where(w)
    return 0


def _promote(args) -> int:
    w = _call("fm.promote", {"path": args.path, "node": args.node, "force": args.force},
              on_progress=None if args.json else (lambda msg: print(f"  {msg}", flush=True)))
    if args.json:
        from gfvm.cli import print_json

        print_json(w)
    else:
        _print_where(w)
    return 0
