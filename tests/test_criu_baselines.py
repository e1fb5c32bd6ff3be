"""The CRIU baselines of the migration benchmark (gfvm.migrate.criu_baselines) run end to end on a
small workload: the tree ends up running on the target with its memory intact. Speed is for the
benchmark, not asserted here."""

from __future__ import annotations

from pathlib import Path

import pytest

from criu_support import cluster2, criu_env, make_workload, workload_bin  # noqa: F401 (fixtures)
from gfvm.migrate import criu_baselines

MIB = 16


@pytest.mark.parametrize("page_server", [True, False])
def test_stop_and_copy_moves_the_tree(cluster2, make_workload, tmp_path, page_server):
    w = make_workload("n1", mib=MIB, child=False)
    result = criu_baselines.stop_and_copy(cluster2, "n1", "n2", w.root, tmp_path / "run", page_server=page_server)
    w.moved_to("n2", result.root_pid)
    assert w.cmd("verify") == f"ok {MIB * 256}"
    assert result.freeze_seconds > 0 and result.total_seconds == result.freeze_seconds
    assert result.bytes_moved >= MIB << 20  # every page crossed the link, during the freeze
    assert set(result.steps) == {"dump", "copy_images", "restore"}


def test_lazy_post_copy_moves_the_tree(cluster2, make_workload, tmp_path):
    old = Path("/proc/sys/fs/pipe-max-size").read_text()
    w = make_workload("n1", mib=MIB, child=False)
    result = criu_baselines.lazy_post_copy(cluster2, "n1", "n2", w.root, tmp_path / "run")
    w.moved_to("n2", result.root_pid)
    assert w.cmd("verify") == f"ok {MIB * 256}"
    assert result.total_seconds >= result.freeze_seconds > 0
    assert result.bytes_moved >= MIB << 20
    assert result.bytes_moved_during_freeze < result.bytes_moved
    assert Path("/proc/sys/fs/pipe-max-size").read_text() == old  # put back


def test_pre_copy_is_reported_unsupported():
    result = criu_baselines.pre_copy()
    assert not result.supported and "soft-dirty" in result.reason
