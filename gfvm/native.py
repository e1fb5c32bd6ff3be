"""The only user of gfvm._native (the cffi extension built from csrc/).

C functions return >= 0 or -errno; this module turns negative returns into OSError so callers
never see raw error codes. Functions here block only as long as the syscall they wrap.
"""

from __future__ import annotations

import os

try:
    from gfvm._native import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "gfvm's compiled part (gfvm._native) is missing: reinstall gfvm with deploy/install, "
        "or build it in place with `python gfvm/_build_native.py`"
    ) from exc

__all__ = ["ffi", "lib", "check", "probe_uffd_features", "probe_pagemap_scan", "probe_pidfd_getfd"]


def check(rc: int, what: str) -> int:
    """Returns rc when it is >= 0, raises OSError(-rc) naming `what` otherwise."""
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def probe_uffd_features() -> int:
    """Every userfaultfd feature bit the running kernel offers. Raises OSError if uffd is unusable."""
    features = ffi.new("uint64_t *")
    check(lib.gfvm_probe_uffd_features(features), "userfaultfd")
    return int(features[0])


def probe_pagemap_scan() -> None:
    """Raises OSError when the PAGEMAP_SCAN ioctl is not available."""
    check(lib.gfvm_probe_pagemap_scan(), "PAGEMAP_SCAN")


def probe_pidfd_getfd() -> None:
    """Raises OSError when pidfd_open or pidfd_getfd is not available."""
    check(lib.gfvm_probe_pidfd_getfd(), "pidfd_getfd")
