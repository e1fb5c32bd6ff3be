"""The command line teaches: every command group has --help, errors are one clear line."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def gfvm(*args):
    return subprocess.run([sys.executable, "-m", "gfvm", *args], capture_output=True, text=True, cwd=REPO)


@pytest.mark.parametrize("args", [(), ("cluster",), ("bench",), ("node",), ("doctor",), ("run",),
                                  ("ls",), ("status",), ("demo",)])
def test_help_exists(args):
    proc = gfvm(*args, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: gfvm" in proc.stdout


def test_bench_lists_the_benchmarks():
    out = gfvm("bench", "--help").stdout
    assert "pager" in out and "all" in out


def test_unknown_command_is_a_usage_error():
    proc = gfvm("frobnicate")
    assert proc.returncode == 2
    assert "invalid choice: 'frobnicate'" in proc.stderr
