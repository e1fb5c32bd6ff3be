"""Setting up real nodes: `gfvm cluster init` (on the operator's machine) and `gfvm node join`.

`init` writes the cluster configuration, creates the cluster CA and one certificate + key per
node, and packs one bundle per node holding only that node's key. `join` installs a bundle on a
node: <etc>/tls/{ca.crt,node.crt,node.key}, <etc>/cluster.toml, <etc>/node.toml. The namespace test
cluster provisions its nodes through the same two functions.

Layout written by `init` under OUT (default /etc/gfvm):
    cluster.toml            the configuration, identical on every node
    ca/ca.key (0600), ca/ca.crt
    bundles/<node>.bundle (0600)   copy each to its node, then `gfvm node join <file>` there

Blocking (key generation, file I/O).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from gfvm import pki
from gfvm.config import DEFAULT_PORT, DEFAULT_REPLICAS, NODE_NAME_RE, ClusterConfig, NodeSpec
from gfvm.errors import ConfigError, UsageError


@dataclass(frozen=True)
class InitResult:
    config_path: Path
    ca_dir: Path
    bundles: dict[str, Path]


def parse_node_list(text: str) -> tuple[NodeSpec, ...]:
    """Parses `name=address[:port],...` (IPv6 addresses in brackets: `n1=[fd00::1]:7077`)."""
    nodes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, endpoint = item.partition("=")
        if not sep or not name or not endpoint:
            raise UsageError(f"--nodes entry {item!r} is not name=address[:port]")
        if not NODE_NAME_RE.match(name):
            raise UsageError(f"node name {name!r} must match {NODE_NAME_RE.pattern}")
        port = DEFAULT_PORT
        if endpoint.startswith("["):
            address, _, rest = endpoint[1:].partition("]")
            if rest:
                port = _port(rest.removeprefix(":"), item)
        elif endpoint.count(":") == 1:
            address, port_text = endpoint.split(":")
            port = _port(port_text, item)
        else:
            address = endpoint
        try:
            ipaddress.ip_address(address)
        except ValueError:
            if not all(part and part.replace("-", "").isalnum() for part in address.split(".")):
                raise UsageError(f"{address!r} in {item!r} is neither an IP address nor a host name") from None
        nodes.append(NodeSpec(name, address, port))
    if not nodes:
        raise UsageError("--nodes lists no node")
    return tuple(nodes)


def _port(text: str, item: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise UsageError(f"bad port in {item!r}")
    return port


def init_cluster(
    nodes: tuple[NodeSpec, ...],
    out_dir: Path,
    *,
    name: str = "gfvm",
    replicas: int = DEFAULT_REPLICAS,
    new_ca: bool = False,
    seed: bytes | None = None,
) -> InitResult:
    """Writes cluster.toml, the CA and one bundle per node under `out_dir` (blocking).

    An existing CA under `out_dir` is reused, so running init again with a changed node list
    (a node added) issues bundles that work with the nodes already joined; `new_ca` replaces it,
    after which every node must join again. With `seed` (a shared secret), the CA and node
    keys are derived from it, so machines holding the same secret and node list produce
    credentials that work together without copying bundles around (the Vagrant cluster does that).
    """
    config = ClusterConfig(name=name, nodes=nodes, replicas=min(replicas, len(nodes)))
    # Validate through the same parser the daemons use (duplicates, ranges, names).
    config = ClusterConfig.parse(config.to_toml(), "the new cluster.toml")
    if replicas > len(nodes):
        raise UsageError(f"--replicas {replicas} exceeds the number of nodes ({len(nodes)})")
    ca_dir = out_dir / "ca"
    out_dir.mkdir(parents=True, exist_ok=True)
    if new_ca:
        for old in ("ca.key", "ca.crt"):
            (ca_dir / old).unlink(missing_ok=True)
    if (ca_dir / "ca.key").exists():
        ca = pki.load_ca(ca_dir)
        if ca.cluster != config.name:
            raise UsageError(
                f"{ca_dir} holds the CA of cluster {ca.cluster!r}, not {config.name!r}: "
                "use another --out, or --new-ca to replace it"
            )
        if seed is not None:
            ca.seed = seed
    else:
        ca = pki.create_ca(ca_dir, config.name, seed=seed)
    toml_text = config.to_toml()
    config_path = out_dir / "cluster.toml"
    pki.write_atomic(config_path, toml_text.encode(), 0o644)
    bundles_dir = out_dir / "bundles"
    bundles_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(bundles_dir, 0o700)
    bundles = {}
    for node in config.nodes:
        path = bundles_dir / f"{node.name}.bundle"
        pki.write_atomic(path, pki.make_bundle(ca.issue(node.name), toml_text), 0o600)
        bundles[node.name] = path
    return InitResult(config_path, ca_dir, bundles)


def join(bundle_path: Path, etc_dir: Path) -> str:
    """Installs the bundle at `bundle_path` into `etc_dir`; returns the node's name (blocking)."""
    try:
        data = bundle_path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{bundle_path} does not exist") from None
    bundle = pki.read_bundle(data)
    bundle.install(etc_dir)
    return bundle.creds.node


def add_commands(cluster_sub, top_sub) -> None:
    """Adds `cluster init` to the `cluster` group and the `node` group with `join`."""
    p = cluster_sub.add_parser(
        "init",
        help="create a real cluster's configuration, CA and per-node bundles",
        description="Write cluster.toml, create the cluster CA and one certificate + key per node, "
        "packed so each node gets only its own key. Copy bundles/<node>.bundle to each node and run "
        "`gfvm node join <bundle>` there.",
    )
    p.add_argument(
        "--nodes", required=True, metavar="NAME=ADDR[:PORT],...",
        help="the cluster's nodes, e.g. n1=192.168.77.11,n2=192.168.77.12,n3=192.168.77.13",
    )
    p.add_argument("--replicas", type=int, default=DEFAULT_REPLICAS, help="copies of each file (default 2)")
    p.add_argument("--name", default="gfvm", help="cluster name (default gfvm)")
    p.add_argument("--out", type=Path, default=Path("/etc/gfvm"),
                   help="where to write cluster.toml, ca/ and bundles/ (default /etc/gfvm)")
    p.add_argument(
        "--new-ca", action="store_true",
        help="replace the CA already in --out (every node must then join again); by default an "
        "existing CA is reused, so re-running init after adding a node keeps the others valid",
    )
    p.add_argument(
        "--seed-file", type=Path, metavar="FILE",
        help="derive the CA and node keys from the hex secret in FILE (>= 32 bytes), so that "
        "machines sharing FILE create matching credentials on their own; FILE is then as "
        "secret as the CA key",
    )
    p.set_defaults(func=_init)

    node = top_sub.add_parser("node", help="this machine's membership in a cluster (join)")
    nsub = node.add_subparsers(dest="node_command", metavar="ACTION")
    nsub.required = True
    j = nsub.add_parser(
        "join",
        help="install a node bundle made by `gfvm cluster init`",
        description="Install BUNDLE (from `gfvm cluster init`) on this node: its certificate and "
        "key, the cluster CA and cluster.toml. Then start gfvmd (systemctl enable --now gfvmd).",
    )
    j.add_argument("bundle", type=Path, metavar="BUNDLE")
    j.add_argument("--etc", type=Path, default=Path("/etc/gfvm"), help="default /etc/gfvm")
    j.set_defaults(func=_join)


def _init(args) -> int:
    seed = pki.read_seed(args.seed_file) if args.seed_file else None
    result = init_cluster(
        parse_node_list(args.nodes), args.out, name=args.name, replicas=args.replicas,
        new_ca=args.new_ca, seed=seed,
    )
    print(f"wrote {result.config_path}")
    print(f"cluster CA in {result.ca_dir} (keep ca.key off the nodes)")
    for node, path in result.bundles.items():
        print(f"bundle for {node}: {path}")
    print("next: copy each bundle to its node and run `gfvm node join <bundle>` there")
    return 0


def _join(args) -> int:
    node = join(args.bundle, args.etc)
    print(f"joined as node {node}: {args.etc}/cluster.toml, {args.etc}/tls/ installed")
    print("next: systemctl enable --now gfvmd")
    return 0
