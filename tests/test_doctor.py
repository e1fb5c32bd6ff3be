"""`gfvm doctor` on this machine: every required feature is present (CI runs on the same kind
of machine), and a missing feature is reported with what to do."""

import json
import subprocess
import sys

from conftest import require_root
from gfvm import doctor


def test_everything_required_is_present_here():
    require_root()
    results = doctor.run_checks()
    missing = [f"{r.name}: {r.detail}" for r in results if r.required and not r.ok]
    assert missing == []


def test_json_output_lists_every_check():
    require_root()
    proc = subprocess.run([sys.executable, "-m", "gfvm", "doctor", "--json"], capture_output=True, text=True)
    report = json.loads(proc.stdout)
    names = {c["name"] for c in report["checks"]}
    assert {"FUSE", "userfaultfd features", "PAGEMAP_SCAN", "CRIU >= 4", "cgroup freezer", "tini"} <= names
    assert proc.returncode == (0 if report["ok"] else 1)


def test_missing_feature_is_named_with_a_fix(monkeypatch, capsys):
    monkeypatch.setattr(doctor.config, "find_tini", lambda: None)
    result = doctor._tini()
    assert not result.ok and result.fix == "apt-get install tini"
    monkeypatch.setattr(doctor, "CHECKS", [doctor._tini])
    assert doctor._main(type("A", (), {"json": False})()) == 1
    out = capsys.readouterr().out
    assert "MISSING  tini" in out and "-> apt-get install tini" in out


def test_old_criu_is_reported(tmp_path, monkeypatch):
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'Version: 3.17.1'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("GFVM_CRIU", str(fake))
    result = doctor._criu()
    assert not result.ok and "3.17.1" in result.detail and "deploy/install" in result.fix
