"""`gfvm cluster init` and `gfvm node join`: configuration, CA, per-node bundles."""

from __future__ import annotations

import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from gfvm import pki, provision
from gfvm.config import ClusterConfig, NodePaths, this_node_name
from gfvm.errors import ConfigError, UsageError

NODES = "n1=192.168.77.11,n2=192.168.77.12:7100,n3=[fd00::3]"


def test_node_list_parsing():
    nodes = provision.parse_node_list(NODES)
    assert [(n.name, n.address, n.port) for n in nodes] == [
        ("n1", "192.168.77.11", 7077), ("n2", "192.168.77.12", 7100), ("n3", "fd00::3", 7077)
    ]


@pytest.mark.parametrize("bad", ["n1", "n1=", "=1.2.3.4", "N1=1.2.3.4", "n1=1.2.3.4:0",
                                 "n1=1.2.3.4:x", "n1=bad host", "n1=a;rm -rf /", ""])
def test_bad_node_lists(bad):
    with pytest.raises(UsageError):
        provision.parse_node_list(bad)


def test_init_writes_config_ca_and_one_bundle_per_node(tmp_path):
    result = provision.init_cluster(provision.parse_node_list(NODES), tmp_path, name="lab")
    config = ClusterConfig.load(result.config_path)
    assert [n.name for n in config.nodes] == ["n1", "n2", "n3"] and config.name == "lab"
    assert stat.S_IMODE((result.ca_dir / "ca.key").stat().st_mode) == 0o600
    keys = {}
    for node, path in result.bundles.items():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with tarfile.open(path) as tar:
            names = tar.getnames()
            assert names.count("node.key") == 1 and "ca.key" not in names
            keys[node] = tar.extractfile("node.key").read()
        assert pki.read_bundle(path.read_bytes()).creds.node == node
    assert len(set(keys.values())) == 3  # a node's key is in its own bundle only


def test_init_again_reuses_the_ca_so_joined_nodes_stay_valid(tmp_path):
    first = provision.init_cluster(provision.parse_node_list("n1=10.0.0.1,n2=10.0.0.2"), tmp_path)
    provision.join(first.bundles["n1"], tmp_path / "n1")
    again = provision.init_cluster(provision.parse_node_list("n1=10.0.0.1,n2=10.0.0.2,n3=10.0.0.3"), tmp_path)
    provision.join(again.bundles["n3"], tmp_path / "n3")  # the node added later
    assert handshake(pki.client_context(tmp_path / "n1/tls"), pki.server_context(tmp_path / "n3/tls")) == "n3"


def test_new_ca_replaces_it(tmp_path):
    nodes = provision.parse_node_list(NODES)
    provision.init_cluster(nodes, tmp_path)
    old = (tmp_path / "ca" / "ca.key").read_bytes()
    provision.init_cluster(nodes, tmp_path, new_ca=True)
    assert (tmp_path / "ca" / "ca.key").read_bytes() != old


def test_init_refuses_another_clusters_ca(tmp_path):
    nodes = provision.parse_node_list(NODES)
    provision.init_cluster(nodes, tmp_path, name="alpha")
    with pytest.raises(UsageError, match="holds the CA of cluster 'alpha'"):
        provision.init_cluster(nodes, tmp_path, name="beta")


def test_init_rejects_duplicates_and_bad_replicas(tmp_path):
    with pytest.raises(ConfigError, match="duplicate node names"):
        provision.init_cluster(provision.parse_node_list("n1=10.0.0.1,n1=10.0.0.2"), tmp_path)
    with pytest.raises(UsageError, match="exceeds the number of nodes"):
        provision.init_cluster(provision.parse_node_list("n1=10.0.0.1"), tmp_path, replicas=2)


def test_join_installs_the_nodes_files(tmp_path):
    result = provision.init_cluster(provision.parse_node_list(NODES), tmp_path / "admin")
    etc = tmp_path / "etc"
    assert provision.join(result.bundles["n2"], etc) == "n2"
    assert this_node_name(NodePaths(etc=etc)) == "n2"
    assert ClusterConfig.load(etc / "cluster.toml").node("n2").port == 7100
    assert stat.S_IMODE((etc / "tls" / "node.key").stat().st_mode) == 0o600
    creds = pki.NodeCredentials.load(etc / "tls")
    assert creds.node == "n2"


def test_join_rejects_corrupt_and_missing_bundles(tmp_path):
    result = provision.init_cluster(provision.parse_node_list(NODES), tmp_path / "admin")
    corrupt = tmp_path / "corrupt.bundle"
    corrupt.write_bytes(result.bundles["n1"].read_bytes()[:700])
    with pytest.raises(ConfigError, match="bundle"):
        provision.join(corrupt, tmp_path / "etc")
    with pytest.raises(ConfigError, match="does not exist"):
        provision.join(tmp_path / "absent.bundle", tmp_path / "etc")
    assert not (tmp_path / "etc" / "tls").exists()


def test_bundle_whose_config_does_not_list_the_node_is_rejected(tmp_path):
    result = provision.init_cluster(provision.parse_node_list(NODES), tmp_path / "admin")
    creds = pki.read_bundle(result.bundles["n3"].read_bytes()).creds
    other = ClusterConfig.parse(ClusterConfig(name="x", nodes=provision.parse_node_list("n1=10.0.0.1"), replicas=1).to_toml())
    with pytest.raises(ConfigError, match="unknown node 'n3'"):
        pki.make_bundle(creds, other.to_toml())


def test_cli_init_and_join(tmp_path):
    repo = Path(__file__).parents[1]
    run = lambda *a: subprocess.run([sys.executable, "-m", "gfvm", *a], capture_output=True, text=True, cwd=repo)
    proc = run("cluster", "init", "--nodes", NODES, "--out", str(tmp_path / "admin"))
    assert proc.returncode == 0, proc.stderr
    assert "bundle for n3" in proc.stdout
    proc = run("node", "join", str(tmp_path / "admin" / "bundles" / "n1.bundle"), "--etc", str(tmp_path / "etc"))
    assert proc.returncode == 0, proc.stderr
    assert "joined as node n1" in proc.stdout
    proc = run("cluster", "init", "--nodes", "n1", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "not name=address" in proc.stderr


def handshake(client_ctx, server_ctx) -> str:
    """Runs a TLS handshake in memory; returns the server's certificate identity."""
    import ssl

    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return pki.peer_identity(client)


def test_same_seed_gives_credentials_that_work_together(tmp_path):
    seed_file = tmp_path / "secret"
    seed_file.write_text("ab" * 32)
    seed = pki.read_seed(seed_file)
    nodes = provision.parse_node_list(NODES)
    a = provision.init_cluster(nodes, tmp_path / "a", seed=seed)
    b = provision.init_cluster(nodes, tmp_path / "b", seed=seed)
    provision.join(a.bundles["n1"], tmp_path / "n1")  # n1 provisioned from machine a
    provision.join(b.bundles["n2"], tmp_path / "n2")  # n2 from machine b
    assert (tmp_path / "a/ca/ca.key").read_bytes() == (tmp_path / "b/ca/ca.key").read_bytes()
    identity = handshake(pki.client_context(tmp_path / "n1/tls"), pki.server_context(tmp_path / "n2/tls"))
    assert identity == "n2"


def test_different_seeds_do_not_trust_each_other(tmp_path):
    import ssl

    nodes = provision.parse_node_list(NODES)
    a = provision.init_cluster(nodes, tmp_path / "a", seed=b"\x01" * 32)
    b = provision.init_cluster(nodes, tmp_path / "b", seed=b"\x02" * 32)
    provision.join(a.bundles["n1"], tmp_path / "n1")
    provision.join(b.bundles["n2"], tmp_path / "n2")
    with pytest.raises(ssl.SSLError):
        handshake(pki.client_context(tmp_path / "n1/tls"), pki.server_context(tmp_path / "n2/tls"))


@pytest.mark.parametrize("text, message", [("zz", "hex"), ("ab" * 8, "at least 32 bytes")])
def test_weak_or_malformed_secrets_are_refused(tmp_path, text, message):
    (tmp_path / "s").write_text(text)
    with pytest.raises(ConfigError, match=message):
        pki.read_seed(tmp_path / "s")
