"""Work-arounds that let an older CRIU run on a newer kernel, applied only where needed.

The one we need: since Linux 6.16, getsockopt(SO_PASSCRED / SO_PASSSEC) on a socket that is not
AF_UNIX/AF_NETLINK fails with EOPNOTSUPP. CRIU before 4.2 asks for both options on every socket
it dumps, so it cannot dump any process holding a TCP or UDP socket ("Can't get 1:16 opt:
Operation not supported"); CRIU 4.2 asks only AF_UNIX/AF_NETLINK sockets. On such kernels the
options do not exist for INET sockets, so "off" is their true value. We give an older CRIU that
answer with a tiny LD_PRELOAD library that wraps getsockopt: for exactly those two options and
exactly that error it reports 0 (off); everything else goes to libc unchanged. Only `criu dump`
runs with it; the restored processes never load it (CRIU's restorer unmaps all of CRIU).

The library is built from the C text below with the system C compiler on first use, into a
root-only cache directory, named after the hash of its source.

Functions here block (they may run the compiler once, ~0.1 s).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from gfvm.errors import FeatureMissing

FIXED_IN = (4, 2)

_SHIM_SOURCE = r"""
/* gfvm: report SO_PASSCRED/SO_PASSSEC as off where the kernel no longer has them (INET sockets,
 * Linux >= 6.16), so CRIU < 4.2 can dump TCP/UDP sockets. Everything else is passed through. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*getsockopt_fn)(int, int, int, void *, socklen_t *);

int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
    static getsockopt_fn next;
    if (!next)
        next = (getsockopt_fn)dlsym(RTLD_NEXT, "getsockopt");
    int rc = next(fd, level, name, val, len);
    if (rc < 0 && errno == EOPNOTSUPP && level == SOL_SOCKET &&
        (name == SO_PASSCRED || name == SO_PASSSEC) && val && len && *len >= sizeof(int)) {
        memset(val, 0, sizeof(int));
        *len = sizeof(int);
        return 0;
    }
    return rc;
}
"""


def kernel_restricts_passcred() -> bool:
    """True when getsockopt(SO_PASSCRED) on a TCP socket fails with EOPNOTSUPP (Linux >= 6.16)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED)
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                return True
            raise
    return False


@lru_cache(maxsize=8)
def criu_version(binary: str) -> tuple[int, ...]:
    """(major, minor[, sublevel]) of the CRIU at `binary` (blocking: runs `criu --version`)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError as exc:
        raise FeatureMissing(f"cannot run CRIU at {binary}: {exc.strerror}") from None
    m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", out)
    if not m:
        raise FeatureMissing(f"{binary} --version printed no version: {out.strip()!r}")
    return tuple(int(g) for g in m.groups() if g is not None)


def _cache_dir() -> Path:
    base = Path(os.environ.get("GFVM_CACHE") or Path.home() / ".cache" / "gfvm")
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = base.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise FeatureMissing(f"{base} must be owned by uid {os.geteuid()} and not group/world-writable")
    return base


@lru_cache(maxsize=1)
def sockopt_shim() -> str:
    """Path of the built LD_PRELOAD library (building it on first use). Raises FeatureMissing
    when no C compiler is available."""
    digest = hashlib.sha256(_SHIM_SOURCE.encode()).hexdigest()[:16]
    target = _cache_dir() / f"criu-sockopt-{digest}.so"
    if target.exists():
        return str(target)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise FeatureMissing(
            "CRIU < 4.2 needs a small compatibility library on this kernel (Linux >= 6.16) to dump "
            "TCP/UDP sockets, and building it needs a C compiler (`apt install gcc`); or install CRIU >= 4.2"
        )
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "shim.c"
        src.write_text(_SHIM_SOURCE)
        out = Path(tmp) / "shim.so"
        proc = subprocess.run(
            [cc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(out), str(src), "-ldl"],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise FeatureMissing(f"could not build the CRIU compatibility library: {proc.stderr.strip()}")
        os.replace(out, target)
    return str(target)


def dump_env(binary: str) -> dict[str, str]:
    """Extra environment for `criu dump` with `binary` on this kernel: LD_PRELOAD of the
    sockopt shim when this CRIU needs it, else nothing (blocking on first call)."""
    if criu_version(binary) >= FIXED_IN or not kernel_restricts_passcred():
        return {}
    preload = os.environ.get("LD_PRELOAD")
    shim = sockopt_shim()
    return {"LD_PRELOAD": f"{shim} {preload}" if preload else shim}
