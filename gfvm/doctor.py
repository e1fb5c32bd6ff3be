"""`gfvm doctor`: checks every kernel and system feature gfvm needs, by trying it.

Each check asks the running system directly (a syscall, an ioctl, a command) rather than
guessing from version numbers, and says what to do when it fails. Blocking; runs in the CLI.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gfvm import config

# userfaultfd feature bits (include/uapi/linux/userfaultfd.h)
UFFD_FEATURES = {
    "EVENT_FORK": 1 << 1,
    "EVENT_REMAP": 1 << 2,
    "EVENT_REMOVE": 1 << 3,
    "EVENT_UNMAP": 1 << 6,
    "WP_UNPOPULATED": 1 << 13,
    "WP_ASYNC": 1 << 15,
}
MIN_KERNEL = (6, 7)  # WP_ASYNC and PAGEMAP_SCAN arrived in 6.7


@dataclass
class Result:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


Check = Callable[[], Result]


def _kernel() -> Result:
    release = platform.release()
    try:
        version = tuple(int(x) for x in release.split("-")[0].split(".")[:2])
    except ValueError:
        return Result("kernel", False, f"cannot parse kernel release {release!r}")
    ok = version >= MIN_KERNEL
    return Result(
        "kernel >= 6.7",
        ok,
        release,
        "" if ok else "boot a kernel >= 6.7 (WP_ASYNC and PAGEMAP_SCAN are needed)",
    )


def _root() -> Result:
    ok = os.geteuid() == 0
    return Result("running as root", ok, f"euid {os.geteuid()}", "" if ok else "run gfvm as root")


def _fuse() -> Result:
    if not Path("/dev/fuse").exists():
        return Result("FUSE", False, "/dev/fuse missing", "modprobe fuse (CONFIG_FUSE_FS)")
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except OSError as exc:
        return Result("FUSE", False, f"/dev/fuse: {exc.strerror}", "check device permissions")
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return Result("FUSE", False, f"pyfuse3 does not import: {exc}", "run deploy/install")
    if shutil.which("fusermount3") is None:
        return Result("FUSE", False, "fusermount3 missing", "apt-get install fuse3")
    return Result("FUSE", True, "/dev/fuse, fusermount3, pyfuse3")


def _native():
    try:
        from gfvm import native

        return native, None
    except ImportError as exc:
        return None, str(exc)


def _uffd() -> Result:
    native, err = _native()
    if native is None:
        return Result("userfaultfd", False, err or "", "run deploy/install")
    try:
        features = native.probe_uffd_features()
    except OSError as exc:
        fix = "run as root, or sysctl vm.unprivileged_userfaultfd=1; kernel needs CONFIG_USERFAULTFD"
        return Result("userfaultfd", False, str(exc), fix)
    missing = [name for name, bit in UFFD_FEATURES.items() if not features & bit]
    if missing:
        return Result(
            "userfaultfd features",
            False,
            f"missing {', '.join(missing)} (kernel offers {features:#x})",
            "boot a kernel >= 6.7",
        )
    return Result("userfaultfd features", True, ", ".join(UFFD_FEATURES) + f" ({features:#x})")


def _pagemap_scan() -> Result:
    native, err = _native()
    if native is None:
        return Result("PAGEMAP_SCAN", False, err or "", "run deploy/install")
    try:
        native.probe_pagemap_scan()
    except OSError as exc:
        return Result("PAGEMAP_SCAN", False, str(exc), "boot a kernel >= 6.7")
    return Result("PAGEMAP_SCAN", True, "ioctl on /proc/PID/pagemap works")


def _pidfd() -> Result:
    native, err = _native()
    if native is None:
        return Result("pidfd_getfd", False, err or "", "run deploy/install")
    try:
        native.probe_pidfd_getfd()
    except OSError as exc:
        return Result("pidfd_getfd", False, str(exc), "boot a kernel >= 5.6")
    return Result("pidfd_open / pidfd_getfd", True, "works")


def _ptrace() -> Result:
    scope_file = Path("/proc/sys/kernel/yama/ptrace_scope")
    scope = scope_file.read_text().strip() if scope_file.exists() else "absent"
    if scope == "3":
        return Result(
            "ptrace", False, "kernel.yama.ptrace_scope = 3 (ptrace disabled until reboot)",
            "boot with ptrace_scope <= 2",
        )
    return Result("ptrace", True, f"yama ptrace_scope {scope}")


def _criu() -> Result:
    criu = config.find_criu()
    if criu is None:
        return Result("CRIU >= 4", False, "criu not found", "run deploy/install (it builds CRIU 4.1.1)")
    try:
        out = subprocess.run([criu, "--version"], capture_output=True, text=True, timeout=10).stdout
    except OSError as exc:
        return Result("CRIU >= 4", False, f"{criu}: {exc}", "run deploy/install")
    version = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Version:")), "")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return Result("CRIU >= 4", False, f"{criu} printed no version", "run deploy/install")
    if major < 4:
        return Result("CRIU >= 4", False, f"{criu} is {version}", "run deploy/install (builds CRIU 4.1.1)")
    check = subprocess.run([criu, "check"], capture_output=True, text=True, timeout=60)
    if check.returncode != 0:
        lines = [ln for ln in (check.stderr + check.stdout).splitlines() if "RLIMIT_NOFILE" not in ln]
        return Result("CRIU >= 4", False, f"`{criu} check` failed: {' '.join(lines)[-300:]}",
                      "see `criu check --all`; gfvm needs a kernel with CONFIG_CHECKPOINT_RESTORE")
    return Result("CRIU >= 4", True, f"{criu} {version}, criu check: Looks good")


def _freezer() -> Result:
    roots = config.cgroup_roots()
    v2 = [r for r in roots if _is_cgroup2(r)]
    v1 = [r for r in roots if r not in v2]
    if v2:
        return Result("cgroup freezer", True, f"cgroup v2 cgroup.freeze at {v2[0]}"
                      + (f" (and v1 freezer at {v1[0]})" if v1 else ""))
    if v1:
        return Result("cgroup freezer", True, f"cgroup v1 freezer at {v1[0]}")
    return Result("cgroup freezer", False, "neither cgroup v2 nor the v1 freezer is mounted",
                  "mount cgroup2 at /sys/fs/cgroup")


def _is_cgroup2(path: Path) -> bool:
    return (path / "cgroup.controllers").exists()


def _namespaces() -> Result:
    proc = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--net", "--propagation", "private", "true"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        return Result("namespaces", False, f"unshare failed: {proc.stderr.strip()}",
                      "enable PID, mount and network namespaces (CONFIG_*_NS)")
    return Result("namespaces", True, "pid, mount, net")


def _tini() -> Result:
    tini = config.find_tini()
    if tini is None:
        return Result("tini", False, "not found", "apt-get install tini")
    return Result("tini", True, tini)


def _tools() -> Result:
    missing = [t for t in ("ip", "tc", "nsenter", "unshare") if shutil.which(t) is None]
    if missing:
        return Result("network tools", False, f"missing {', '.join(missing)}",
                      "apt-get install iproute2 util-linux", required=False)
    return Result("network tools", True, "ip, tc, nsenter, unshare", required=False)


CHECKS: list[Check] = [
    _root, _kernel, _fuse, _uffd, _pagemap_scan, _pidfd, _ptrace, _criu, _freezer,
    _namespaces, _tini, _tools,
]


def run_checks() -> list[Result]:
    """Runs every check (blocking, a second or two: `criu check` dominates)."""
    results = []
    for check in CHECKS:
        try:
            results.append(check())
        except Exception as exc:  # noqa: BLE001 - a broken check is a failed check, not a crash
            results.append(Result(check.__name__.strip("_"), False, f"check crashed: {exc!r}"))
    return results


def add_commands(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="check this machine has every kernel and system feature gfvm needs",
        description="Checks FUSE, userfaultfd (WP_ASYNC, WP_UNPOPULATED, EVENT_*), PAGEMAP_SCAN, "
        "ptrace, pidfd_getfd, CRIU >= 4 (`criu check`), the cgroup freezer, namespaces and tini. "
        "Exits non-zero when something required is missing.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_main)


def _main(args) -> int:
    results = run_checks()
    failed = [r for r in results if not r.ok and r.required]
    if args.json:
        from gfvm.cli import print_json

        print_json({"ok": not failed, "checks": [r.__dict__ for r in results]})
        return 1 if failed else 0
    width = max(len(r.name) for r in results)
    for r in results:
        mark = "OK     " if r.ok else ("MISSING" if r.required else "warning")
        print(f"{mark}  {r.name:<{width}}  {r.detail}")
        if not r.ok and r.fix:
            print(f"{'':7}  {'':<{width}}  -> {r.fix}")
    if failed:
        print(f"\n{len(failed)} required feature(s) missing: gfvm will not work here.")
        return 1
    print("\neverything gfvm needs is here.")
    return 0
