"""Page sources: where the lazy-pages server finds pages that CRIU did not dump (the process's
paging file, in gfvm; a plain copy of a region, in tests and tools).

The contract (`PageSource`): `lookup(inner_pid, vaddr)` returns the PAGE_SIZE bytes page `vaddr`
of task `inner_pid` held *at the dump*, or None when the source has no copy. A source never
returns newer or older contents than that (the server cannot tell). Optional methods:
  - `lookup_run(inner_pid, vaddr, max_pages) -> bytes | None`: 1..max_pages consecutive pages;
  - `ranges(inner_pid) -> list[(start, end)]`: what it holds (prefetch, availability checks);
  - `native_sources(inner_pid) -> list[gfvm.native.Source]`: the same pages as fresh page indexes
    over files, for the native fault loop (each call returns new indexes the caller owns: the loop
    applies the process's unmap/remap/discard events to them).
Every method may block (file reads); the server calls them from its own thread.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from gfvm.errors import Unavailable
from gfvm.migrate.images import PAGE_SIZE


class PageSource(Protocol):
    def lookup(self, inner_pid: int, vaddr: int) -> bytes | None:
        """Page `vaddr` of task `inner_pid` as it was at the dump, or None (blocking)."""
        ...


class RegionFileSource:
    """One contiguous region of one task stored as a flat file: page i of the file is the page
    at base + i * PAGE_SIZE. Blocking reads."""

    def __init__(self, inner_pid: int, base: int, path: str | os.PathLike) -> None:
        if base % PAGE_SIZE:
            raise ValueError(f"region base {base:#x} is not page-aligned")
        self.inner_pid = inner_pid
        self.base = base
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.length = os.fstat(self._fd).st_size // PAGE_SIZE * PAGE_SIZE

    def _offset(self, inner_pid: int, vaddr: int) -> int | None:
        if inner_pid != self.inner_pid or not self.base <= vaddr < self.base + self.length:
            return None
        return vaddr - self.base

    def lookup(self, inner_pid: int, vaddr: int) -> bytes | None:
        return self.lookup_run(inner_pid, vaddr, 1)

    def lookup_run(self, inner_pid: int, vaddr: int, max_pages: int) -> bytes | None:
        off = self._offset(inner_pid, vaddr)
        if off is None:
            return None
        want = min(max_pages * PAGE_SIZE, self.length - off)
        data = os.pread(self._fd, want, off)
        if len(data) != want:
            raise Unavailable(f"{self.path}: short read at offset {off}")
        return data

    def ranges(self, inner_pid: int) -> list[tuple[int, int]]:
        return [(self.base, self.base + self.length)] if inner_pid == self.inner_pid else []

    def native_sources(self, inner_pid: int) -> list:
        if inner_pid != self.inner_pid or not self.length:
            return []
        from gfvm import native

        index = native.PageIndex(self.length // PAGE_SIZE)
        n = self.length // PAGE_SIZE
        index.set_many(range(self.base, self.base + n * PAGE_SIZE, PAGE_SIZE), range(n))
        return [native.Source(index, self._fd)]

    def close(self) -> None:
        os.close(self._fd)


class MultiSource:
    """Several sources consulted in order (the first that has a page wins)."""

    def __init__(self, sources: list) -> None:
        self.sources = sources

    def lookup(self, inner_pid: int, vaddr: int) -> bytes | None:
        return self.lookup_run(inner_pid, vaddr, 1)

    def lookup_run(self, inner_pid: int, vaddr: int, max_pages: int) -> bytes | None:
        for s in self.sources:
            run = getattr(s, "lookup_run", None)
            data = run(inner_pid, vaddr, max_pages) if run else s.lookup(inner_pid, vaddr)
            if data:
                return data
        return None

    def ranges(self, inner_pid: int) -> list[tuple[int, int]]:
        return [r for s in self.sources for r in s.ranges(inner_pid)]

    def native_sources(self, inner_pid: int) -> list:
        return [n for s in self.sources for n in s.native_sources(inner_pid)]

    def close(self) -> None:
        for s in self.sources:
            s.close()
