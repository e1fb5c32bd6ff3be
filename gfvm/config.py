"""Where a node keeps things, and the cluster configuration (`/etc/gfvm/cluster.toml`).

A node is described by four directories. On a real node they are the defaults below; in the
namespace test cluster each node has a private mount namespace in which its own directories are
bind-mounted onto the same default paths, so code never needs to know which case it is in.
Environment variables override them for unit tests that run a daemon without a cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from gfvm.errors import ConfigError

DEFAULT_PORT = 7077
DEFAULT_REPLICAS = 2
NODE_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


@dataclass(frozen=True)
class NodePaths:
    """The directories of one node."""

    etc: Path = Path("/etc/gfvm")  # cluster.toml, node.toml, tls/ (keys 0600)
    state: Path = Path("/var/lib/gfvm")  # File Manager store; survives reboots
    run: Path = Path("/run/gfvm")  # control socket, pid file; gone at reboot
    mount: Path = Path("/gfvm")  # the File Manager's FUSE mount

    @classmethod
    def from_env(cls) -> "NodePaths":
        """Defaults, overridden by GFVM_ETC / GFVM_STATE / GFVM_RUN / GFVM_MOUNT when set."""
        d = cls()
        return cls(
            etc=Path(os.environ.get("GFVM_ETC", d.etc)),
            state=Path(os.environ.get("GFVM_STATE", d.state)),
            run=Path(os.environ.get("GFVM_RUN", d.run)),
            mount=Path(os.environ.get("GFVM_MOUNT", d.mount)),
        )

    @property
    def control_socket(self) -> Path:
        return self.run / "gfvmd.sock"

    @property
    def pid_file(self) -> Path:
        return self.run / "gfvmd.pid"

    @property
    def cluster_toml(self) -> Path:
        return self.etc / "cluster.toml"

    @property
    def node_toml(self) -> Path:
        return self.etc / "node.toml"

    @property
    def tls_dir(self) -> Path:
        return self.etc / "tls"


@dataclass(frozen=True)
class NodeSpec:
    """One member of the cluster as the configuration lists it."""

    name: str
    address: str
    port: int = DEFAULT_PORT


@dataclass(frozen=True)
class ClusterConfig:
    """The cluster as `/etc/gfvm/cluster.toml` describes it; identical on every node."""

    name: str
    nodes: tuple[NodeSpec, ...]
    replicas: int = DEFAULT_REPLICAS
    # Free-form per-component sections ([fm], [pager], ...), validated by their owners.
    sections: dict = field(default_factory=dict, compare=False)

    def node(self, name: str) -> NodeSpec:
        """The node called `name`; raises ConfigError naming the known nodes otherwise."""
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes)
        raise ConfigError(f"unknown node {name!r} (this cluster has: {known})")

    @classmethod
    def parse(cls, text: str, source: str = "cluster.toml") -> "ClusterConfig":
        """Parses and validates TOML text; every problem is a ConfigError naming `source`."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        cluster = data.get("cluster", {})
        if not isinstance(cluster, dict):
            raise ConfigError(f"{source}: [cluster] must be a table")
        name = cluster.get("name", "gfvm")
        if not isinstance(name, str) or not NODE_NAME_RE.match(name):
            raise ConfigError(f"{source}: cluster.name {name!r} must match {NODE_NAME_RE.pattern}")
        raw_nodes = data.get("node", [])
        if not isinstance(raw_nodes, list) or not raw_nodes:
            raise ConfigError(f"{source}: at least one [[node]] entry is required")
        nodes = []
        for i, raw in enumerate(raw_nodes):
            if not isinstance(raw, dict):
                raise ConfigError(f"{source}: [[node]] #{i + 1} must be a table")
            unknown = set(raw) - {"name", "address", "port"}
            if unknown:
                raise ConfigError(f"{source}: [[node]] #{i + 1}: unknown keys {sorted(unknown)}")
            nname, addr, port = raw.get("name"), raw.get("address"), raw.get("port", DEFAULT_PORT)
            if not isinstance(nname, str) or not NODE_NAME_RE.match(nname):
                raise ConfigError(
                    f"{source}: [[node]] #{i + 1}: name {nname!r} must match {NODE_NAME_RE.pattern}"
                )
            if not isinstance(addr, str) or not addr or any(c.isspace() for c in addr):
                raise ConfigError(f"{source}: node {nname}: address {addr!r} is not an address")
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ConfigError(f"{source}: node {nname}: port {port!r} is not a TCP port")
            nodes.append(NodeSpec(nname, addr, port))
        names = [n.name for n in nodes]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ConfigError(f"{source}: duplicate node names: {', '.join(dups)}")
        endpoints = [(n.address, n.port) for n in nodes]
        dup_ep = sorted({f"{a}:{p}" for a, p in endpoints if endpoints.count((a, p)) > 1})
        if dup_ep:
            raise ConfigError(f"{source}: several nodes share the endpoint {', '.join(dup_ep)}")
        replicas = cluster.get("replicas", DEFAULT_REPLICAS)
        if not isinstance(replicas, int) or not 1 <= replicas <= len(nodes):
            raise ConfigError(
                f"{source}: cluster.replicas {replicas!r} must be between 1 and {len(nodes)}"
            )
        sections = {k: v for k, v in data.items() if k not in ("cluster", "node")}
        return cls(name=name, nodes=tuple(nodes), replicas=replicas, sections=sections)

    @classmethod
    def load(cls, path: Path) -> "ClusterConfig":
        """Reads and validates `path` (blocking file read)."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(
                f"{path} does not exist: create it with `gfvm cluster init` "
                "(or `gfvm cluster up` for a local test cluster)"
            ) from None
        return cls.parse(text, str(path))

    def to_toml(self) -> str:
        """The configuration as TOML text that `parse` reads back to an equal object."""
        lines = ["[cluster]", f'name = "{self.name}"', f"replicas = {self.replicas}", ""]
        for n in self.nodes:
            lines += ["[[node]]", f'name = "{n.name}"', f'address = "{n.address}"', f"port = {n.port}", ""]
        for section, values in self.sections.items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} as TOML")


def this_node_name(paths: NodePaths) -> str:
    """The name of the node we run on, from `<etc>/node.toml` (`name = "n1"`)."""
    try:
        data = tomllib.loads(paths.node_toml.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{paths.node_toml} does not exist: this machine has not joined a cluster "
            "(see `gfvm node join`)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{paths.node_toml}: not valid TOML: {exc}") from None
    name = data.get("name")
    if not isinstance(name, str) or not NODE_NAME_RE.match(name):
        raise ConfigError(f"{paths.node_toml}: name {name!r} must match {NODE_NAME_RE.pattern}")
    return name


# --- external programs -----------------------------------------------------------------------

#: where deploy/install puts the CRIU it builds when the system's is missing or too old
GFVM_PREFIX = Path(os.environ.get("GFVM_PREFIX", "/opt/gfvm"))
BUILT_CRIU = GFVM_PREFIX / "criu" / "sbin" / "criu"


def find_criu() -> str | None:
    """The criu binary to use: $GFVM_CRIU, else the one deploy/install built, else PATH's."""
    env = os.environ.get("GFVM_CRIU")
    if env:
        return env
    if os.access(BUILT_CRIU, os.X_OK):
        return str(BUILT_CRIU)
    return shutil.which("criu")


def find_tini() -> str | None:
    """tini, the minimal init each managed process tree runs under (Debian package `tini`)."""
    return os.environ.get("GFVM_TINI") or shutil.which("tini") or shutil.which("tini-static")


# --- cgroups ----------------------------------------------------------------------------------


def cgroup_roots() -> list[Path]:
    """Mount points of the cgroup hierarchies gfvm can freeze with: the cgroup v2 hierarchy
    (`cgroup.freeze`; on hybrid systems often /sys/fs/cgroup/unified) and the v1 `freezer`."""
    roots = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _dev, mount_point, fstype, options, *_ = line.split()
        if fstype == "cgroup2" or (fstype == "cgroup" and "freezer" in options.split(",")):
            roots.append(Path(mount_point))
    return roots


def cgroup_node_group(cluster_name: str, node_name: str) -> str:
    """Name of the cgroup (under <root>/gfvm/) holding a node's managed processes. Includes the
    cluster name so namespace nodes on one machine never share one."""
    return f"{cluster_name}-{node_name}"
