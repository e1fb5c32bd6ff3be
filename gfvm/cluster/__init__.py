"""A local multi-node gfvm cluster made of Linux namespaces, for tests, the demo and benchmarks.

Node k of cluster C is:
  - a network namespace `C-nk` (named, in /run/netns) whose `eth0` is one end of a veth pair;
    the other end `C-nk` sits on the bridge `C-br` in the root namespace; address 10.77.0.k/24;
  - a private mount namespace in which the node's own directories are bind-mounted onto the
    paths a real node uses (/etc/gfvm, /var/lib/gfvm, /run/gfvm), and /gfvm is its own mount
    point, so code inside a node cannot tell it from a real one;
  - an anchor process (`sleep infinity`) that keeps both namespaces alive, and the node's gfvmd.

Invariants:
  - Everything `up` makes is named after the cluster (`C-...`) or lives under
    /run/gfvm-cluster/C and /var/lib/gfvm-cluster/C, so `down` finds it again even when `up` or a
    daemon was killed (-9) halfway and state.json is missing or stale.
  - Processes are only ever killed because they live in one of the cluster's network
    namespaces: never by name, never a PID we cannot tie to the cluster.
  - The bridge has no address: test traffic stays between the cluster's own namespaces.

All functions here block (they run `ip`, `nsenter` and wait for processes); call them from a
thread when on trio.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from gfvm.cluster import sysutil
from gfvm.config import DEFAULT_PORT, ClusterConfig, NodePaths, NodeSpec
from gfvm.errors import FeatureMissing, GfvmError, NotFound, UsageError

RUN_ROOT = Path("/run/gfvm-cluster")
LIB_ROOT = Path("/var/lib/gfvm-cluster")
NETNS_DIR = Path("/run/netns")
SUBNET = "10.77.0"
CLUSTER_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
MAX_NODES = 32
NODE_PATHS = NodePaths()  # the default paths, as every node sees them from inside

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


@dataclass
class Node:
    """One node of a namespace cluster, as recorded in state.json."""

    name: str
    index: int
    address: str
    netns: str
    veth: str
    anchor_pid: int = 0
    daemon_pid: int = 0
    impair_pid: int = 0

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


@dataclass
class NodeDirs:
    """Where a node's private directories live on the host."""

    etc: Path
    state: Path
    run: Path

    def host_path(self, inside: Path) -> Path:
        """The host path of `inside` (a path as seen from within the node) for our bind mounts."""
        for inner, outer in (
            (NODE_PATHS.etc, self.etc),
            (NODE_PATHS.state, self.state),
            (NODE_PATHS.run, self.run),
        ):
            if inside == inner or inner in inside.parents:
                return outer / inside.relative_to(inner)
        raise ValueError(f"{inside} is not inside a node's private directories")


class Cluster:
    """A namespace cluster: create with `Cluster.up`, find again with `Cluster.load`."""

    def __init__(self, name: str, nodes: list[Node], replicas: int) -> None:
        self.name = name
        self.nodes = {n.name: n for n in nodes}
        self.replicas = replicas

    # --- identity and paths ------------------------------------------------------------------

    @staticmethod
    def check_name(name: str) -> str:
        if not CLUSTER_NAME_RE.match(name):
            raise UsageError(
                f"cluster name {name!r} must be 1-8 lowercase letters/digits starting with a letter"
            )
        return name

    @staticmethod
    def run_dir(name: str) -> Path:
        return RUN_ROOT / name

    @staticmethod
    def lib_dir(name: str) -> Path:
        return LIB_ROOT / name

    def dirs(self, node: str) -> NodeDirs:
        """The host directories bind-mounted into `node`."""
        self.node(node)
        return NodeDirs(
            etc=self.lib_dir(self.name) / node / "etc",
            state=self.lib_dir(self.name) / node / "state",
            run=self.run_dir(self.name) / node,
        )

    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            known = ", ".join(self.nodes) or "none"
            raise NotFound(f"cluster {self.name} has no node {name!r} (nodes: {known})") from None

    def config(self) -> ClusterConfig:
        """The cluster.toml every node of this cluster gets."""
        return ClusterConfig(
            name=self.name,
            nodes=tuple(NodeSpec(n.name, n.address, DEFAULT_PORT) for n in self.nodes.values()),
            replicas=self.replicas,
        )

    def control_socket(self, node: str) -> Path:
        """Host path of `node`'s gfvmd control socket."""
        return self.dirs(node).host_path(NODE_PATHS.control_socket)

    # --- state file ------------------------------------------------------------------------------

    def _save(self) -> None:
        state = {
            "name": self.name,
            "replicas": self.replicas,
            "nodes": [asdict(n) for n in self.nodes.values()],
        }
        path = self.run_dir(self.name) / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, name: str = "gfvm") -> "Cluster":
        """The running cluster `name`; NotFound if it was never brought up (or is down)."""
        cls.check_name(name)
        path = cls.run_dir(name) / "state.json"
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"no cluster named {name!r} is up (start one with `gfvm cluster up`)") from None
        return cls(state["name"], [Node(**n) for n in state["nodes"]], state["replicas"])

    @staticmethod
    @contextmanager
    def _lock(name: str) -> Iterator[None]:
        """Serialises up/down of one cluster name across processes."""
        RUN_ROOT.mkdir(parents=True, exist_ok=True)
        with open(RUN_ROOT / f"{name}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    # --- up ---------------------------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        nodes: int,
        *,
        name: str = "gfvm",
        replicas: int | None = None,
        start_daemons: bool = True,
        provision: bool = True,
        progress: Progress = _quiet,
        daemon_env: dict[str, str] | None = None,
    ) -> "Cluster":
        """Creates the cluster (blocking, ~1 s for 3 nodes plus daemon start).

        Refuses when a cluster of that name is already up. On any failure everything made so
        far is removed again before the error is raised. `provision=False` leaves the nodes'
        /etc/gfvm empty (for tests of deploy/provision-node); daemons then cannot start.
        """
        cls.check_name(name)
        if not 1 <= nodes <= MAX_NODES:
            raise UsageError(f"--nodes must be between 1 and {MAX_NODES}")
        if replicas is None:
            replicas = min(2, nodes)
        if not 1 <= replicas <= nodes:
            raise UsageError(f"--replicas must be between 1 and the number of nodes ({nodes})")
        if os.geteuid() != 0:
            raise UsageError("the namespace cluster needs root")
        for tool in ("ip", "nsenter", "unshare"):
            if shutil.which(tool) is None:
                raise GfvmError(f"`{tool}` is missing: install iproute2 and util-linux")
        with cls._lock(name):
            if (cls.run_dir(name) / "state.json").exists() or _leftovers(name):
                raise UsageError(
                    f"cluster {name!r} is already up (or left over from a killed run): "
                    f"run `gfvm cluster down{'' if name == 'gfvm' else ' --name ' + name}` first"
                )
            cluster = cls(
                name,
                [
                    Node(
                        name=f"n{i}",
                        index=i,
                        address=f"{SUBNET}.{i}",
                        netns=f"{name}-n{i}",
                        veth=f"{name}-n{i}",
                    )
                    for i in range(1, nodes + 1)
                ],
                replicas,
            )
            try:
                cluster._create(progress, start_daemons, provision, daemon_env or {})
            except BaseException:
                progress("failed: removing what was made")
                _down_locked(name, _quiet)
                raise
            return cluster

    def _create(
        self, progress: Progress, start_daemons: bool, provision: bool, daemon_env: dict[str, str]
    ) -> None:
        self.run_dir(self.name).mkdir(parents=True, exist_ok=True)
        self._save()
        for mount_point in (NODE_PATHS.etc, NODE_PATHS.state, NODE_PATHS.run, NODE_PATHS.mount):
            mount_point.mkdir(parents=True, exist_ok=True)
        bridge = f"{self.name}-br"
        progress(f"bridge {bridge}")
        sysutil.run(["ip", "link", "add", bridge, "type", "bridge"])
        sysutil.run(["ip", "link", "set", bridge, "up"])
        # Provision the nodes the way real ones are: `cluster init` makes the CA and one bundle
        # per node, each node `join`s with its own bundle.
        from gfvm import provision as provisioning

        if provision:
            admin = provisioning.init_cluster(
                self.config().nodes, self.lib_dir(self.name) / "admin", name=self.name,
                replicas=self.replicas,
            )
        for node in self.nodes.values():
            progress(f"node {node.name}: namespaces, {node.address} on {bridge}")
            dirs = self.dirs(node.name)
            for d in (dirs.etc, dirs.state, dirs.run):
                d.mkdir(parents=True, exist_ok=True)
            os.chmod(dirs.etc, 0o700)
            if provision:
                provisioning.join(admin.bundles[node.name], dirs.etc)
            node.anchor_pid = self._start_anchor(dirs)
            self._save()
            sysutil.run(["ip", "netns", "attach", node.netns, str(node.anchor_pid)])
            inner = f"{self.name}-i{node.index}"  # temporary name inside, renamed to eth0
            sysutil.run(["ip", "link", "add", node.veth, "type", "veth", "peer", "name", inner])
            sysutil.run(["ip", "link", "set", inner, "netns", str(node.anchor_pid)])
            sysutil.run(["ip", "link", "set", node.veth, "master", bridge, "up"])
            for argv in (
                ["ip", "link", "set", inner, "name", "eth0"],
                ["ip", "addr", "add", f"{node.address}/24", "dev", "eth0"],
                ["ip", "link", "set", "eth0", "up"],
                ["ip", "link", "set", "lo", "up"],
            ):
                sysutil.run(self.exec_argv(node.name, argv))
        if start_daemons:
            for node in self.nodes.values():
                progress(f"node {node.name}: starting gfvmd")
                self.start_daemon(node.name, env=daemon_env)
            for node in self.nodes.values():
                self.wait_daemon(node.name)
            progress("waiting for the File Manager (metadata leader and leases)")
            self.wait_fm_ready()

    def _start_anchor(self, dirs: NodeDirs) -> int:
        """Starts the process that holds a node's namespaces; returns its host PID once the
        node's directories are mounted inside."""
        script = (
            "set -e; "
            f"mount --bind {dirs.etc} {NODE_PATHS.etc}; "
            f"mount --bind {dirs.state} {NODE_PATHS.state}; "
            f"mount --bind {dirs.run} {NODE_PATHS.run}; "
            "echo ready; exec sleep infinity"
        )
        proc = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # survives the `gfvm cluster up` that started it
        )
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != b"ready":
            err = proc.stderr.read().decode().strip()  # type: ignore[union-attr]
            proc.kill()
            proc.wait()
            raise GfvmError(f"could not create a node's namespaces: {err or 'anchor exited'}")
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
        return proc.pid

    # --- running things inside nodes ---------------------------------------------------------

    def _check_anchor(self, node: Node) -> None:
        netns_id = sysutil.ns_inode(node.netns_path)
        if netns_id is None or sysutil.ns_inode(f"/proc/{node.anchor_pid}/ns/net") != netns_id:
            raise GfvmError(
                f"node {node.name} of cluster {self.name} is broken (its namespace holder is gone): "
                "run `gfvm cluster down` and up again"
            )

    def exec_argv(self, node: str, argv: list[str]) -> list[str]:
        """argv that runs `argv` inside `node` (its network and mount namespaces)."""
        n = self.node(node)
        self._check_anchor(n)
        return ["nsenter", "-t", str(n.anchor_pid), "-n", "-m", "--", *argv]

    def run(self, node: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run of `argv` inside `node` (blocking)."""
        return subprocess.run(self.exec_argv(node, argv), **kwargs)

    def popen(self, node: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """subprocess.Popen of `argv` inside `node`. The caller owns (and must end) the process."""
        return subprocess.Popen(self.exec_argv(node, argv), **kwargs)

    # --- daemons -------------------------------------------------------------------------------

    def daemon_log(self, node: str) -> Path:
        return self.dirs(node).run / "gfvmd.log"

    def start_daemon(self, node: str, env: dict[str, str] | None = None) -> int:
        """Starts `node`'s gfvmd (if not running) and returns its PID without waiting for it."""
        n = self.node(node)
        if n.daemon_pid and sysutil.pid_alive(n.daemon_pid):
            return n.daemon_pid
        log = open(self.daemon_log(node), "ab")
        try:
            proc = self._start_module(node, "gfvm.daemon", [], stdout=log, env=env)
        finally:
            log.close()
        # nsenter execs the command in the same process, so this PID is gfvmd's own.
        n.daemon_pid = proc.pid
        self._save()
        return proc.pid

    def _start_module(self, node: str, module: str, args: list[str], *, stdout, env=None) -> subprocess.Popen:
        """Starts `python -m module args` inside `node`, detached from our session.

        It runs the same gfvm code as its caller (an installed package or a checkout), from "/"
        and with -P, so that no directory called gfvm (e.g. /gfvm) can shadow the package.
        """
        code_root = str(Path(__file__).resolve().parents[2])
        pythonpath = os.pathsep.join(filter(None, [code_root, os.environ.get("PYTHONPATH")]))
        return subprocess.Popen(
            self.exec_argv(node, [sys.executable, "-P", "-m", module, *args]),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is subprocess.PIPE else stdout,
            cwd="/",
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})},
        )

    def wait_daemon(self, node: str, timeout: float = 30.0) -> dict:
        """Waits until `node`'s gfvmd answers a ping; returns the answer (blocking)."""
        from gfvm import control

        n = self.node(node)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return control.call(self.control_socket(node), "ping", timeout=5)
            except GfvmError as exc:
                last = exc
            if n.daemon_pid and not sysutil.pid_alive(n.daemon_pid):
                try:
                    os.waitpid(n.daemon_pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                tail = self.daemon_log(node).read_text(errors="replace")[-2000:]
                raise GfvmError(f"gfvmd on {node} exited during start-up:\n{tail}")
            if time.monotonic() > deadline:
                raise GfvmError(f"gfvmd on {node} did not answer within {timeout:.0f} s: {last}")
            time.sleep(0.05)

    def wait_fm_ready(self, nodes: list[str] | None = None, timeout: float = 60.0) -> None:
        """Waits until every node in `nodes` (default: all) sees every node alive and holds a
        File Manager lease, i.e. /gfvm accepts writes everywhere (blocking)."""
        from gfvm import control

        names = nodes or list(self.nodes)
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending:
            for node in sorted(pending):
                try:
                    st = control.call(self.control_socket(node), "fm.status", timeout=5)
                except GfvmError:
                    continue
                if st.get("lease") and all(n["alive"] for n in st["nodes"].values()):
                    pending.discard(node)
            if pending and time.monotonic() > deadline:
                raise GfvmError(
                    f"the File Manager on {', '.join(sorted(pending))} was not ready after "
                    f"{timeout:.0f} s (see {self.daemon_log(sorted(pending)[0])})"
                )
            if pending:
                time.sleep(0.1)

    def stop_daemon(self, node: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Sends `sig` to `node`'s gfvmd and waits for it to exit (SIGKILL after `timeout`)."""
        n = self.node(node)
        if not n.daemon_pid:
            return
        sysutil.kill_pids([n.daemon_pid], sig)
        if sysutil.wait_gone([n.daemon_pid], timeout):
            sysutil.kill_pids([n.daemon_pid], signal.SIGKILL)
            sysutil.wait_gone([n.daemon_pid], 5)
        n.daemon_pid = 0
        self._save()

    def daemon_alive(self, node: str) -> bool:
        n = self.node(node)
        return bool(n.daemon_pid) and sysutil.pid_alive(n.daemon_pid)

    # --- fault injection ------------------------------------------------------------------------

    def link(self, node: str, up: bool) -> None:
        """Cuts (`up=False`) or restores `node`'s only link to the others."""
        sysutil.run(["ip", "link", "set", self.node(node).veth, "up" if up else "down"])

    def netem(self, node: str, spec: str | None) -> None:
        """Applies `tc netem` with `spec` (e.g. "delay 100ms 50ms loss 10%") to both directions
        of `node`'s link; None removes it."""
        n = self.node(node)
        for argv in (["tc"], self.exec_argv(node, ["tc"])):
            dev = n.veth if len(argv) == 1 else "eth0"
            sysutil.run([*argv, "qdisc", "del", "dev", dev, "root"], check=False)
            if spec:
                proc = sysutil.run([*argv, "qdisc", "add", "dev", dev, "root", "netem", *spec.split()],
                                   check=False)
                if "qdisc kind is unknown" in proc.stderr:
                    raise FeatureMissing("this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM)")
                if proc.returncode != 0:
                    raise sysutil.CommandFailed(f"tc netem {spec}: {proc.stderr.strip()}")

    def impair(
        self, node: str, *, delay_ms: float = 0, jitter_ms: float = 0, loss_pct: float = 0,
        seed: int | None = None,
    ) -> None:
        """Delays (± jitter, which also reorders) and drops `node`'s outgoing packets to the other
        nodes, like netem would (see gfvm.cluster.impair). All zero removes the impairment."""
        from gfvm.cluster.impair import divert_rule

        n = self.node(node)
        if n.impair_pid:
            sysutil.kill_pids([n.impair_pid], signal.SIGTERM)
            sysutil.wait_gone([n.impair_pid], 5)
            n.impair_pid = 0
        rule = divert_rule(0, f"{SUBNET}.0/24")
        sysutil.run(self.exec_argv(node, ["iptables", "-t", "mangle", "-D", *rule]), check=False)
        self._save()
        if not (delay_ms or jitter_ms or loss_pct):
            return
        if shutil.which("iptables") is None:
            raise FeatureMissing("`iptables` is missing: apt-get install iptables")
        args = ["--delay", str(delay_ms), "--jitter", str(jitter_ms), "--loss", str(loss_pct)]
        if seed is not None:
            args += ["--seed", str(seed)]
        proc = self._start_module(node, "gfvm.cluster.impair", args, stdout=subprocess.PIPE)
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != b"ready":
            proc.kill()
            rest = proc.communicate()[0].decode(errors="replace")
            raise GfvmError(f"packet impairer on {node} did not start: {line.decode()}{rest}")
        proc.stdout.close()  # type: ignore[union-attr]
        n.impair_pid = proc.pid
        self._save()
        sysutil.run(self.exec_argv(node, ["iptables", "-t", "mangle", "-A", *rule]))

    def partition(self, a: str, b: str, cut: bool = True) -> None:
        """Drops all traffic between nodes `a` and `b` only (`cut=False` heals it)."""
        for src, dst in ((a, b), (b, a)):
            argv = self.exec_argv(src, ["ip", "route"])
            dst_addr = f"{self.node(dst).address}/32"
            if cut:
                sysutil.run([*argv, "replace", "blackhole", dst_addr])
            else:
                sysutil.run([*argv, "del", "blackhole", dst_addr], check=False)

    # --- status and down --------------------------------------------------------------------------

    def status(self) -> dict:
        """A JSON-able picture of the cluster: nodes, addresses, namespaces and daemons."""
        from gfvm import control

        nodes = []
        for n in self.nodes.values():
            netns_ok = sysutil.ns_inode(n.netns_path) is not None
            entry = {
                "name": n.name,
                "address": n.address,
                "netns": n.netns if netns_ok else None,
                "anchor_pid": n.anchor_pid if sysutil.pid_alive(n.anchor_pid) else None,
                "daemon_pid": n.daemon_pid if self.daemon_alive(n.name) else None,
                "daemon": "down",
            }
            if entry["daemon_pid"]:
                try:
                    control.call(self.control_socket(n.name), "ping", timeout=2)
                    entry["daemon"] = "up"
                except GfvmError:
                    entry["daemon"] = "not answering"
            nodes.append(entry)
        return {"name": self.name, "replicas": self.replicas, "bridge": f"{self.name}-br", "nodes": nodes}

    @classmethod
    def down(cls, name: str = "gfvm", progress: Progress = _quiet) -> list[str]:
        """Removes every namespace, link, mount, process and directory of cluster `name`,
        including leftovers of a killed `up`. Idempotent. Returns what it removed."""
        cls.check_name(name)
        with cls._lock(name):
            removed = _down_locked(name, progress)
            (RUN_ROOT / f"{name}.lock").unlink(missing_ok=True)
            return removed


def _leftovers(name: str) -> list[str]:
    """Names of kernel objects that belong to cluster `name` (netns, links)."""
    found = []
    if NETNS_DIR.is_dir():
        found += [f"netns {p.name}" for p in NETNS_DIR.iterdir() if _ours(name, p.name)]
    links = sysutil.run(["ip", "-o", "link", "show"], check=False).stdout
    for line in links.splitlines():
        ifname = line.split(":", 2)[1].strip().split("@")[0]
        if _ours(name, ifname) or ifname == f"{name}-br":
            found.append(f"link {ifname}")
    return found


def _ours(cluster: str, objname: str) -> bool:
    return re.fullmatch(rf"{re.escape(cluster)}-n\d+", objname) is not None


def _down_locked(name: str, progress: Progress) -> list[str]:
    removed: list[str] = []
    state_path = Cluster.run_dir(name) / "state.json"
    daemon_pids: set[int] = set()
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text())
            daemon_pids = {n.get("daemon_pid", 0) for n in state.get("nodes", [])} - {0}
        except (ValueError, OSError):
            pass  # a half-written state file: discovery below still finds everything
    netns_names = sorted(
        p.name for p in NETNS_DIR.glob(f"{name}-n*") if _ours(name, p.name)
    ) if NETNS_DIR.is_dir() else []
    for netns in netns_names:
        netns_id = sysutil.ns_inode(NETNS_DIR / netns)
        pids = sysutil.pids_in_netns(netns_id) if netns_id else []
        if pids:
            # Let daemons shut down cleanly first (they unmount /gfvm), then abort FUSE mounts so
            # nothing stays blocked, then kill whatever is left in the namespace.
            daemons = [p for p in pids if p in daemon_pids]
            sysutil.kill_pids(daemons, signal.SIGTERM)
            sysutil.wait_gone(daemons, 5)
            for pid in pids:
                for conn in sysutil.fuse_connections_of_node(pid, str(NODE_PATHS.mount)):
                    sysutil.abort_fuse_connection(conn)
            pids = sysutil.pids_in_netns(netns_id)
            sysutil.kill_pids(pids)
            survivors = sysutil.wait_gone(pids, 10)
            if survivors:
                raise GfvmError(f"processes {survivors} in {netns} did not exit after SIGKILL")
            removed.append(f"{len(pids)} processes in {netns}")
        sysutil.run(["ip", "netns", "del", netns], check=False)
        progress(f"removed netns {netns}")
        removed.append(f"netns {netns}")
    for obj in _leftovers(name):
        kind, objname = obj.split(" ", 1)
        if kind == "link":
            sysutil.run(["ip", "link", "del", objname], check=False)
            progress(f"removed link {objname}")
            removed.append(obj)
        elif kind == "netns":
            sysutil.run(["ip", "netns", "del", objname], check=False)
            removed.append(obj)
    removed += _remove_cgroups(name)
    for d in (Cluster.run_dir(name), Cluster.lib_dir(name)):
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(f"dir {d}")
    still = _leftovers(name)
    if still:
        raise GfvmError(f"could not remove: {', '.join(still)}")
    return removed


def cgroup_prefix(cluster: str) -> str:
    """Prefix of the cgroup names gfvmd uses for managed processes of this cluster's nodes."""
    return f"{cluster}-"


def _remove_cgroups(cluster: str) -> list[str]:
    """Removes (empty) cgroups gfvmd made for this cluster's nodes, in every hierarchy."""
    from gfvm.config import cgroup_roots

    removed = []
    for root in cgroup_roots():
        parent = root / "gfvm"
        if not parent.is_dir():
            continue
        for node_dir in parent.glob(f"{cgroup_prefix(cluster)}n*"):
            for d in sorted(node_dir.rglob("*"), key=lambda p: -len(p.parts)):
                if d.is_dir():
                    try:
                        d.rmdir()
                    except OSError:
                        pass
            try:
                node_dir.rmdir()
                removed.append(f"cgroup {node_dir}")
            except OSError:
                pass
    return removed
