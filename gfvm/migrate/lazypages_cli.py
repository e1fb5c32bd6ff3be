"""`python -m gfvm.migrate.lazypages_cli serve|take-over ...`: a lazy-pages server in a process of
its own (tests, fault injection, manual runs). gfvmd embeds LazyPagesServer directly instead.

`serve` spawns a keeper (with --keeper-socket), binds lazy-pages.socket in the work directory and
prints "listening keeper=PID" once CRIU may start; with --root-pidfile it attaches to the restored
root when CRIU has written it. `take-over` resumes from a keeper after a server died and prints
"serving keeper=-". Exit status: 0 when every task exited, 1 on an error (logged), 70 from the
test fault point --exit-on-fault-in.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

from gfvm.errors import GfvmError
from gfvm.migrate.lazypages import LazyPagesServer, log
from gfvm.migrate.pagesource import MultiSource, RegionFileSource
from gfvm.migrate.uffd_keeper import KeeperClient


def _region(text: str) -> RegionFileSource:
    pid, base, path = text.split(":", 2)
    return RegionFileSource(int(pid), int(base, 0), path)


def _attach_when_restored(server: LazyPagesServer, pidfile: Path | None, prefetch: bool) -> None:
    server.restored.wait()
    if pidfile is None:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            text = pidfile.read_text().strip()
            if text:
                server.attach_root(int(text))
                if prefetch:
                    server.prefetch()
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gfvm-lazy-pages",
                                     description="lazy-pages server for criu restore --lazy-pages")
    parser.add_argument("mode", choices=["serve", "take-over"])
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--keeper-socket", type=Path, help="spawn a keeper here (serve) / take over from it")
    parser.add_argument("--region", action="append", default=[], metavar="PID:BASE:FILE",
                        help="page source: the pages of task PID from address BASE are in FILE")
    parser.add_argument("--root-pidfile", type=Path, help="criu restore's --pidfile: attach to that root")
    parser.add_argument("--prefetch", action="store_true", help="push every page in the background")
    parser.add_argument("--engine", choices=["auto", "native", "python"], default="auto")
    parser.add_argument("--exit-on-fault-in", metavar="START:END",
                        help="fault point (tests, python engine): exit as soon as a fault in [START, END) is read")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s lazy-pages: %(message)s")
    source = MultiSource([_region(r) for r in args.region]) if args.region else None
    exit_range = None
    if args.exit_on_fault_in:
        lo, hi = args.exit_on_fault_in.split(":")
        exit_range = (int(lo, 0), int(hi, 0))
    kwargs = dict(page_source=source, exit_on_fault_in=exit_range, engine=args.engine)
    if args.mode == "serve":
        if args.work_dir:
            args.work_dir.mkdir(parents=True, exist_ok=True)
        keeper = KeeperClient.spawn(args.keeper_socket) if args.keeper_socket else None
        server = LazyPagesServer(args.images, args.work_dir, keeper=keeper, **kwargs)
        server.listen()
    else:
        server = LazyPagesServer.take_over(args.keeper_socket, args.images, args.work_dir, **kwargs)
        if args.prefetch:
            server.prefetch()
    keeper_pid = server.keeper.pid if server.keeper is not None and server.keeper.pid else "-"
    print(f"{'listening' if args.mode == 'serve' else 'serving'} keeper={keeper_pid} engine={server.engine}",
          flush=True)
    threading.Thread(target=_attach_when_restored, args=(server, args.root_pidfile, args.prefetch),
                     daemon=True).start()
    try:
        server.run()
    except GfvmError as exc:
        log.error("%s", exc)
        return 1
    finally:
        log.info("statistics: %s", server.statistics())
    if server.keeper is not None:
        server.keeper.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
