"""pytest fixtures for tests/test_native_*.py (loaded with `pytest_plugins = ["native_fixtures"]`):
the test target binaries, running targets (killed by PID at the end of each test), a Tracer."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from native_support import HERE, Target, require, require_root


@pytest.fixture(scope="session")
def target_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        require(False, "gcc is needed to build the test target")
    out = tmp_path_factory.mktemp("native-target") / "native_target"
    subprocess.run(
        ["gcc", "-O1", "-pthread", "-o", str(out), str(HERE / "native_target.c")], check=True
    )
    return out


@pytest.fixture(scope="session")
def early_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/native_early.c: a static program without libc whose first instructions we know."""
    if shutil.which("gcc") is None:
        require(False, "gcc is needed to build the test program")
    out = tmp_path_factory.mktemp("native-early") / "native_early"
    subprocess.run(
        [
            "gcc",
            "-O1",
            "-static",
            "-nostdlib",
            "-fno-stack-protector",
            "-fno-builtin",
            "-o",
            str(out),
            str(HERE / "native_early.c"),
        ],
        check=True,
    )
    return out


@pytest.fixture
def start_target(target_binary: Path):
    """start_target(npages=64) -> Target; every target is killed at the end of the test."""
    require_root()
    started: list[Target] = []

    def start(npages: int = 64) -> Target:
        t = Target(target_binary, npages)
        started.append(t)
        return t

    try:
        yield start
    finally:
        for t in started:
            t.kill()


@pytest.fixture
def tracer():
    """A gfvm.native.Tracer, closed (every tracee released) at the end of the test."""
    from gfvm import native

    with native.Tracer() as t:
        yield t
