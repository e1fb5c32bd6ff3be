"""What a node knows about itself for migration decisions and reports: free memory, free disk,
bytes through its network interfaces. Blocking reads of /proc and /sys (quick)."""

from __future__ import annotations

import os
from pathlib import Path


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def disk_free(path: Path) -> int:
    """Bytes available to root on the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def network_bytes() -> int:
    """Bytes received plus sent by every interface of this network namespace except loopback
    (/proc/net/dev, which shows the namespace of the reading process)."""
    total = 0
    with open("/proc/net/dev") as f:
        for line in f.readlines()[2:]:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                continue
            fields = rest.split()
            total += int(fields[0]) + int(fields[8])
    return total
