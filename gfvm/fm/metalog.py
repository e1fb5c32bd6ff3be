"""Durable storage of the cluster metadata on one node: `<state>/fm/meta/`.

    snapshot.json  {"last": [term, version], "state": MetaState.to_dict()}   (atomic replace)
    ops.log        one JSON line per op applied after the snapshot: {"t", "v", "op"}  (append+fdatasync)
    vote.json      {"term": n, "voted_for": name or null}                    (atomic replace)

Crash discipline: an op is acknowledged to the leader only after its line is fdatasync'd; a torn
last line (crash mid-append) is cut off at load, which is safe because it was never acknowledged.
Compaction writes a new snapshot first and only then empties the log; lines whose version the
snapshot already covers are skipped at load, so a crash between the two steps loses nothing.
Every method blocks (file I/O); call from a worker thread. Not thread-safe: one caller at a time.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from gfvm.fm.meta import MetaState
from gfvm.fm.store import atomic_write

log = logging.getLogger(__name__)

COMPACT_EVERY = 2000  # ops in the log before it is folded into a new snapshot


class MetaLog:
    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir) / "fm" / "meta"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.snapshot_path = self.dir / "snapshot.json"
        self.log_path = self.dir / "ops.log"
        self.vote_path = self.dir / "vote.json"
        self._fd: int | None = None
        self._lines = 0

    def load(self) -> tuple[MetaState, tuple[int, int], int, str | None]:
        """(state, last (term, version), current term, voted_for) as persisted."""
        state, last = MetaState(), (0, 0)
        if self.snapshot_path.exists():
            snap = json.loads(self.snapshot_path.read_bytes())
            state = MetaState.from_dict(snap["state"])
            last = (int(snap["last"][0]), int(snap["last"][1]))
        lines = 0
        good_end = 0  # byte offset just past the last line we applied or skipped
        if self.log_path.exists():
            with open(self.log_path, "rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        log.warning("metadata log: dropping a torn last line (crash during append)")
                        break
                    try:
                        rec = json.loads(raw)
                        t, v, op = int(rec["t"]), int(rec["v"]), rec["op"]
                    except (ValueError, KeyError, TypeError):
                        log.warning("metadata log: dropping an unreadable line and what follows")
                        break
                    if v > last[1]:
                        if v != last[1] + 1:
                            log.warning("metadata log: gap after version %d; dropping the rest", last[1])
                            break
                        state.apply(op)
                        last = (t, v)
                    lines += 1
                    good_end += len(raw)
            if good_end != self.log_path.stat().st_size:
                # never acknowledged (an op is acknowledged only once its line is complete)
                os.truncate(self.log_path, good_end)
        self._lines = lines
        term, voted = 0, None
        if self.vote_path.exists():
            d = json.loads(self.vote_path.read_bytes())
            term, voted = int(d["term"]), d.get("voted_for")
        return state, last, max(term, last[0]), voted

    def _log_fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return self._fd

    def append(self, term: int, version: int, op: dict) -> None:
        """Durably records one applied op (blocks: fdatasync)."""
        fd = self._log_fd()
        os.write(fd, json.dumps({"t": term, "v": version, "op": op}, separators=(",", ":")).encode() + b"\n")
        os.fdatasync(fd)
        self._lines += 1

    def needs_compaction(self) -> bool:
        return self._lines >= COMPACT_EVERY

    def save_snapshot(self, state: MetaState, last: tuple[int, int]) -> None:
        """Writes a full snapshot and empties the log (blocks). Also used to install a
        snapshot received from the leader."""
        data = json.dumps({"last": list(last), "state": state.to_dict()}, separators=(",", ":"))
        atomic_write(self.snapshot_path, data.encode())
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        atomic_write(self.log_path, b"")
        self._lines = 0

    def save_vote(self, term: int, voted_for: str | None) -> None:
        """Persists the election state before it is acted on (blocks)."""
        atomic_write(self.vote_path, json.dumps({"term": term, "voted_for": voted_for}).encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
