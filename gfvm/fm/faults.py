"""Named fault points, so tests can fail each protocol step on purpose (like CRIU_FAULT).

A fault point is a call `await faults.hit("master.after_local_write")` placed at one step of a
protocol. It does nothing unless armed, either from the environment when the daemon starts:

    GFVM_FAULT="master.after_local_write=crash,member.before_ack=delay:2"

or at run time through the control op `fm.fault` (`{"name": ..., "action": ...}`; action ""
disarms). Actions:
    crash       the daemon dies at once (os._exit(137), as a SIGKILL would leave things)
    error       the step raises an I/O error (EIO)
    unavailable the step fails for now (Unavailable: a peer or the metadata leader not
                answering), as a transient condition would; callers retry until io_timeout
    delay:S     the step sleeps S seconds first
    hang        the step never completes
    stop        the daemon SIGSTOPs itself (a paused node; SIGCONT resumes it)
An optional `@N` suffix arms the fault for the Nth hit only (`crash@3`); a `*` suffix keeps it
armed for every hit (`delay:0.5*`).
`POINTS` lists every point the File Manager has; arming an unknown name is refused.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys

import trio

from gfvm.errors import Unavailable, UsageError

log = logging.getLogger(__name__)

POINTS = {
    "master.before_local_write": "master: a write is ordered but not yet applied locally",
    "master.after_local_write": "master: a write is applied locally, frames not yet sent",
    "master.after_send": "master: frames queued to the members, acks not yet received",
    "master.before_flush_ack": "master: fsync done everywhere, not yet reported",
    "member.before_apply": "member: a replication frame arrived, not yet applied",
    "member.before_ack": "member: a replication frame applied, ack not yet sent",
    "member.before_flush": "member: a FLUSH arrived, data not yet fsynced",
    "resync.chunk": "master: between two chunks of a resync",
    "resync.before_in_sync": "master: resync done, member not yet marked in sync",
    "promote.before_commit": "old master: everyone flushed, epoch+1 not yet committed",
    "promote.after_commit": "old master: epoch+1 committed, not yet reported",
    "drop.collect": "master: a member failed, the chunks it missed collected, not yet saved",
    "drop.before_commit": "master: a member failed, its removal not yet committed",
    "drop.after_commit": "master: a member's removal committed, its lease not yet waited out",
    "recover.before_fetch": "restarted master: hot extents known, not yet fetched",
    "meta.before_effects": "metadata: an op persisted and applied in memory, its local effects "
                           "not yet done nor the op offered to the followers",
    "meta.before_answer": "metadata leader: a follower's op committed, the answer not yet sent",
}


#: prefixes of fault points that belong to other components and share GFVM_FAULT
OTHER_COMPONENTS = ("migrate.",)


class Faults:
    def __init__(self, points: dict[str, str] | None = None) -> None:
        self.points = POINTS if points is None else points  # the names this instance accepts
        self.armed: dict[str, tuple[str, int]] = {}  # name -> (action, remaining hits before it fires)
        self.hits: dict[str, int] = {}

    def arm(self, name: str, action: str) -> None:
        """Arms (or with action "" disarms) fault point `name`. Never blocks."""
        if name not in self.points:
            raise UsageError(
                f"unknown fault point {name!r}; known: {', '.join(sorted(self.points))}"
            )
        if not action:
            self.armed.pop(name, None)
            return
        nth = 1
        if action.endswith("*"):
            action, nth = action[:-1], 0  # 0: every hit
        if "@" in action:
            action, _, n = action.partition("@")
            nth = int(n)
        kind = action.split(":", 1)[0]
        if kind not in ("crash", "error", "unavailable", "delay", "hang", "stop"):
            raise UsageError(f"unknown fault action {action!r}")
        if kind == "delay":
            float(action.split(":", 1)[1])
        self.armed[name] = (action, nth)

    def owns(self, name: str) -> bool:
        """Whether `name` is in this instance's namespace (the File Manager's: every name but
        those of OTHER_COMPONENTS; another component's: the first words of its points)."""
        if self.points is POINTS:
            return not name.startswith(OTHER_COMPONENTS)
        return name.split(".", 1)[0] in {p.split(".", 1)[0] for p in self.points}

    def arm_from_env(self, value: str | None) -> None:
        for item in (value or "").split(","):
            item = item.strip()
            if item:
                name, _, action = item.partition("=")
                if not self.owns(name):
                    continue  # another component's point: that component arms it
                self.arm(name, action or "crash")

    async def hit(self, name: str) -> None:
        """The fault point `name`: acts if armed (see the module header), else returns at once."""
        self.hits[name] = self.hits.get(name, 0) + 1
        spec = self.armed.get(name)
        if spec is None:
            return
        action, nth = spec
        if nth > 1:
            self.armed[name] = (action, nth - 1)
            return
        if nth == 1:
            del self.armed[name]
        log.warning("fault point %s: %s", name, action)
        kind = action.split(":", 1)[0]
        if kind == "crash":
            sys.stderr.flush()
            os._exit(137)
        if kind == "error":
            raise OSError(errno.EIO, f"fault point {name}")
        if kind == "unavailable":
            raise Unavailable(f"fault point {name}")
        if kind == "delay":
            await trio.sleep(float(action.split(":", 1)[1]))
        elif kind == "hang":
            await trio.sleep_forever()
        elif kind == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
