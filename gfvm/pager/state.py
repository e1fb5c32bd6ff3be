"""What gfvmd persists about its managed processes, so that a restarted gfvmd finds them again.

One JSON file per managed tree, `<run>/pager/procs/<id>.json`, replaced atomically whenever the
tree changes shape (fork, exec, exit). The run directory is gone after a reboot, and so are the
processes, which is the right lifetime. The uffds themselves are not here (they cannot be): the
keeper holds them (gfvm/pager/keeper.py), keyed "<id>/<asid>".

A process is identified by (host pid, start time): a pid alone may have been reused by the time a
restarted gfvmd looks.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class SpaceRecord:
    """One address space of a tree: its thread-group leader."""

    asid: int  # pid inside the tree's PID namespace
    host_pid: int
    start_time: int  # /proc/PID/stat field 22: tells a reused pid apart


@dataclass
class TreeRecord:
    """One managed process tree."""

    id: str
    name: str
    cmd: list[str]
    node: str
    created: float
    init_pid: int  # tini (or the adopted process itself)
    init_start_time: int
    adopted: bool
    paging_dir: str  # relative to the backing root
    cgroup: list[str]
    log_path: str
    mem_limit: int | None = None
    spaces: list[SpaceRecord] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TreeRecord:
        data = json.loads(text)
        data["spaces"] = [SpaceRecord(**s) for s in data.get("spaces", [])]
        return cls(**data)


class StateStore:
    """The directory of TreeRecords. Blocking file I/O; small files."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def save(self, rec: TreeRecord) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.directory / f"{rec.id}.json"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(rec.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def remove(self, gfvm_id: str) -> None:
        try:
            (self.directory / f"{gfvm_id}.json").unlink()
        except FileNotFoundError:
            pass

    def load_all(self) -> tuple[list[TreeRecord], list[str]]:
        """Every readable record, and a sentence for each file that could not be read."""
        records, problems = [], []
        if not self.directory.is_dir():
            return records, problems
        for path in sorted(self.directory.glob("*.json")):
            try:
                records.append(TreeRecord.from_json(path.read_text()))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                problems.append(f"{path}: {exc}")
        return records, problems
