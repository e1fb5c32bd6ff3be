"""The cluster metadata: the /gfvm tree and every file's replication configuration.

Every node holds the whole of it (it is small: one entry per file or directory); the consensus
layer (`gfvm.fm.consensus`) makes the nodes apply the same operations in the same order. This
module is pure: in-memory state, `check` (may this operation be applied now?) and `apply`
(deterministic; every node computes the same result). No I/O, no time, no randomness: the leader
fills every chosen value (inode number, time stamps, generation id, placement) into the op before
it is replicated.

An entry is a directory or a file. A file entry also holds its configuration:
    epoch    fencing token: bumped whenever mastership moves; every data frame carries it
    master   the node that orders writes for this epoch
    members  node -> state for every node holding a copy, master included:
               "in_sync"  has every acknowledged write (may be read from, promoted, resync source)
               "outdated" missed writes; must be resynced before anything else
               "split"    diverged after a forced promotion: kept aside, never merged
    gen      current data generation id (rotated when the in-sync set shrinks, DRBD-style)
    gens     short history of generation ids (newest last)

Invariants (checked by `check_config`): the master is an in_sync member; members are known
nodes; at most one master per epoch (configs of one file change only by compare-and-set on the
epoch and members the requester saw: op "config" carries `expect_epoch` / `expect_members`).
Inode numbers are never reused, and they double as file ids in the local stores.

Requests sent again: a follower resends its request when the leader's answer is lost or the
leader changes, but the first one may have been applied. An op that carries a request id
(`rid`) records its result under that id (the last RECENT_REQUESTS of them, part of the state and
its snapshots); the leader answers a request whose id is recorded with that result instead of
applying it again (which would apply it twice, or fail it with EEXIST/ENOENT after it succeeded).
"""

from __future__ import annotations

import copy
import errno
from collections import OrderedDict
from dataclasses import dataclass, field

from gfvm.errors import GfvmError

#: request ids (with their results) a state remembers: far more ops than a cluster commits while
#: a follower waits to send a request again (an io_timeout)
RECENT_REQUESTS = 1024
ROOT = 1
IN_SYNC = "in_sync"
OUTDATED = "outdated"
SPLIT = "split"
MEMBER_STATES = (IN_SYNC, OUTDATED, SPLIT)
NAME_MAX = 255
S_IFDIR = 0o040000
S_IFREG = 0o100000


class MetaError(GfvmError):
    """An operation that cannot be applied to the tree; carries the errno FUSE should return."""

    kind = "meta"

    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.errno = err


def check_name(name: object) -> str:
    """A valid entry name, or MetaError(EINVAL/ENAMETOOLONG) saying what is wrong."""
    if not isinstance(name, str) or not name:
        raise MetaError(errno.EINVAL, "empty name")
    if name in (".", "..") or "/" in name:
        raise MetaError(errno.EINVAL, f"name {name!r} is not allowed")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise MetaError(errno.EINVAL, f"name {name!r} contains a control character")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise MetaError(errno.EINVAL, "names in /gfvm must be valid UTF-8") from None
    if len(raw) > NAME_MAX:
        raise MetaError(errno.ENAMETOOLONG, f"name longer than {NAME_MAX} bytes")
    return name


def decode_name(raw: bytes) -> str:
    """A name given by the kernel as bytes, or MetaError if /gfvm cannot hold it."""
    if len(raw) > NAME_MAX:
        raise MetaError(errno.ENAMETOOLONG, f"name longer than {NAME_MAX} bytes")
    try:
        return check_name(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise MetaError(errno.EINVAL, "names in /gfvm must be valid UTF-8") from None


@dataclass
class Entry:
    ino: int
    parent: int
    name: str
    kind: str  # "dir" | "file"
    mode: int  # permission bits only
    mtime_ns: int
    ctime_ns: int
    replicas: int | None = None  # dirs: R for files created below (None: inherit); files: R
    epoch: int = 0
    master: str = ""
    members: dict[str, str] = field(default_factory=dict)
    gen: str = ""
    gens: list[str] = field(default_factory=list)

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    def in_sync(self) -> list[str]:
        """Members holding every acknowledged write, master first."""
        rest = sorted(n for n, s in self.members.items() if s == IN_SYNC and n != self.master)
        return ([self.master] if self.members.get(self.master) == IN_SYNC else []) + rest

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["members"] = dict(self.members)
        d["gens"] = list(self.gens)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Entry":
        return cls(**{**d, "members": dict(d.get("members", {})), "gens": list(d.get("gens", []))})


class MetaState:
    """The tree and the file configurations; see the module header."""

    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {ROOT: Entry(ROOT, ROOT, "", "dir", 0o700, 0, 0)}
        self.children: dict[int, dict[str, int]] = {ROOT: {}}
        self.next_ino = ROOT + 1
        self.recent: OrderedDict[str, dict] = OrderedDict()  # request id -> result (newest last)

    # -- reading --

    def get(self, ino: int) -> Entry:
        e = self.entries.get(ino)
        if e is None:
            raise MetaError(errno.ENOENT, f"no inode {ino}")
        return e

    def lookup(self, parent: int, name: str) -> Entry:
        d = self.get(parent)
        if not d.is_dir:
            raise MetaError(errno.ENOTDIR, f"inode {parent} is not a directory")
        ino = self.children[parent].get(name)
        if ino is None:
            raise MetaError(errno.ENOENT, f"{self.path_of(parent).rstrip('/')}/{name} does not exist")
        return self.entries[ino]

    def resolve(self, path: str) -> Entry:
        """The entry at `path` (relative to the root of /gfvm; a leading '/' is accepted)."""
        e = self.entries[ROOT]
        for part in [p for p in path.split("/") if p]:
            e = self.lookup(e.ino, check_name(part))
        return e

    def split_path(self, path: str) -> tuple[Entry, str]:
        """(parent directory entry, last name) of `path`."""
        parts = [p for p in path.split("/") if p]
        if not parts:
            raise MetaError(errno.EINVAL, "the root has no parent")
        parent = self.resolve("/".join(parts[:-1]))
        if not parent.is_dir:
            raise MetaError(errno.ENOTDIR, f"{'/'.join(parts[:-1])} is not a directory")
        return parent, check_name(parts[-1])

    def path_of(self, ino: int) -> str:
        parts = []
        e = self.get(ino)
        while e.ino != ROOT:
            parts.append(e.name)
            e = self.entries[e.parent]
        return "/" + "/".join(reversed(parts))

    def listdir(self, ino: int) -> list[Entry]:
        """Children of a directory in inode order (stable across calls: readdir offsets)."""
        d = self.get(ino)
        if not d.is_dir:
            raise MetaError(errno.ENOTDIR, f"inode {ino} is not a directory")
        return sorted((self.entries[i] for i in self.children[ino].values()), key=lambda e: e.ino)

    def replicas_for(self, parent: int, default: int) -> int:
        """R for a new file in `parent`: the nearest directory override, else `default`."""
        e = self.get(parent)
        while True:
            if e.replicas is not None:
                return e.replicas
            if e.ino == ROOT:
                return default
            e = self.entries[e.parent]

    def files(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.kind == "file"]

    # -- checking and applying operations --

    def check(self, op: dict) -> None:
        """Raises MetaError if `op` cannot be applied to the current state (leader side)."""
        kind = op.get("op")
        if kind in ("mkdir", "create"):
            parent = self.get(op["parent"])
            if not parent.is_dir:
                raise MetaError(errno.ENOTDIR, "parent is not a directory")
            check_name(op["name"])
            if op["name"] in self.children[parent.ino]:
                raise MetaError(errno.EEXIST, f"{op['name']} already exists")
            if op["ino"] in self.entries or op["ino"] < self.next_ino:
                raise MetaError(errno.EIO, "inode number reused")
            if kind == "create":
                self.check_config(op["master"], dict(op["members"]))
        elif kind in ("unlink", "rmdir"):
            e = self.lookup(op["parent"], op["name"])
            if kind == "unlink" and e.is_dir:
                raise MetaError(errno.EISDIR, f"{op['name']} is a directory")
            if kind == "rmdir":
                if not e.is_dir:
                    raise MetaError(errno.ENOTDIR, f"{op['name']} is not a directory")
                if self.children[e.ino]:
                    raise MetaError(errno.ENOTEMPTY, f"{op['name']} is not empty")
        elif kind == "rename":
            e = self.lookup(op["parent"], op["name"])
            newp = self.get(op["newparent"])
            if not newp.is_dir:
                raise MetaError(errno.ENOTDIR, "target parent is not a directory")
            check_name(op["newname"])
            # moving a directory below itself would detach it from the tree
            a = newp
            while True:
                if a.ino == e.ino:
                    raise MetaError(errno.EINVAL, "cannot move a directory into itself")
                if a.ino == ROOT:
                    break
                a = self.entries[a.parent]
            target_ino = self.children[newp.ino].get(op["newname"])
            if target_ino is not None and target_ino != e.ino:
                if op.get("noreplace"):
                    raise MetaError(errno.EEXIST, f"{op['newname']} already exists")
                t = self.entries[target_ino]
                if t.is_dir and not e.is_dir:
                    raise MetaError(errno.EISDIR, f"{op['newname']} is a directory")
                if e.is_dir and not t.is_dir:
                    raise MetaError(errno.ENOTDIR, f"{op['newname']} is not a directory")
                if t.is_dir and self.children[t.ino]:
                    raise MetaError(errno.ENOTEMPTY, f"{op['newname']} is not empty")
        elif kind in ("chmod", "utime", "set_replicas"):
            e = self.get(op["ino"])
            if kind == "set_replicas":
                r = op["replicas"]
                if not e.is_dir:
                    raise MetaError(errno.ENOTDIR, "replicas can be set on directories only")
                if r is not None and (not isinstance(r, int) or r < 1):
                    raise MetaError(errno.EINVAL, f"replicas must be >= 1, not {r!r}")
        elif kind == "config":
            e = self.get(op["ino"])
            if e.is_dir:
                raise MetaError(errno.EISDIR, "directories have no replication config")
            if op["expect_epoch"] != e.epoch or dict(op["expect_members"]) != e.members:
                raise MetaError(errno.ESTALE, f"file {e.ino}: configuration changed meanwhile")
            if op["epoch"] < e.epoch:
                raise MetaError(errno.ESTALE, f"file {e.ino}: epoch {op['epoch']} < {e.epoch}")
            if op["epoch"] == e.epoch and op["master"] != e.master:
                raise MetaError(errno.EINVAL, "a new master needs a new epoch")
            self.check_config(op["master"], dict(op["members"]), allow_split_master=op.get("force", False))
        elif kind == "noop":
            pass
        else:
            raise MetaError(errno.EINVAL, f"unknown metadata operation {kind!r}")

    @staticmethod
    def check_config(master: str, members: dict[str, str], *, allow_split_master: bool = False) -> None:
        if master not in members:
            raise MetaError(errno.EINVAL, f"master {master} is not a member")
        if members[master] != IN_SYNC and not allow_split_master:
            raise MetaError(errno.EINVAL, f"master {master} is not in sync")
        for n, s in members.items():
            if s not in MEMBER_STATES:
                raise MetaError(errno.EINVAL, f"member {n}: unknown state {s!r}")

    def apply(self, op: dict) -> dict:
        """Applies a checked op; returns its result. Deterministic: same state + op -> same state.
        An op with a request id records its result under it (see the module header)."""
        result = self._apply(op)
        rid = op.get("rid")
        if isinstance(rid, str):
            self.recent[rid] = result
            while len(self.recent) > RECENT_REQUESTS:
                self.recent.popitem(last=False)
        return result

    def answered(self, rid: object) -> dict | None:
        """The result of the op applied for request id `rid`, if it is still recorded."""
        return self.recent.get(rid) if isinstance(rid, str) else None

    def _apply(self, op: dict) -> dict:
        kind = op["op"]
        now = op.get("now", 0)
        if kind in ("mkdir", "create"):
            e = Entry(op["ino"], op["parent"], op["name"], "dir" if kind == "mkdir" else "file",
                      op["mode"] & 0o7777, now, now)
            if kind == "create":
                e.mode &= 0o700  # files hold process memory: never readable by group or others
                e.master = op["master"]
                e.members = dict(op["members"])
                e.epoch = 1
                e.gen = op["gen"]
                e.gens = [op["gen"]]
                e.replicas = op.get("replicas", len(e.members))
            self.entries[e.ino] = e
            self.children[e.parent][e.name] = e.ino
            if e.is_dir:
                self.children[e.ino] = {}
            self.next_ino = max(self.next_ino, e.ino + 1)
            self._touch(op["parent"], now)
            return {"ino": e.ino}
        if kind in ("unlink", "rmdir"):
            ino = self.children[op["parent"]].pop(op["name"])
            e = self.entries.pop(ino)
            if e.is_dir:
                del self.children[ino]
            self._touch(op["parent"], now)
            return {"ino": ino, "removed": e.to_dict()}
        if kind == "rename":
            ino = self.children[op["parent"]].pop(op["name"])
            e = self.entries[ino]
            removed = None
            old = self.children[op["newparent"]].get(op["newname"])
            if old is not None and old != ino:
                r = self.entries.pop(old)
                if r.is_dir:
                    del self.children[old]
                removed = r.to_dict()
            self.children[op["newparent"]][op["newname"]] = ino
            e.parent, e.name = op["newparent"], op["newname"]
            e.ctime_ns = now
            self._touch(op["parent"], now)
            self._touch(op["newparent"], now)
            return {"ino": ino, "removed": removed}
        if kind == "chmod":
            e = self.entries[op["ino"]]
            e.mode = op["mode"] & (0o7777 if e.is_dir else 0o700)
            e.ctime_ns = now
            return {"ino": e.ino}
        if kind == "utime":
            e = self.entries[op["ino"]]
            e.mtime_ns = op["mtime_ns"]
            e.ctime_ns = now
            return {"ino": e.ino}
        if kind == "set_replicas":
            self.entries[op["ino"]].replicas = op["replicas"]
            return {"ino": op["ino"]}
        if kind == "config":
            e = self.entries[op["ino"]]
            before = {"epoch": e.epoch, "master": e.master, "members": dict(e.members)}
            e.epoch = op["epoch"]
            e.master = op["master"]
            e.members = dict(op["members"])
            if op.get("gen") and op["gen"] != e.gen:
                e.gen = op["gen"]
                e.gens = (e.gens + [op["gen"]])[-16:]
            return {"ino": e.ino, "before": before}
        if kind == "noop":
            return {}
        raise MetaError(errno.EINVAL, f"unknown metadata operation {kind!r}")

    def _touch(self, ino: int, now: int) -> None:
        d = self.entries.get(ino)
        if d is not None:
            d.mtime_ns = d.ctime_ns = now

    # -- snapshots --

    def to_dict(self) -> dict:
        return {"next_ino": self.next_ino, "entries": [e.to_dict() for e in self.entries.values()],
                "recent": [[rid, result] for rid, result in self.recent.items()]}

    @classmethod
    def from_dict(cls, d: dict) -> "MetaState":
        st = cls()
        st.entries = {}
        st.children = {}
        for raw in d["entries"]:
            e = Entry.from_dict(raw)
            st.entries[e.ino] = e
            if e.is_dir:
                st.children.setdefault(e.ino, {})
        for e in st.entries.values():
            if e.ino != ROOT:
                st.children.setdefault(e.parent, {})[e.name] = e.ino
        st.next_ino = int(d["next_ino"])
        st.recent = OrderedDict((str(rid), result) for rid, result in d.get("recent", []))
        if ROOT not in st.entries:
            raise ValueError("snapshot has no root")
        return st

    def copy(self) -> "MetaState":
        return copy.deepcopy(self)
