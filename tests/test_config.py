"""Cluster configuration parsing: valid files load, every malformed one is a clear ConfigError."""

import pytest

from gfvm.config import ClusterConfig, NodePaths, this_node_name
from gfvm.errors import ConfigError

GOOD = """
[cluster]
name = "lab"
replicas = 2

[[node]]
name = "n1"
address = "10.77.0.1"

[[node]]
name = "n2"
address = "10.77.0.2"
port = 7100
"""


def test_parse_good_config():
    cfg = ClusterConfig.parse(GOOD)
    assert cfg.name == "lab"
    assert cfg.replicas == 2
    assert [n.name for n in cfg.nodes] == ["n1", "n2"]
    assert cfg.node("n2").port == 7100
    assert cfg.node("n1").port == 7077


def test_round_trip_through_toml():
    cfg = ClusterConfig.parse(GOOD)
    assert ClusterConfig.parse(cfg.to_toml()) == cfg


@pytest.mark.parametrize(
    "text, message",
    [
        ("[cluster\n", "not valid TOML"),
        ("[cluster]\nname='x'\n", "at least one [[node]]"),
        (GOOD + '[[node]]\nname = "n1"\naddress = "10.77.0.9"\n', "duplicate node names: n1"),
        (GOOD + '[[node]]\nname = "n3"\naddress = "10.77.0.1"\n', "share the endpoint 10.77.0.1:7077"),
        (GOOD.replace("replicas = 2", "replicas = 3"), "between 1 and 2"),
        (GOOD.replace('name = "n1"', 'name = "N 1"'), "name 'N 1' must match"),
        (GOOD.replace('name = "n1"', 'name = "n1;rm -rf /"'), "must match"),
        (GOOD.replace("port = 7100", "port = 70000"), "not a TCP port"),
        (GOOD.replace('address = "10.77.0.1"', 'address = ""'), "is not an address"),
        (GOOD.replace('address = "10.77.0.1"', 'address = "10.77.0.1"\ncolour = 1'), "unknown keys"),
    ],
)
def test_bad_configs_are_rejected_with_a_clear_error(text, message):
    with pytest.raises(ConfigError) as err:
        ClusterConfig.parse(text, "cluster.toml")
    assert message in str(err.value)
    assert str(err.value).startswith("cluster.toml")


def test_unknown_node_lists_the_known_ones():
    cfg = ClusterConfig.parse(GOOD)
    with pytest.raises(ConfigError, match="unknown node 'n9'.*n1, n2"):
        cfg.node("n9")


def test_missing_config_file_says_how_to_create_one(tmp_path):
    with pytest.raises(ConfigError, match="gfvm cluster init"):
        ClusterConfig.load(tmp_path / "cluster.toml")


def test_node_identity(tmp_path):
    paths = NodePaths(etc=tmp_path)
    with pytest.raises(ConfigError, match="has not joined"):
        this_node_name(paths)
    (tmp_path / "node.toml").write_text('name = "n2"\n')
    assert this_node_name(paths) == "n2"
    (tmp_path / "node.toml").write_text('name = "../x"\n')
    with pytest.raises(ConfigError):
        this_node_name(paths)


def test_the_shipped_example_config_is_valid_for_every_component():
    from pathlib import Path

    from gfvm.fm.consensus import Timing
    from gfvm.pager.service import settings_from_config

    text = (Path(__file__).parents[1] / "deploy" / "cluster.toml.example").read_text()
    cfg = ClusterConfig.parse(text)
    fm = cfg.sections["fm"]
    Timing.from_section({k: v for k, v in fm.items() if k in Timing.__dataclass_fields__})
    assert set(fm) - set(Timing.__dataclass_fields__) == {"min_copies", "auto_failover"}
    settings_from_config(cfg.sections["pager"])
