"""The cgroup of one managed process tree: made for freezing the tree as a unit.

A tree gets one cgroup in one hierarchy gfvm can freeze with (`gfvm.config.cgroup_roots()`): the
cgroup v2 hierarchy (`cgroup.freeze`) when it is mounted, else the v1 `freezer` hierarchy. Never
both: a tree frozen by both freezers at once deadlocks (measured here: v1 holds tasks in the
refrigerator, so they never reach v2's freezer trap, and v2-trapped tasks never reach v1's).
The path is `<root>/gfvm/<cluster>-<node>/<gfvm id>` so that namespace nodes sharing one machine
never share a cgroup and `gfvm cluster down` finds leftovers by prefix.

A process joins by writing "0" (itself) to `cgroup.procs` before it execs the tree's first program
(`join_and_exec_argv`), so every process of the tree is born inside. All functions block briefly.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from gfvm.config import cgroup_node_group, cgroup_roots
from gfvm.errors import FeatureMissing, GfvmError

#: run by /bin/sh: join every cgroup given before "--", then exec what follows
# Joins the tree's cgroups, then gives up gfvmd's OOM protection (the unit sets
# OOMScoreAdjust=-900 for the daemon and its keeper; a workload must stay an ordinary OOM target).
_JOIN_SCRIPT = (
    'while [ "$1" != "--" ]; do echo 0 > "$1" || exit 126; shift; done; shift; '
    "echo 0 > /proc/self/oom_score_adj; "
    'exec "$@"'
)


def _is_v2(root: Path) -> bool:
    return (root / "cgroup.controllers").exists()


@dataclass(frozen=True)
class TreeCgroup:
    """The cgroup of one managed tree (a tuple: at most one path today, in the hierarchy used)."""

    paths: tuple[Path, ...]

    @classmethod
    def for_tree(cls, cluster: str, node: str, gfvm_id: str) -> TreeCgroup:
        """The cgroup paths a tree with this id uses on this node (not created yet)."""
        group = cgroup_node_group(cluster, node)
        roots = sorted(cgroup_roots(), key=lambda r: not _is_v2(r))[:1]  # v2 first
        return cls(tuple(root / "gfvm" / group / gfvm_id for root in roots))

    def create(self) -> None:
        """Makes the cgroups. Raises FeatureMissing when no freezing hierarchy is mounted."""
        if not self.paths:
            raise FeatureMissing(
                "no cgroup hierarchy to freeze processes with: mount cgroup2 (cgroup.freeze) or "
                "the "
                "v1 freezer controller"
            )
        for p in self.paths:
            p.mkdir(parents=True, exist_ok=True)

    def join_and_exec_argv(self, argv: list[str]) -> list[str]:
        """argv that joins these cgroups and then execs `argv`."""
        return [
            "/bin/sh",
            "-c",
            _JOIN_SCRIPT,
            "gfvm-join",
            *[str(p / "cgroup.procs") for p in self.paths],
            "--",
            *argv,
        ]

    def add(self, pid: int) -> None:
        """Moves an existing process (gfvm adopt) into the cgroups."""
        for p in self.paths:
            (p / "cgroup.procs").write_text(f"{pid}\n")

    def pids(self) -> list[int]:
        """Processes in the tree's cgroup (of the first hierarchy)."""
        out: set[int] = set()
        for p in self.paths[:1]:
            try:
                out.update(int(x) for x in (p / "cgroup.procs").read_text().split())
            except FileNotFoundError:
                pass
        return sorted(out)

    def freeze(self, timeout: float = 10.0) -> None:
        """Freezes every process of the tree and waits until they all are frozen."""
        for p in self.paths:
            if _is_v2(p.parents[2]):
                (p / "cgroup.freeze").write_text("1\n")
            else:
                (p / "freezer.state").write_text("FROZEN\n")
        deadline = time.monotonic() + timeout
        while not self.frozen():
            if time.monotonic() > deadline:
                raise GfvmError(
                    f"the tree in {self.paths[0]} did not freeze within {timeout:.0f} s"
                )
            time.sleep(0.005)

    def frozen(self) -> bool:
        for p in self.paths:
            if _is_v2(p.parents[2]):
                events = (p / "cgroup.events").read_text()
                if "frozen 1" not in events:
                    return False
            elif (p / "freezer.state").read_text().strip() != "FROZEN":
                return False
        return True

    def thaw(self) -> None:
        """Lets the tree run again."""
        for p in self.paths:
            if _is_v2(p.parents[2]):
                (p / "cgroup.freeze").write_text("0\n")
            else:
                (p / "freezer.state").write_text("THAWED\n")

    def kill_all(self) -> None:
        """SIGKILLs every process in the cgroups (used for fail-stop and cleanup)."""
        for p in self.paths:
            kill_file = p / "cgroup.kill"
            if kill_file.exists():
                kill_file.write_text("1\n")
                continue
            try:
                pids = [int(x) for x in (p / "cgroup.procs").read_text().split()]
            except FileNotFoundError:
                continue
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass

    def remove(self, timeout: float = 5.0) -> None:
        """Removes the (empty) cgroups; thaws first so that dying processes can leave."""
        deadline = time.monotonic() + timeout
        for p in self.paths:
            if not p.exists():
                continue
            try:
                self.thaw()
            except OSError:
                pass
            while True:
                try:
                    p.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
