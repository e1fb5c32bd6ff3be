"""CRIU dump/restore of a managed tree (its own PID namespace under tini) with real CRIU, on the
nodes of a namespace cluster: round trip, n1 -> n2, small dumps of released memory, clear errors."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from criu_support import cluster2, criu_env, make_workload, workload_bin  # noqa: F401 (fixtures)
from gfvm.migrate import criu
from gfvm.migrate.images import PAGE_SIZE, ImageDir
from gfvm.migrate.lazypages import inner_to_host
from gfvm.migrate.manifest import ManifestError

STATE_CHECKS = {
    "verify": "ok",
    "threads": "ok 3",
    "signal": "ok",
    "files": "ok",
    "pipe": "ok",
    "child": "child ok",
    "hot": "ok",
}


def on(cluster, node):
    return lambda argv: cluster.exec_argv(node, argv)


def check_state(w) -> None:
    assert w.cmd("ping") == "pong 2"  # the workload keeps its pid inside its namespace
    for command, expected in STATE_CHECKS.items():
        assert w.cmd(command).startswith(expected), command


# --- command lines (pure) ------------------------------------------------------------------------


def test_dump_argv_has_the_settled_options():
    argv = criu.dump_argv("criu", 123, Path("/img"), work_dir=Path("/w"))
    assert argv[:4] == ["criu", "dump", "-t", "123"]
    for opt in ("--tcp-close", "--skip-in-flight", "-v4"):
        assert opt in argv
    assert "--shell-job" not in argv and "--leave-running" not in argv
    assert argv[argv.index("-W") + 1] == "/w"


def test_dump_argv_page_server_and_freezer():
    argv = criu.dump_argv("criu", 1, Path("/img"), work_dir=Path("/w"), page_server=("10.77.0.2", 7000),
                          freeze_cgroup="/sys/fs/cgroup/freezer/x", leave_running=True)
    assert argv[argv.index("--address") + 1] == "10.77.0.2"
    assert argv[argv.index("--port") + 1] == "7000"
    assert argv[argv.index("--freeze-cgroup") + 1] == "/sys/fs/cgroup/freezer/x"
    with pytest.raises(ValueError):
        criu.dump_argv("criu", 1, Path("/i"), work_dir=Path("/w"), leave_running=True, leave_stopped=True)


def test_restore_argv_lazy_detached():
    argv = criu.restore_argv("criu", Path("/img"), work_dir=Path("/w"), pidfile=Path("/w/p"), lazy_pages=True)
    for opt in ("--restore-detached", "--lazy-pages", "--tcp-close"):
        assert opt in argv
    assert argv[argv.index("--pidfile") + 1] == "/w/p"


# --- real CRIU ---------------------------------------------------------------------------------------


def test_round_trip_on_one_node(cluster2, make_workload, tmp_path):
    w = make_workload("n1")
    check_state(w)
    images = tmp_path / "img"
    dumped = criu.dump_blocking(w.root, images, wrap=on(cluster2, "n1"))
    assert dumped.stats is not None and dumped.stats.pages_written > 0
    restored = criu.restore_blocking(images, work_dir=tmp_path / "work", require_manifest=False,
                                     wrap=on(cluster2, "n1"))
    w.moved_to("n1", restored.root_pid)
    check_state(w)


def test_dump_on_n1_restore_on_n2(cluster2, make_workload, tmp_path):
    w = make_workload("n1", mib=32)
    port = w.port
    images = tmp_path / "img"
    criu.dump_blocking(w.root, images, wrap=on(cluster2, "n1"))
    restored = criu.restore_blocking(images, work_dir=tmp_path / "work", require_manifest=False,
                                     wrap=on(cluster2, "n2"))
    w.moved_to("n2", restored.root_pid)
    # The listening socket was re-created in n2's network namespace, on the same port.
    assert w.port == port
    check_state(w)
    assert w.cmd("verify") == f"ok {32 * 256}"


def test_dump_of_released_memory_is_small(cluster2, make_workload, tmp_path):
    full = make_workload("n1", mib=64, child=False)
    released = make_workload("n1", mib=64, child=False)
    region_addr, region_len = released.region()
    assert released.cmd("release") == "released"
    full_dump = criu.dump_blocking(full.root, tmp_path / "full", wrap=on(cluster2, "n1"))
    small_dump = criu.dump_blocking(released.root, tmp_path / "small", wrap=on(cluster2, "n1"))
    print(f"\ndump of 64 MiB workload: {full_dump.images_bytes} bytes, {full_dump.seconds:.3f} s; "
          f"after release: {small_dump.images_bytes} bytes, {small_dump.seconds:.3f} s")
    assert full_dump.images_bytes > 64 << 20
    assert small_dump.images_bytes < 4 << 20
    mem = ImageDir(tmp_path / "small").task_memory(2)
    in_region = [r for r in mem.runs if r.vaddr < region_addr + region_len and r.end > region_addr]
    assert in_region == []  # not one page of the released region was dumped


def test_restore_failure_is_a_clear_error(cluster2, make_workload, tmp_path):
    w = make_workload("n1", child=False)
    images = tmp_path / "img"
    criu.dump_blocking(w.root, images, wrap=on(cluster2, "n1"), leave_running=True)
    # The original still listens on its port in n1: restoring it there again must fail.
    with pytest.raises(criu.CriuError) as info:
        criu.restore_blocking(images, work_dir=tmp_path / "work", require_manifest=False,
                              wrap=on(cluster2, "n1"))
    err = info.value
    assert err.action == "restore" and err.returncode != 0
    assert "Address already in use" in str(err) or "taken" in str(err)
    assert err.log_path is not None and err.log_path.exists()  # -v4 log kept on failure
    assert err.log_tail
    assert w.cmd("verify").startswith("ok")  # the original is untouched


def test_restore_refuses_images_without_manifest(tmp_path, criu_env):
    (tmp_path / "inventory.img").write_bytes(b"\x16\x31\x31\x58")
    with pytest.raises(ManifestError, match="never committed"):
        criu.restore_blocking(tmp_path, work_dir=tmp_path / "work")


def test_dump_refuses_a_directory_with_images(tmp_path, criu_env):
    (tmp_path / "core-1.img").write_bytes(b"x")
    with pytest.raises(Exception, match="already holds images"):
        criu.dump_blocking(1, tmp_path)
    assert PAGE_SIZE == 4096


def _freezer_root():
    from gfvm.config import cgroup_roots

    for root in cgroup_roots():
        if root.name == "freezer" or "freezer" in root.name.split(","):
            return root
    return None


def test_dump_of_a_tree_frozen_by_the_cgroup_freezer(cluster2, make_workload, tmp_path):
    """The migration freezes the tree (cgroup freezer) before releasing its memory; CRIU must
    then dump it as it is (`--freeze-cgroup`), and the restored tree runs."""
    root = _freezer_root()
    if root is None:
        pytest.skip("no cgroup v1 freezer hierarchy here")
    w = make_workload("n1", mib=8)
    cg = root / f"gfvm-criu-test-{os.getpid()}-{w.port}"
    cg.mkdir()
    try:
        for inner, host in sorted(inner_to_host(w.root).items()):
            (cg / "cgroup.procs").write_text(str(host))
        (cg / "freezer.state").write_text("FROZEN")
        deadline = time.monotonic() + 10
        while (cg / "freezer.state").read_text().strip() != "FROZEN":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        images = tmp_path / "img"
        criu.dump_blocking(w.root, images, freeze_cgroup=str(cg), wrap=on(cluster2, "n1"))
        restored = criu.restore_blocking(images, work_dir=tmp_path / "work", require_manifest=False,
                                         wrap=on(cluster2, "n2"))
        w.moved_to("n2", restored.root_pid)
        check_state(w)
    finally:
        w.kill()
        deadline = time.monotonic() + 10
        while True:
            try:
                cg.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
