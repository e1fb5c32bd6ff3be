"""`gfvm bench ...`: benchmarks users run on their own machines and clusters.

Each benchmark is a module here with `add_arguments(parser)` and `run(args) -> int`; it prints a
table, writes its results as JSON (default under ./bench-results/) and compares against its
baselines *in the same run*, reporting ratios, because absolute numbers on shared machines are
noise. Benchmarks are never timed tests.
"""

from __future__ import annotations

import argparse
import importlib

#: name -> one-line description; the module gfvm.bench.<name> implements it
BENCHMARKS = {
    "fm": "File Manager: replicated writes vs local disk, local reads via FUSE and same-node API",
    "pager": "pager: managed vs unmanaged writes, background page-out, fault service",
    "migrate": "migration freeze time vs CRIU stop-and-copy, lazy post-copy and Flushing",
}


def _module(name: str):
    try:
        return importlib.import_module(f"gfvm.bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"gfvm.bench.{name}":
            return None
        raise


def add_commands(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: " + ", ".join(BENCHMARKS) + ", all",
        description="Benchmarks that print a table, write JSON and compare against their "
        "baselines in the same run. `gfvm bench all` runs every one with its defaults.",
    )
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT")
    bsub.required = True
    for name, help_text in BENCHMARKS.items():
        module = _module(name)
        if module is None:
            continue
        bp = bsub.add_parser(
            name, help=help_text, description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(bp)
        bp.set_defaults(func=module.run)
    allp = bsub.add_parser("all", help="run every benchmark with its defaults, one after another")
    allp.set_defaults(func=_run_all)


def _run_all(args) -> int:
    failed = []
    for name in BENCHMARKS:
        module = _module(name)
        if module is None:
            print(f"== bench {name}: not available in this build")
            continue
        print(f"== bench {name}", flush=True)
        parser = argparse.ArgumentParser(prog=f"gfvm bench {name}")
        module.add_arguments(parser)
        if module.run(parser.parse_args([])) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0
