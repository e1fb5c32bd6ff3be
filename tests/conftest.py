"""Shared test fixtures.

Tests that need root, FUSE, userfaultfd, namespaces or CRIU run for real. Outside CI a missing
feature skips with its reason; under CI=true it fails, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skips (outside CI) or fails (under CI=true) the calling test when `condition` is false."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required feature missing under CI: {reason}")
    pytest.skip(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root")


def unique_name(prefix: str = "t") -> str:
    """A short unique name (cluster names are at most 8 characters)."""
    return f"{prefix}{uuid.uuid4().hex[:8 - len(prefix)]}"


def claim_loopback_block(prefix: str, start: int) -> tuple[int, socket.socket]:
    """A block of loopback addresses PREFIX.K.1-254 (K in 20..219, tried from `start`) that no
    other test cluster on this machine uses while the returned socket is open: K is claimed by
    binding an abstract unix socket named after it, which every test run sees and the kernel
    releases when the socket is closed or this process ends. (A pid-derived K alone collided
    when two test runs shared the machine: a daemon then failed with "address already in use".)
    Close the socket when the cluster is gone."""
    for i in range(200):
        k = (start + i) % 200 + 20
        claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            claim.bind(f"\0gfvm-tests-loopback-{prefix}.{k}")
        except OSError:  # another cluster holds it
            claim.close()
            continue
        return k, claim
    raise RuntimeError(f"every {prefix}.K.0/24 block is held by another test cluster")


@pytest.fixture
def root():
    require_root()


@pytest.fixture
def make_cluster():
    """Factory: make_cluster(nodes=3, **kwargs) -> Cluster; every cluster made is torn down."""
    require_root()
    from gfvm.cluster import Cluster

    made = []

    def factory(nodes: int = 3, **kwargs):
        name = kwargs.pop("name", None) or unique_name()
        made.append(name)
        return Cluster.up(nodes, name=name, **kwargs)

    yield factory
    for name in made:
        Cluster.down(name)
