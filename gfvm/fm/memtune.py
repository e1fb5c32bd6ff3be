"""Keeps glibc's malloc from handing out (and taking back) MiB-sized buffers with mmap/munmap.

Why: the File Manager allocates a fresh buffer of about 1 MiB for every MiB it moves (the page
data pyfuse3 hands over as bytes, the TLS records drained from the BIO, a frame body assembled
from several receives). glibc serves requests above its mmap threshold with a fresh mmap and
gives them back with munmap on free; its "dynamic" threshold rises after such a free, but the
heap top is then trimmed again (trim threshold = 2 x mmap threshold) and the next buffer of the
same size faults its pages in once more. Measured here: a 1 MiB bytearray allocated and filled
took ~0.95 ms that way, ~0.05 ms from a heap that keeps its pages; at several buffers per MiB
replicated that was a large share of both daemons' CPU.

`tune()` fixes both thresholds for the whole process (mallopt): buffers below MMAP_THRESHOLD
come from the heap and their pages are reused; free memory at the top of a heap is returned to
the kernel only beyond TRIM_THRESHOLD. The price: the daemon keeps up to TRIM_THRESHOLD of
freed memory per arena instead of returning it at once (its buffers in flight are bounded by
the peer channels' queue limits, tens of MiB). Call it once, early; it never blocks.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

#: requests below this size are served from the heap (a frame is at most 4 MiB)
MMAP_THRESHOLD = 8 << 20
#: free memory at a heap's top beyond this is returned to the kernel
TRIM_THRESHOLD = 32 << 20
_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3

_done = False


def tune() -> bool:
    """Sets the thresholds (see the module header); False where malloc is not glibc's."""
    global _done
    if _done:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.info("no glibc mallopt here: malloc thresholds left as they are")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _done = ok
    if not ok:
        log.warning("mallopt refused the malloc thresholds; MiB buffers stay mmap-backed")
    return ok
