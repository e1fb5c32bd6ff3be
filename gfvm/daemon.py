"""gfvmd: the per-node daemon (File Manager, pager, migration), one trio process.

Lifetime: one nursery owns every service; each component is an object with
`async def serve(*, task_status)` that registers its control ops before reporting started.
The control socket opens last, so a client that can connect finds every op registered.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from contextlib import suppress

import trio

from gfvm import __version__
from gfvm.config import ClusterConfig, NodePaths, this_node_name
from gfvm.control import ControlServer
from gfvm.errors import ConfigError, GfvmError

log = logging.getLogger("gfvmd")


class Daemon:
    """What every component of gfvmd shares: the node's paths, identity, config and control server."""

    def __init__(self, paths: NodePaths) -> None:
        self.paths = paths
        self.control = ControlServer()
        self.config: ClusterConfig | None = None
        self.node_name = os.uname().nodename
        if paths.cluster_toml.exists():
            self.config = ClusterConfig.load(paths.cluster_toml)
            self.node_name = this_node_name(paths)
            self.config.node(self.node_name)  # our own name must be in the cluster
        self.control.register("ping", self._ping)

    async def _ping(self, args: dict, progress) -> dict:
        return {
            "node": self.node_name,
            "version": __version__,
            "pid": os.getpid(),
            "cluster": self.config.name if self.config else None,
            "ops": self.control.ops,
        }

    def components(self) -> list:
        """The services this daemon runs, in start order."""
        from gfvm.fm.component import FmService
        from gfvm.migrate.service import MigrationService
        from gfvm.pager.service import Pager

        # the File Manager first: the pager writes its paging files through it
        fm = FmService(self)  # sets self.fm
        self.pager = Pager(self)
        if self.config is None:
            return [fm, self.pager]
        return [fm, self.pager, MigrationService(self)]

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.paths.run.mkdir(parents=True, exist_ok=True)
        async with trio.open_nursery() as nursery:
            for component in self.components():
                await nursery.start(component.serve)
            await nursery.start(self.control.serve, self.paths.control_socket)
            # Catch SIGTERM before telling anyone we are ready: a stop request that arrives right
            # after READY must shut down cleanly, not kill us with the default action.
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                self.paths.pid_file.write_text(f"{os.getpid()}\n")
                log.info("gfvmd %s ready on node %s", __version__, self.node_name)
                sd_notify("READY=1")
                task_status.started()
                async for signum in signals:
                    log.info("signal %s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
        with suppress(FileNotFoundError):
            self.paths.pid_file.unlink()


def sd_notify(state: str) -> None:
    """Tells systemd (Type=notify) about our state; does nothing when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as exc:
            log.warning("could not notify systemd: %s", exc)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gfvmd",
        description="gfvm node daemon: File Manager at /gfvm, pager, migration. Runs in the "
        "foreground (systemd's Type=notify-less simple service, or `gfvm cluster up`).",
    )
    parser.add_argument("--log-level", default=os.environ.get("GFVM_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if os.geteuid() != 0:
        print("gfvmd: must run as root (it needs FUSE, userfaultfd, ptrace and CRIU)", file=sys.stderr)
        return 1
    try:
        daemon = Daemon(NodePaths.from_env())
        trio.run(daemon.serve)
    except (ConfigError, GfvmError) as exc:
        print(f"gfvmd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
