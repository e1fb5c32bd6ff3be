"""deploy/install's CRIU decision, exercised with stand-in criu programs: a system criu that is
too old or fails `criu check` means "build"; a good one is used; a good cached build is reused."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

LIB = Path(__file__).parents[1] / "deploy" / "lib" / "criu.sh"


def fake_criu(path: Path, version: str | None, check_ok: bool) -> Path:
    version_line = f'echo "Version: {version}"' if version else "echo 'garbage'"
    path.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f"  --version) {version_line}; [ -n '{version or ''}' ] && echo 'GitID: v{version}' ;;\n"
        f"  check) {'echo Looks good.; exit 0' if check_ok else 'echo vdso: Unexpected rt vDSO area bounds >&2; exit 1'} ;;\n"
        "esac\n"
    )
    path.chmod(0o755)
    return path


def choose(system: Path, built: Path) -> tuple[str, str]:
    proc = subprocess.run(
        ["bash", "-c", f'. "{LIB}"; criu_choose "$1" "$2"', "x", str(system), str(built)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip(), proc.stderr


@pytest.mark.parametrize(
    "version, check_ok, expected, why",
    [
        ("4.1.1", True, "system", ""),
        ("4.0", True, "system", ""),
        ("3.17.1", True, "build", "version 3.17.1, gfvm needs >= 4"),
        ("4.1.1", False, "build", "fails `criu check`"),
        (None, True, "build", "printed no version"),
    ],
)
def test_system_criu_decision(tmp_path, version, check_ok, expected, why):
    system = fake_criu(tmp_path / "criu", version, check_ok)
    choice, stderr = choose(system, tmp_path / "none" / "criu")
    assert choice == expected
    assert why in stderr


def test_missing_system_criu_means_build(tmp_path):
    choice, stderr = choose(tmp_path / "absent-criu", tmp_path / "none" / "criu")
    assert choice == "build"
    assert "not found" in stderr


def test_a_good_cached_build_is_reused_instead_of_a_broken_system_criu(tmp_path):
    system = fake_criu(tmp_path / "criu", "3.17.1", False)
    built = fake_criu(tmp_path / "built-criu", "4.1.1", True)
    assert choose(system, built)[0] == "built"


def test_a_broken_cached_build_is_rebuilt(tmp_path):
    system = fake_criu(tmp_path / "criu", "3.17.1", True)
    built = fake_criu(tmp_path / "built-criu", "4.1.1", False)
    assert choose(system, built)[0] == "build"


def test_installer_rejects_unknown_options():
    proc = subprocess.run([str(LIB.parents[1] / "install"), "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown option --bogus" in proc.stderr


def test_installer_help_teaches():
    proc = subprocess.run([str(LIB.parents[1] / "install"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "--dev" in proc.stdout and "Idempotent" in proc.stdout
