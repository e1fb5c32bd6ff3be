"""What a gfvmd must remember about a migration in flight, so that a restarted gfvmd finishes or
undoes it instead of leaving a process frozen (source) or a half-restored copy (target).

One JSON file per migration and side in `<run>/migrate/`: `out-<id>.json` on the source,
`in-<id>.json` on the target, replaced atomically at each phase change and removed when the
migration is over. The run directory disappears at reboot, and so do the processes.

Source phases: picked -> frozen -> released -> dumped -> handed_off -> done.
Target phases: prepared -> restoring -> (restored: root pid known) -> running.
A restarted gfvmd reads them in `MigrationService.reconcile` (gfvm/migrate/service.py).
Blocking file I/O on small files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class Journal:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, side: str, gfvm_id: str) -> Path:
        return self.directory / f"{side}-{gfvm_id}.json"

    def save(self, side: str, gfvm_id: str, record: dict) -> None:
        """Atomically replaces the record of (side, id)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(side, gfvm_id)
        tmp = path.with_suffix(".tmp")
        # No fsync: the journal has to survive a crash of gfvmd (the kernel keeps the file),
        # not of the machine (the processes it describes die with it).
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)

    def remove(self, side: str, gfvm_id: str) -> None:
        self._path(side, gfvm_id).unlink(missing_ok=True)

    def load_all(self, side: str) -> dict[str, dict]:
        """id -> record for every readable record of `side`; unreadable ones are skipped."""
        out = {}
        if not self.directory.is_dir():
            return out
        for path in self.directory.glob(f"{side}-*.json"):
            try:
                out[path.stem[len(side) + 1 :]] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
        return out
