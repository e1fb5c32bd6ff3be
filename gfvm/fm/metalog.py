"""Durable storage of the cluster metadata on one node: `<state>/fm/meta/`.

    snapshot.json  {"last": [term, version], "state": MetaState.to_dict()}   (atomic replace)
    ops.log        one JSON line per op applied after the snapshot: {"t", "v", "op"}  (append+fdatasync)
    vote.json      {"term": n, "voted_for": name or null}                    (atomic replace)

Crash discipline: an op is acknowledged to the leader only after its line is fdatasync'd; a torn
last line (crash mid-append) is cut off at load, which is safe because it was never acknowledged.
An append that fails (a full disk writes part of the line; an fdatasync fails) is taken back:
the log is cut to where it ended before, so the caller's "nothing was applied" holds and the
next line does not glue onto a torn one (that would make load drop it and every line after it).
If even the cut fails, the log refuses appends until gfvmd restarts (load then cuts it).
Compaction writes a new snapshot first and only then empties the log; lines whose version the
snapshot already covers are skipped at load, so a crash between the two steps loses nothing.
Every method blocks (file I/O); call from a worker thread. Not thread-safe: one caller at a time.
"""

from __future__ import annotations

import errno
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
        self._end = 0  # size of the log: where the next line starts
        self._broken: str | None = None  # why appends are refused (a failed append not undone)
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
        if self._fd is not None:
            self._end = os.fstat(self._fd).st_size
        term, voted = 0, None
        if self.vote_path.exists():
            d = json.loads(self.vote_path.read_bytes())
            term, voted = int(d["term"]), d.get("voted_for")
        return state, last, max(term, last[0]), voted

    def _log_fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._end = os.fstat(self._fd).st_size
        return self._fd

    def append(self, term: int, version: int, op: dict) -> None:
        """Durably records one applied op (blocks: fdatasync). All or nothing: raises OSError
        with the log as it was before when the line cannot be written and synced whole."""
        if self._broken is not None:
            raise OSError(errno.EIO, self._broken)
        record = {"t": term, "v": version, "op": op}
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        fd = self._log_fd()
        start = self._end
        try:
            rest = memoryview(line)
            while rest:  # a full disk can take part of the line and fail on the rest
                rest = rest[os.write(fd, rest):]
            os.fdatasync(fd)
        except OSError:
            self._take_back(fd, start)
            raise
        self._end = start + len(line)
        self._lines += 1

    def _take_back(self, fd: int, start: int) -> None:
        """Cuts the log back to `start` after a failed append; on failure refuses later appends."""
        try:
            os.ftruncate(fd, start)
            os.fdatasync(fd)
        except OSError as exc:
            self._broken = (
                f"the metadata log {self.log_path} could not be cut back after a failed append "
                f"({exc.strerror}): it takes no more ops until gfvmd restarts"
            )
            log.error("metadata: %s", self._broken)

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
        self._broken = None  # a fresh, empty log

    def save_vote(self, term: int, voted_for: str | None) -> None:
        """Persists the election state before it is acted on (blocks)."""
        atomic_write(self.vote_path, json.dumps({"term": term, "voted_for": voted_for}).encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
