"""One exception tree for gfvm. Messages are written for the user: they say what failed and,
where there is one, what to do. The FUSE boundary maps these to errnos (see `errno_of`)."""

from __future__ import annotations

import errno


class GfvmError(Exception):
    """Base of every error gfvm raises on purpose. `str(err)` is a user-facing sentence."""

    errno = errno.EIO
    #: short machine-readable kind, used in `--json` output and the control protocol
    kind = "error"


class UsageError(GfvmError):
    """The user asked for something that cannot be done as asked (bad argument, bad state)."""

    errno = errno.EINVAL
    kind = "usage"


class NotFound(GfvmError):
    """An unknown process id, pid, node or file."""

    errno = errno.ENOENT
    kind = "not-found"


class FeatureMissing(GfvmError):
    """A kernel or system feature gfvm needs is missing; the message names it."""

    errno = errno.ENOSYS
    kind = "feature-missing"


class Unavailable(GfvmError):
    """No up-to-date copy or no live peer can answer right now (never 'absent': RELIABILITY.md #4)."""

    errno = errno.EIO
    kind = "unavailable"


class DaemonNotRunning(GfvmError):
    """The CLI could not reach this node's gfvmd."""

    errno = errno.ECONNREFUSED
    kind = "daemon-not-running"


class ConfigError(GfvmError):
    """The cluster configuration is missing, malformed or inconsistent."""

    errno = errno.EINVAL
    kind = "config"


def errno_of(exc: BaseException) -> int:
    """The errno to report for `exc` at a syscall-like boundary (FUSE, control API)."""
    if isinstance(exc, GfvmError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
