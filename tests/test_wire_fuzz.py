"""A short, bounded run of the coverage-guided decoder fuzzer (tests/fuzz/fuzz_wire.py).

Longer runs are done by hand: `python3 tests/fuzz/fuzz_wire.py -max_total_time=600 <corpus>`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).parent / "fuzz" / "fuzz_wire.py"
SECONDS = 25


@pytest.mark.slow
def test_decoder_survives_a_short_fuzzing_run(tmp_path):
    if os.environ.get("CI") != "true":  # under CI a missing fuzzer is a failure, not a skip
        pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            f"-max_total_time={SECONDS}",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert proc.returncode == 0 and not crashes, proc.stderr[-4000:]
    assert "Done" in proc.stderr  # it really ran
    assert len(list(corpus.iterdir())) > 5  # seeded, and libFuzzer kept what grew coverage
