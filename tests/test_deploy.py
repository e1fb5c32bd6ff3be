"""deploy/: the systemd unit is valid and gfvmd speaks systemd's readiness protocol."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from conftest import require

DEPLOY = Path(__file__).parents[1] / "deploy"


def test_systemd_unit_verifies():
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze not installed")
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(DEPLOY / "gfvmd.service")], capture_output=True, text=True
    )
    # verify also complains when /usr/local/bin/gfvmd is not installed yet: that is the only
    # message allowed here.
    problems = [ln for ln in proc.stderr.splitlines() if "/usr/local/bin/gfvmd" not in ln]
    assert problems == []


def test_gfvmd_notifies_systemd_when_ready(tmp_path, root):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(tmp_path / "notify"),
        "GFVM_ETC": str(tmp_path / "etc"),
        "GFVM_STATE": str(tmp_path / "state"),
        "GFVM_RUN": str(tmp_path / "run"),
        "GFVM_MOUNT": str(tmp_path / "mnt"),
    }
    daemon = subprocess.Popen([sys.executable, "-m", "gfvm.daemon"], env=env, cwd=Path(__file__).parents[1])
    try:
        assert notify.recv(100) == b"READY=1"
        assert (tmp_path / "run" / "gfvmd.sock").exists()
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        notify.close()
    assert not (tmp_path / "run" / "gfvmd.sock").exists()
