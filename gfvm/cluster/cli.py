"""`gfvm cluster up|status|exec|down`: the local namespace test cluster."""

from __future__ import annotations

import argparse
import os
import sys

from gfvm.cluster import Cluster
from gfvm.errors import UsageError


def add_commands(sub) -> None:
    p = sub.add_parser(
        "cluster",
        help="set up a real cluster (init), or a local test cluster of namespace nodes "
        "(up, status, exec, down)",
        description="A local gfvm cluster on this machine: each node is a network namespace on "
        "one bridge (10.77.0.1..N) with a private mount namespace (its own /gfvm, /etc/gfvm, "
        "/var/lib/gfvm, /run/gfvm) and its own gfvmd.",
    )
    csub = p.add_subparsers(dest="cluster_command", metavar="ACTION")
    csub.required = True

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--name",
            default=os.environ.get("GFVM_CLUSTER", "gfvm"),
            help="cluster name, used as prefix of its namespaces and links (default: "
            "$GFVM_CLUSTER or gfvm)",
        )

    up = csub.add_parser("up", help="create the nodes and start their daemons")
    common(up)
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--replicas", type=int, help="copies of each file (default 2)")
    up.add_argument("--no-daemons", action="store_true", help="do not start gfvmd on the nodes")
    up.set_defaults(func=_up)

    st = csub.add_parser("status", help="show the nodes and whether their daemons answer")
    common(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)

    ex = csub.add_parser(
        "exec",
        help="run a command inside a node",
        description="Run CMD inside NODE exactly as if on that node: same /gfvm, same daemon "
        "socket, same network. Exit status is CMD's.",
    )
    common(ex)
    ex.add_argument("node", metavar="NODE", help="node name, e.g. n2")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    ex.set_defaults(func=_exec)

    down = csub.add_parser(
        "down", help="remove everything `up` made (also after a crashed or killed run)"
    )
    common(down)
    down.set_defaults(func=_down)

    from gfvm import provision

    provision.add_commands(csub, sub)


def _say(msg: str) -> None:
    print(f"  {msg}", flush=True)


def _up(args) -> int:
    print(f"cluster {args.name}: bringing up {args.nodes} nodes", flush=True)
    cluster = Cluster.up(
        args.nodes,
        name=args.name,
        replicas=args.replicas,
        start_daemons=not args.no_daemons,
        progress=_say,
    )
    _print_status(cluster.status())
    return 0


def _print_status(status: dict) -> None:
    print(f"cluster {status['name']} (bridge {status['bridge']}, R={status['replicas']})")
    print(f"  {'node':<6}{'address':<14}{'netns':<14}{'gfvmd':<18}")
    for n in status["nodes"]:
        daemon = f"{n['daemon']} (pid {n['daemon_pid']})" if n["daemon_pid"] else n["daemon"]
        print(f"  {n['name']:<6}{n['address']:<14}{(n['netns'] or 'MISSING'):<14}{daemon:<18}")


def _status(args) -> int:
    status = Cluster.load(args.name).status()
    if args.json:
        from gfvm.cli import print_json

        print_json(status)
    else:
        _print_status(status)
    return 0


def _exec(args) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise UsageError("missing command: gfvm cluster exec NODE -- CMD ...")
    argv = Cluster.load(args.name).exec_argv(args.node, cmd)
    sys.stdout.flush()
    os.execvp(argv[0], argv)


def _down(args) -> int:
    removed = Cluster.down(args.name, progress=_say)
    print(f"cluster {args.name}: down" + ("" if removed else " (nothing was up)"))
    return 0
