"""Errors of the File Manager that callers inside it act on (user-facing ones are gfvm.errors)."""

from __future__ import annotations

import errno

from gfvm.errors import GfvmError


class StaleView(GfvmError):
    """Our metadata is behind (or a peer's is): the master moved, an epoch changed. Retry once
    the metadata caught up; at the FUSE boundary this becomes EIO, never ESTALE."""

    errno = errno.ESTALE
    kind = "stale"
