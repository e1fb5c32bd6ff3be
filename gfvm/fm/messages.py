"""The File Manager's peer messages (type codes 0x1000-0x1FFF), declared with gfvm.wire.

Two families:
- metadata consensus (0x10xx): leader election, replication of metadata ops, heartbeats+leases;
  op and snapshot payloads are JSON (zlib for snapshots), checked again by `MetaState.check` /
  `MetaState.from_dict` when applied;
- file data (0x11xx): replication master -> members (ordered per connection), and requests any
  node sends to a file's master (forwarded reads/writes) or to a member (probe, chunk fetch).

Every data frame carries (fid, epoch): a receiver refuses an epoch older than the one its
metadata knows (fencing, RELIABILITY.md "epoch as fencing token").
"""

from __future__ import annotations

from gfvm import wire
from gfvm.fm.store import MAX_FILE_SIZE
from gfvm.wire import U32, U64, Bool, Bytes, List, NodeName, Str, Text

MAX_DATA = 1 << 20  # page data per frame (the pager's batches are split to this)
MAX_OP = 1 << 20  # one metadata op (JSON)
MAX_SNAPSHOT = 3 << 20  # a compressed metadata snapshot (below the 4 MiB frame cap)
MAX_CHUNK_PAGES = MAX_DATA // 4096
Gen = Str(64)
#: rid of a response built before it is known; the peer layer sets the real one when sending
PENDING = (1 << 64) - 1
NodeOrEmpty = Str(31)


def _check_span(offset: int, length: int) -> None:
    if offset + length > MAX_FILE_SIZE:
        raise ValueError(f"range {offset}+{length} ends past the file size limit")


def _check_pages(offsets: tuple[int, ...], data) -> None:
    if len(data) != 4096 * len(offsets):
        raise ValueError(f"{len(offsets)} pages need {4096 * len(offsets)} bytes of data")
    if not offsets:
        return
    if any(off & 4095 for off in offsets):
        off = next(off for off in offsets if off & 4095)
        raise ValueError(f"page offset {off} is not a multiple of 4096")
    _check_span(max(offsets), 4096)


# --- metadata consensus --------------------------------------------------------------------------


@wire.request(0x1001)
class MetaAppend:
    """Leader -> follower: apply `op` as version op_version on top of prev; empty op: heartbeat."""

    term: U64
    leader: NodeName
    prev_term: U64
    prev_version: U64
    op_term: U64
    op_version: U64
    op: Bytes(MAX_OP)
    commit_term: U64
    commit_version: U64


@wire.response(0x1002)
class MetaAck:
    term: U64
    ok: Bool
    last_term: U64
    last_version: U64


@wire.request(0x1003)
class MetaInstall:
    """Leader -> follower: replace your metadata with this snapshot (zlib-compressed JSON)."""

    term: U64
    leader: NodeName
    last_term: U64
    last_version: U64
    commit_term: U64
    commit_version: U64
    state: Bytes(MAX_SNAPSHOT)


@wire.request(0x1004)
class VoteRequest:
    """`pre`: a pre-vote (Raft's PreVote): would you vote for me in `term`? Changes nothing at
    the voter, so a node that cannot win (cut off, or with old metadata) never disturbs a term."""

    term: U64
    candidate: NodeName
    last_term: U64
    last_version: U64
    pre: Bool


@wire.response(0x1005)
class VoteReply:
    term: U64
    granted: Bool


@wire.request(0x1006)
class MetaSubmit:
    """Any node -> leader: run this metadata request (JSON) through the log."""

    op: Bytes(MAX_OP)


@wire.response(0x1007)
class MetaSubmitted:
    term: U64
    version: U64
    result: Bytes(MAX_OP)


@wire.request(0x1008)
class Heartbeat:
    """Every node -> every node, every heartbeat interval: liveness, usage, and (to the leader)
    a lease request. The lease the reply grants runs from when *this* request was sent."""

    node: NodeName
    incarnation: U64
    term: U64
    last_term: U64
    last_version: U64
    used: U64
    free: U64
    hears: List(NodeName, 64)  # the nodes the sender heard from lately (itself included)


@wire.response(0x1009)
class HeartbeatReply:
    node: NodeName
    incarnation: U64
    term: U64
    leader: NodeOrEmpty
    last_term: U64
    last_version: U64
    commit_term: U64
    commit_version: U64
    used: U64
    free: U64
    lease: Bool
    hears: List(NodeName, 64)


# --- file data: master -> members (one ordered stream per peer) ---------------------------------
# One-way frames, applied by the member in the order sent; each is answered by a one-way ReplAck
# carrying its `token` (0 errno: applied). See gfvm.fm.peers.


@wire.oneway(0x1101)
class ReplWrite:
    fid: U64
    epoch: U64
    seq: U64
    token: U64
    offset: U64
    data: Bytes(MAX_DATA)

    def validate(self) -> None:
        _check_span(self.offset, len(self.data))


@wire.oneway(0x1106)
class ReplPages:
    """Whole pages at scattered offsets: page i of `data` goes to offsets[i] (the pager's batches)."""

    fid: U64
    epoch: U64
    seq: U64
    token: U64
    offsets: List(U64, MAX_CHUNK_PAGES)
    data: Bytes(MAX_DATA)

    def validate(self) -> None:
        _check_pages(self.offsets, self.data)


@wire.oneway(0x1102)
class ReplTruncate:
    fid: U64
    epoch: U64
    seq: U64
    token: U64
    size: U64

    def validate(self) -> None:
        _check_span(self.size, 0)


@wire.oneway(0x1103)
class ReplFlush:
    """Make everything before this frame durable and record generation `gen` (DRBD's FLUSH).
    Also confirms the member as an up-to-date copy for `epoch` (it may then serve reads)."""

    fid: U64
    epoch: U64
    seq: U64
    token: U64
    gen: Gen
    flush_id: U64  # numbers this flush (master incarnation << 32 | counter)
    clear_id: U64  # the latest flush every in-sync copy completed: hot extents before it may go


@wire.oneway(0x1104)
class ReplChunk:
    """One resync chunk with the source's page sums; `size`: file size at the source."""

    fid: U64
    epoch: U64
    token: U64
    chunk: U64
    size: U64
    data: Bytes(MAX_DATA)
    sums: List(U32, MAX_CHUNK_PAGES)

    def validate(self) -> None:
        from gfvm.fm.store import CHUNK_SHIFT

        _check_span(self.chunk << CHUNK_SHIFT, len(self.data))
        if len(self.sums) != (len(self.data) + 4095) // 4096:
            raise ValueError("one sum per page of data expected")


@wire.oneway(0x1105)
class ResyncStart:
    """A resync begins: `full`: drop your data first. Sets the member's size to `size`."""

    fid: U64
    epoch: U64
    token: U64
    size: U64
    full: Bool


@wire.oneway(0x1110)
class ReplAck:
    """Member -> master on the master's channel: frame `token` of file `fid` applied (errno 0)
    or refused (errno, reason)."""

    fid: U64
    token: U64
    errno: U32
    reason: Text


# --- file data: requests to a master or a member -------------------------------------------------


@wire.request(0x1120)
class ClientRead:
    fid: U64
    offset: U64
    length: U32

    def validate(self) -> None:
        if self.length > MAX_DATA:
            raise ValueError(f"read of {self.length} bytes exceeds {MAX_DATA}")
        _check_span(self.offset, 0)


@wire.response(0x1121)
class ReadReply:
    size: U64
    data: Bytes(MAX_DATA)


@wire.request(0x1122)
class ClientWrite:
    fid: U64
    offset: U64
    data: Bytes(MAX_DATA)

    def validate(self) -> None:
        _check_span(self.offset, len(self.data))


@wire.request(0x112F)
class ClientPages:
    fid: U64
    offsets: List(U64, MAX_CHUNK_PAGES)
    data: Bytes(MAX_DATA)

    def validate(self) -> None:
        _check_pages(self.offsets, self.data)


@wire.request(0x1123)
class ClientTruncate:
    fid: U64
    size: U64

    def validate(self) -> None:
        _check_span(self.size, 0)


@wire.request(0x1124)
class ClientFsync:
    fid: U64


@wire.request(0x1125)
class FileStat:
    fid: U64


@wire.response(0x1126)
class FileStatReply:
    size: U64
    mtime_ns: U64
    seq: U64


@wire.request(0x1127)
class Probe:
    """Master -> member: what do you hold of this file?"""

    fid: U64
    epoch: U64


@wire.response(0x1128)
class ProbeReply:
    exists: Bool
    usable: Bool
    gen: Gen
    epoch: U64
    seq: U64
    size: U64
    hot_known: Bool
    hot_chunks: List(U64, 1 << 20)


@wire.request(0x1129)
class FetchChunk:
    """Ask an in-sync member for one chunk, verified at its end (repair, hot-extent recovery)."""

    fid: U64
    chunk: U64


@wire.response(0x112A)
class ChunkReply:
    size: U64
    data: Bytes(MAX_DATA)
    sums: List(U32, MAX_CHUNK_PAGES)


@wire.request(0x112B)
class Promote:
    """To a file's master: hand mastership to `target` (force: even if it is not in sync)."""

    fid: U64
    target: NodeName
    force: Bool


@wire.response(0x112C)
class Done:
    """A request that returns nothing but success."""

    value: U64


@wire.request(0x1130)
class CopyLost:
    """Member -> master: my copy of this file is missing or damaged; resync me."""

    fid: U64
    reason: Text


@wire.request(0x112D)
class NodeStatus:
    """Any node -> any node: your status (for `gfvm status`)."""

    verbose: Bool


@wire.response(0x112E)
class NodeStatusReply:
    json: Bytes(MAX_OP)
