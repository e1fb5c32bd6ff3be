"""Builds the C workload (workload.c next to this file) used by the pager tests and benchmark.

It is a process that writes known patterns into its memory, checks them itself and answers
commands over a unix socket (see the header of workload.c). Needs a C compiler (gcc).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from gfvm.errors import FeatureMissing

SOURCE = Path(__file__).resolve().parent / "workload.c"


def build(directory: Path) -> Path:
    """Compiles the workload into `directory` and returns the binary's path (blocking, ~0.3 s)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise FeatureMissing("a C compiler (gcc) is needed to build the pager workload")
    out = Path(directory) / "pager_workload"
    subprocess.run(
        [cc, "-O2", "-Wall", "-pthread", "-o", str(out), str(SOURCE)],
        check=True,
        capture_output=True,
    )
    return out
