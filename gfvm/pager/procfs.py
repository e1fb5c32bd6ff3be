"""What the pager reads from /proc: memory maps, pids inside PID namespaces, children, RSS.

Every function blocks (it reads /proc) and raises ProcessLookupError when the process is gone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PAGE_SIZE = 4096
#: special mappings that are anonymous-looking but must never be registered with userfaultfd
SPECIAL_VMAS = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")


@dataclass(frozen=True)
class Vma:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str  # e.g. "rw-p"
    offset: int
    inode: int
    path: str

    @property
    def private_anonymous(self) -> bool:
        """Heap, stacks, anonymous mmaps and bss: what the pager tracks. Not file mappings, not
        shared memory, not the kernel's special mappings."""
        if self.perms[3] != "p" or self.inode != 0:
            return False
        if self.path in SPECIAL_VMAS:
            return False
        return (
            self.path == ""
            or self.path in ("[heap]", "[stack]")
            or self.path.startswith(("[anon:", "[stack:"))
        )

    @property
    def pages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE


def _open_proc(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/{name}") as f:
            return f.read()
    except FileNotFoundError:
        raise ProcessLookupError(pid, f"process {pid} is gone") from None


def parse_maps(text: str) -> list[Vma]:
    """Parses the text of /proc/PID/maps."""
    vmas = []
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        vmas.append(
            Vma(
                start,
                end,
                fields[1],
                int(fields[2], 16),
                int(fields[4]),
                fields[5].strip() if len(fields) > 5 else "",
            )
        )
    return vmas


def maps(pid: int) -> list[Vma]:
    """Every VMA of the process."""
    return parse_maps(_open_proc(pid, "maps"))


def tracked_vmas(pid: int) -> list[Vma]:
    """The private anonymous VMAs of the process (what the pager registers)."""
    return [v for v in maps(pid) if v.private_anonymous]


def status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict of raw strings."""
    out = {}
    for line in _open_proc(pid, "status").splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def inner_pid(pid: int) -> int:
    """The pid of `pid` in its own (innermost) PID namespace: last field of NSpid."""
    return int(status(pid)["NSpid"].split()[-1])


def tgid(pid: int) -> int:
    return int(status(pid)["Tgid"])


def state(pid: int) -> str:
    """One-letter process state (R, S, D, T, t, Z, X, I...)."""
    text = _open_proc(pid, "stat")
    return text.rsplit(")", 1)[1].split()[0]


def start_time(pid: int) -> int:
    """Start time in clock ticks since boot: with the pid, tells one process from a later one
    that reuses its pid."""
    text = _open_proc(pid, "stat")
    return int(text.rsplit(")", 1)[1].split()[19])


def rss_bytes(pid: int) -> int:
    """Resident anonymous memory (RssAnon) in bytes; 0 for a process without an mm."""
    value = status(pid).get("RssAnon", "0 kB").split()[0]
    return int(value) * 1024


def threads(pid: int) -> list[int]:
    """Thread ids of the process."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        raise ProcessLookupError(pid, f"process {pid} is gone") from None


def children(pid: int) -> list[int]:
    """Direct children of every thread of the process."""
    kids: list[int] = []
    for tid in threads(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except FileNotFoundError:
            continue
    return kids


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (breadth first), skipping ones that vanish while we look."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        try:
            kids = children(p)
        except ProcessLookupError:
            continue
        out += kids
        todo += kids
    return out


def is_exiting(pid: int) -> bool:
    """PF_EXITING: the process is tearing itself down (its memory may already be gone)."""
    try:
        flags = int(_open_proc(pid, "stat").rsplit(")", 1)[1].split()[6])
    except (IndexError, ValueError, ProcessLookupError):
        return True
    return bool(flags & 0x00000004)


def is_kernel_thread(pid: int) -> bool:
    """Kernel threads have no mm: their /proc/PID/maps is empty and PF_KTHREAD is set."""
    try:
        flags = int(_open_proc(pid, "stat").rsplit(")", 1)[1].split()[6])
    except (IndexError, ValueError):
        return False
    return bool(flags & 0x00200000)  # PF_KTHREAD
