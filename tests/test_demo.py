"""`gfvm demo` runs end to end and leaves nothing behind."""

import subprocess
import sys
from pathlib import Path

from conftest import unique_name
from test_cluster import leftovers


def test_demo_runs_and_cleans_up(root):
    name = unique_name("d")
    proc = subprocess.run(
        [sys.executable, "-m", "gfvm", "demo", "--name", name, "--mib", "64"],
        capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[1/5] bringing up 3 namespace nodes" in proc.stdout
    assert "moved n1 -> n" in proc.stdout and "frozen for" in proc.stdout
    assert "its own check of all 64 MiB on n" in proc.stdout
    assert ", 0 failed checks" in proc.stdout
    assert "demo finished" in proc.stdout
    assert leftovers(name) == []
