"""RangeMap: the pages of one address space that are still waiting for their dumped contents.

Each entry maps a current address range [start, end) to the address its contents had at the dump
(`origin`); they differ only after the process moved memory with mremap. The lazy-pages server
removes a range once it has served it, drops ranges the process unmapped or discarded (their
old contents must never come back), and shifts ranges the process remapped.

Invariants: entries are page-aligned, non-empty, sorted and disjoint. Pure in-memory structure;
not thread-safe (owned by the server's loop thread). Operations are O(entries) at worst.
"""

from __future__ import annotations

import bisect
from typing import Iterator


class RangeMap:
    def __init__(self, entries: list[tuple[int, int, int]] | None = None) -> None:
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, int]] = []  # (start, end, origin of start)
        for start, end, origin in sorted(entries or []):
            self.add(start, end, origin)

    @classmethod
    def identity(cls, ranges: list[tuple[int, int]]) -> "RangeMap":
        """Each [start, end) waiting for the contents it had at the same address."""
        return cls([(s, e, s) for s, e in ranges])

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return iter(list(self._entries))

    def copy(self) -> "RangeMap":
        clone = RangeMap()
        clone._starts = list(self._starts)
        clone._entries = list(self._entries)
        return clone

    @property
    def total_bytes(self) -> int:
        return sum(e - s for s, e, _ in self._entries)

    def add(self, start: int, end: int, origin: int) -> None:
        """Adds [start, end) -> origin; it must not overlap an existing entry."""
        if end <= start:
            return
        i = bisect.bisect_left(self._starts, start)
        if (i > 0 and self._entries[i - 1][1] > start) or (i < len(self._entries) and self._starts[i] < end):
            raise ValueError(f"range {start:#x}-{end:#x} overlaps an existing one")
        self._starts.insert(i, start)
        self._entries.insert(i, (start, end, origin))

    def find(self, addr: int) -> tuple[int, int, int] | None:
        """The entry (start, end, origin) containing `addr`, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._entries[i][1]:
            return self._entries[i]
        return None

    def next_at_or_after(self, addr: int) -> tuple[int, int, int] | None:
        """The first entry that contains `addr` or starts after it, or None."""
        hit = self.find(addr)
        if hit is not None:
            return hit
        i = bisect.bisect_right(self._starts, addr)
        return self._entries[i] if i < len(self._entries) else None

    def remove(self, start: int, end: int) -> int:
        """Drops [start, end) from the map (splitting entries); returns the bytes dropped."""
        if end <= start:
            return 0
        dropped = 0
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        new: list[tuple[int, int, int]] = []
        j = i
        while j < len(self._entries) and self._entries[j][0] < end:
            s, e, o = self._entries[j]
            if e <= start:
                new.append((s, e, o))
            else:
                if s < start:
                    new.append((s, start, o))
                if e > end:
                    new.append((end, e, o + (end - s)))
                dropped += min(e, end) - max(s, start)
            j += 1
        self._entries[i:j] = new
        self._starts[i:j] = [s for s, _, _ in new]
        return dropped

    def take(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Removes and returns the parts of entries inside [start, end)."""
        taken = []
        for s, e, o in self._entries:
            if e <= start:
                continue
            if s >= end:
                break
            lo, hi = max(s, start), min(e, end)
            taken.append((lo, hi, o + (lo - s)))
        self.remove(start, end)
        return taken

    def move(self, src: int, dst: int, length: int) -> None:
        """The process moved [src, src+length) to [dst, dst+length) (mremap): whatever waited
        at the destination is gone, and what waited in the source now waits at the destination."""
        moved = self.take(src, src + length)
        self.remove(dst, dst + length)
        for s, e, o in moved:
            self.add(s - src + dst, e - src + dst, o)
