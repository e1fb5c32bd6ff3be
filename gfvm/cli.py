"""The `gfvm` command line. Each command group lives in its own module and contributes
`add_commands(subparsers)`; this file only assembles them and turns errors into exit codes.

Exit codes: 0 success, 1 the operation failed (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from gfvm import __version__
from gfvm.errors import GfvmError, UsageError

EPILOG = """\
typical use:
  gfvm demo                        the whole story on a local 3-node cluster
  gfvm demo --cluster              the same story on the real cluster this node belongs to
  gfvm doctor                      check this machine has what gfvm needs
  gfvm cluster up --nodes 3        a local 3-node test cluster in network namespaces
  gfvm cluster exec n1 -- CMD      run CMD on node n1 (same /gfvm, same daemon)
  gfvm cluster down                remove everything `cluster up` made
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gfvm",
        description="Migrate running processes between cluster nodes. Each managed process's "
        "memory is backed by a paging file of its own that /gfvm replicates on several nodes, "
        "so a migration freezes the process only for the pages it dirtied since the last "
        "background flush.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gfvm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what gfvm does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from gfvm import bench, demo, doctor
    from gfvm.cluster import cli as cluster_cli
    from gfvm.pager import cli as pager_cli

    bench.add_commands(sub)
    demo.add_commands(sub)
    doctor.add_commands(sub)
    cluster_cli.add_commands(sub)
    pager_cli.add_commands(sub)
    __import__("gfvm.migrate.cli").migrate.cli.add_commands(sub)
    __import__("gfvm.fm.cli").fm.cli.add_commands(sub)
    _add_daemon_command(sub)
    return parser


def _add_daemon_command(sub) -> None:
    p = sub.add_parser(
        "daemon",
        help="run this node's gfvmd in the foreground",
        description="Run gfvmd in the foreground (what the systemd unit and `cluster up` start).",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=lambda args: __import__("gfvm.daemon").daemon.main(["--log-level", args.log_level]))


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="gfvm: %(message)s",
    )
    try:
        rc = args.func(args)
    except UsageError as exc:
        print(f"gfvm {args.command}: {exc}", file=sys.stderr)
        return 2
    except GfvmError as exc:
        print(f"gfvm {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gfvm {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
