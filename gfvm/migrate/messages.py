"""Migration's peer messages (type codes 0x2000-0x2FFF), carried on the File Manager's
authenticated channels (gfvm/fm/peers.py; `FileManager.request_handlers` routes them here).

The source's gfvmd drives a migration; the target's answers. One request per step:

    MigProbe         source -> candidates   can you take it? free memory, disk, load
    MigPrepare       source -> target       reserve the migration; what will be restored
    MigHandoffCheck  source -> target       do you hold an in-sync copy of these files, with the
                                            paging-file index at least this long? (before epoch+1)
    MigRestore       source -> target       restore it (while the files are promoted to you)
    MigCommit        source -> target       the handoff is done: commit and run it
    MigAbort         source -> target       forget it (kill what you restored, if anything)
    MigQuery         anyone -> target       what do you know about this migration? (recovery)

Every request is answered by `MigDone` (JSON details, validated by the receiver) or a wire
`ErrorReply` whose text is a sentence for the user. Structured details travel as JSON because
they are reports (timings, pids) read by people and `--json` output, not protocol state: every
value the receiver acts on is re-checked there (gfvm/migrate/service.py).
"""

from __future__ import annotations

from gfvm import wire
from gfvm.wire import U64, Bool, Bytes, List, Name, NodeName, RelPath, Text  # noqa: F401

MAX_JSON = 1 << 20


@wire.request(0x2001)
class MigProbe:
    """May the receiver become the target of `gfvm_id`, which needs this much memory and disk?"""

    gfvm_id: Name
    need_memory: U64
    need_disk: U64


@wire.response(0x2002)
class MigProbeReply:
    mem_available: U64  # bytes (MemAvailable)
    disk_free: U64  # bytes free where the File Manager stores copies
    managed: U64  # managed process trees on that node
    refusal: Text  # empty when it could take the process; else why not (a sentence)


@wire.request(0x2003)
class MigPrepare:
    """The receiver is chosen as target. `spec` (JSON): name, cmd, asids, log_path, log_tail,
    need_memory, need_disk, remote (a non-replica target: Flushing)."""

    gfvm_id: Name
    source: NodeName
    spec: Bytes(MAX_JSON)


@wire.request(0x2005)
class MigHandoffCheck:
    """Before epoch+1: does the receiver hold an in-sync, locally readable copy of every file in
    `paths`, with the paging-file index at least `index_bytes` long?"""

    gfvm_id: Name
    paths: List(RelPath, 64)
    index_path: RelPath
    index_bytes: U64


@wire.request(0x2007)
class MigRestore:
    """The receiver is master of the process's files now: restore the checkpoint and run it.
    `spec` (JSON): ckpt path, hot ranges to prefetch, prefetch mode."""

    gfvm_id: Name
    spec: Bytes(MAX_JSON)


@wire.request(0x200D)
class MigCommit:
    """The handoff is done (the receiver is master of the process's files): once restored, it
    may commit and run the process."""

    gfvm_id: Name


@wire.request(0x2009)
class MigAbort:
    gfvm_id: Name
    reason: Text


@wire.request(0x200B)
class MigQuery:
    gfvm_id: Name


@wire.response(0x2010)
class MigDone:
    ok: Bool
    info: Bytes(MAX_JSON)  # JSON object


__all__ = [
    "MigProbe",
    "MigProbeReply",
    "MigPrepare",
    "MigHandoffCheck",
    "MigRestore",
    "MigCommit",
    "MigAbort",
    "MigQuery",
    "MigDone",
]
