"""A paging file as a page source for the migration target (the lazy-pages server).

Implements the `PageSource` contract of gfvm/migrate/pagesource.py: `lookup(inner_pid, vaddr)` is
page `vaddr` of the task whose pid inside the tree's PID namespace is `inner_pid`, exactly as the
paging file holds it (checksum verified), or None when the file has no data for it. After the
source's final flush_all + release_memory, that is the page's content at the dump.

Opened read-only on any node that has a copy of the file (the FM serves it locally on replicas).
Every method blocks (file reads); not thread-safe (one reader thread).
"""

from __future__ import annotations

from gfvm.pager.backing import PAGE_SIZE, PagingBacking
from gfvm.pager.pagefile import PagingFile, PagingFileError


class PagingFileSource:
    """Read access to one paging file, keyed by (inner pid, virtual address)."""

    def __init__(self, backing: PagingBacking, directory: str) -> None:
        self.pf = PagingFile.open(backing, directory)

    def asids(self) -> list[int]:
        """Inner pids that have pages in the file."""
        return sorted(a for a, s in self.pf.index.spaces.items() if s and a < 0x80000000)

    def lookup(self, inner_pid: int, vaddr: int) -> bytes | None:
        """The page at `vaddr` (page-aligned) of task `inner_pid`, or None. Raises
        PagingFileError when the stored page fails its checksum (never returns wrong data)."""
        if vaddr % PAGE_SIZE:
            raise ValueError(f"address {vaddr:#x} is not page-aligned")
        return self.pf.read_page(inner_pid, vaddr // PAGE_SIZE)

    def lookup_run(self, inner_pid: int, vaddr: int, max_pages: int) -> bytes | None:
        """1..max_pages consecutive pages from `vaddr` (stops at the first page the file lacks)."""
        first = self.lookup(inner_pid, vaddr)
        if first is None:
            return None
        out = [first]
        for i in range(1, max_pages):
            page = self.lookup(inner_pid, vaddr + i * PAGE_SIZE)
            if page is None:
                break
            out.append(page)
        return b"".join(out)

    def ranges(self, inner_pid: int) -> list[tuple[int, int]]:
        """[start, end) address runs the file holds for the task."""
        runs: list[tuple[int, int]] = []
        for v in sorted(self.pf.index.entries(inner_pid)):
            a = v * PAGE_SIZE
            if runs and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], a + PAGE_SIZE)
            else:
                runs.append((a, a + PAGE_SIZE))
        return runs

    def native_sources(self, inner_pid: int) -> list:
        """A fresh native PageIndex (owned by the caller) over the local copy of `pages`, for the
        native fault loop, with the pages' checksums: the loop verifies each page before it
        serves it (a page that fails is poisoned and reported, never served)."""
        from gfvm import native
        from gfvm.pager.tracker import build_cindex

        entries = self.pf.index.entries(inner_pid)
        if not entries:
            return []
        return [native.Source(build_cindex(entries), self.pf.pages_read_fd())]

    def close(self) -> None:
        self.pf.close()


__all__ = ["PagingFileSource", "PagingFileError"]
