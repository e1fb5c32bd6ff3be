"""`gfvm run`, `gfvm adopt`, `gfvm ls`, `gfvm status`, `gfvm flush`: managed processes on this node.

Each command is one control request to this node's gfvmd (gfvm/pager/service.py does the work).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from gfvm import control
from gfvm.config import NodePaths
from gfvm.errors import UsageError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'512M', '1G', '1.5GiB', '4096' -> bytes (powers of 1024). UsageError when unreadable."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"cannot read {text!r} as a size (examples: 512M, 2G, 1048576)")
    number, unit = float(m.group(1)), m.group(2).lower()
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    return int(number * scale)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def add_commands(sub) -> None:
    run = sub.add_parser(
        "run",
        help="start a command as a managed process on this node",
        description="Start CMD as a managed process: its own PID namespace (tini as init), its own "
        "cgroup, and its anonymous memory tracked by the pager and paged out to its paging file "
        "in the background. Prints the gfvm id. CMD's stdout and stderr go to a log file under "
        "the node's run directory (shown by `gfvm status ID`).",
    )
    run.add_argument("--name", help="a label for `gfvm ls` (default: the command's name)")
    run.add_argument(
        "--mem-limit",
        metavar="SIZE",
        help="keep the process's resident memory under SIZE (e.g. 512M) by evicting "
        "clean pages to the paging file",
    )
    run.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    run.set_defaults(func=_run)

    adopt = sub.add_parser(
        "adopt",
        help="manage an already running process",
        description="Take an already running process under management: a userfaultfd is created "
        "inside it by ptrace injection; it stays in its PID namespace. Fails with the cause when "
        "the process cannot be attached (unknown pid, zombie, kernel thread, not permitted, "
        "missing kernel feature).",
    )
    adopt.add_argument("pid", type=int)
    adopt.add_argument("--name")
    adopt.add_argument("--mem-limit", metavar="SIZE")
    adopt.add_argument("--json", action="store_true")
    adopt.set_defaults(func=_adopt)

    ls = sub.add_parser("ls", help="list the managed processes of this node")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_ls)

    st = sub.add_parser("status", help="details of one managed process")
    st.add_argument("id", metavar="ID", help="gfvm id (or name)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)

    fl = sub.add_parser(
        "flush",
        help="page out every dirty page of a managed process now",
        description="Write every page the process dirtied since the last flush to its paging "
        "file and wait until it is durable. The process keeps running, so pages it writes "
        "meanwhile are dirty again afterwards.",
    )
    fl.add_argument("id", metavar="ID")
    fl.add_argument("--json", action="store_true")
    fl.set_defaults(func=_flush)


def _socket():
    return NodePaths.from_env().control_socket


def _mem_limit(args) -> int | None:
    if not args.mem_limit:
        return None
    limit = parse_size(args.mem_limit)
    if limit < 1 << 20:
        raise UsageError("--mem-limit must be at least 1M")
    return limit


def _print(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _run(args) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise UsageError("give the command to run after --, e.g. gfvm run -- python3 job.py")
    result = control.call(
        _socket(),
        "run",
        {
            "cmd": cmd,
            "name": args.name,
            "mem_limit": _mem_limit(args),
            "cwd": os.getcwd(),
            "env": dict(os.environ),
        },
    )
    return _started(args, result)


def _adopt(args) -> int:
    result = control.call(
        _socket(), "adopt", {"pid": args.pid, "name": args.name, "mem_limit": _mem_limit(args)}
    )
    return _started(args, result)


def _started(args, result: dict) -> int:
    if args.json:
        _print(result)
        return 0
    print(result["id"])
    print(
        f"gfvm: {result['id']} ({result['name']}) runs as pid {result['pid']} on node "
        f"{result['node']}; output: {result.get('log') or 'unchanged (adopted)'}",
        file=sys.stderr,
    )
    return 0


def _ls(args) -> int:
    result = control.call(_socket(), "ls")
    procs = result["processes"]
    if args.json:
        _print(procs)
        return 0
    if not procs:
        print("no managed processes on this node")
        return 0
    rows = [("ID", "NAME", "NODE", "PID", "RSS", "MANAGED", "DIRTY", "PAGED OUT", "LAG", "STATE")]
    for p in procs:
        rows.append(
            (
                p["id"],
                p["name"],
                p["node"],
                str(p["pid"]),
                human_bytes(p["rss"]),
                human_bytes(p["managed_bytes"]),
                str(p["dirty_pages"]),
                str(p["pages_paged_out"]),
                _lag(p["flush_lag_s"]),
                p["state"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())
    return 0


def _lag(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}s"


def _status(args) -> int:
    s = control.call(_socket(), "status", {"id": args.id})
    if args.json:
        _print(s)
        return 0
    lines = [
        ("id", s["id"]),
        ("name", s["name"]),
        ("state", s["state"]),
        ("node", s["node"]),
        ("command", " ".join(s["cmd"])),
        (
            "pids (host/inner)",
            ", ".join(f"{a['host_pid']}/{a['asid']}" for a in s["spaces"]) or "-",
        ),
        ("init pid", str(s["init_pid"])),
        ("rss", human_bytes(s["rss"])),
        ("managed", human_bytes(s["managed_bytes"])),
        ("memory limit", human_bytes(s["mem_limit"]) if s["mem_limit"] else "none"),
        ("dirty pages now", str(s["dirty_pages"])),
        (
            "pages paged out",
            f"{s['pages_paged_out']} ({human_bytes(s['bytes_paged_out'])} written)",
        ),
        ("pages in paging file", str(s["pages_in_file"])),
        ("pages evicted", str(s["pages_evicted"])),
        ("flush lag", _lag(s["flush_lag_s"])),
        (
            "faults served",
            f"{s['faults_served']} ({s['pages_faulted_in']} pages from the file, "
            f"{s['pages_zero_filled']} zero-filled)",
        ),
        ("paging file", s["paging_dir"]),
        ("output log", s["log_path"] or "-"),
        ("cgroup", ", ".join(s["cgroup"]) or "-"),
        ("last error", s["last_error"] or "none"),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k.ljust(width)}  {v}")
    return 0


def _flush(args) -> int:
    result = control.call(_socket(), "flush", {"id": args.id})
    if args.json:
        _print(result)
    else:
        print(
            f"{args.id}: {result['pages']} pages ({human_bytes(result['bytes'])}) made durable "
            f"in {result['seconds']:.3f} s"
        )
    return 0
