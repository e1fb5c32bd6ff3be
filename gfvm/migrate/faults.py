"""Named fault points of the migration, so tests can fail each step on purpose (RELIABILITY.md
row 8). Same mechanism and actions as the File Manager's (gfvm/fm/faults.py: crash, error,
unavailable, delay:S, hang, stop, with @N and * suffixes), same variable:

    GFVM_FAULT="migrate.after_dump=crash"     (when gfvmd starts)
    control op `migrate.fault` {"name": ..., "action": ...}  (at run time; "" disarms)

`migrate.*` names belong here; the File Manager leaves them alone and vice versa.
"""

from __future__ import annotations

from gfvm.fm.faults import Faults

POINTS = {
    # source side, in the order of the sequence (DESIGN.md steps 1-9)
    "migrate.after_pick": "source: target chosen, process still running",
    "migrate.after_preflush": "source: pre-flush rounds done, process still running",
    "migrate.after_freeze": "source: process frozen, nothing flushed yet",
    "migrate.after_final_flush": "source: dirty pages durable on every replica",
    "migrate.after_release": "source: managed memory dropped from the frozen process",
    "migrate.after_dump": "source: CRIU images written locally, not yet in /gfvm",
    "migrate.after_images": "source: checkpoint committed in /gfvm (replicated)",
    "migrate.before_handoff": "source: target confirmed its copies, epoch not yet moved",
    "migrate.after_handoff": "source: target is master (epoch+1), restore not yet asked",
    "migrate.after_restart": "source: the target runs the process, source not yet cleaned up",
    # target side
    "migrate.target.before_restore": "target: asked to restore, CRIU not started",
    "migrate.target.after_restore": "target: CRIU restored the tree (stopped), not yet adopted",
    "migrate.target.after_adopt": "target: pager owns the memory, process not yet running",
    "migrate.target.after_run": "target: the process runs, source not yet told",
}


def new_faults() -> Faults:
    """A Faults instance for migration points only."""
    return Faults(POINTS)
