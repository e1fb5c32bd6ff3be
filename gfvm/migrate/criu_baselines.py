"""The CRIU baselines the migration benchmark runs next to gfvm (DESIGN.md, "Baselines"), between
two nodes of a namespace cluster:

  - stop-and-copy: `criu dump` on the source with `--page-server` to a `criu page-server` on the
    target (or dump locally and copy every image), copy the remaining images to the target over
    TCP, `criu restore` there. The process is frozen from the start of the dump until the restore
    returns, and every page crosses the network during that time.
  - lazy post-copy (Copy-On-Reference): `criu dump --lazy-pages` on the source (CRIU stays behind
    as a page server), copy the non-memory images, `criu lazy-pages --page-server` + `criu restore
    --lazy-pages` on the target; pages follow on demand and in the background. CRIU's page server
    needs fs.pipe-max-size raised on this machine (PLATFORM.md); it is raised for the run and put
    back afterwards.
  - pre-copy: needs soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY), absent here: reported as
    unsupported, never run.

Measures: freeze time (dump start -> restored tree running on the target), total time (until
every page is on the target), bytes that crossed the network (the source node's link counters,
all of them and during the freeze), and each step's time. The image copy is a plain TCP stream
between the two nodes' namespaces (`python -m gfvm.migrate.imgcopy send|recv`).

`cluster` is a gfvm.cluster.Cluster (anything with `exec_argv(node, argv)` and
`node(name).address/.veth`). Everything here blocks (seconds); run it on a worker thread on trio.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gfvm.errors import GfvmError
from gfvm.migrate import criu, criu_compat
from gfvm.migrate.images import ImageDir

PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")
LAZY_PIPE_MAX = 4 << 20
SOFT_DIRTY_REASON = "CRIU pre-copy needs soft-dirty memory tracking (CONFIG_MEM_SOFT_DIRTY), which this kernel lacks"


@dataclass
class BaselineResult:
    """One baseline run; times in seconds, sizes in bytes."""

    method: str
    supported: bool = True
    reason: str | None = None
    freeze_seconds: float | None = None
    total_seconds: float | None = None
    bytes_moved: int | None = None  # crossed the source node's link, whole run
    bytes_moved_during_freeze: int | None = None
    steps: dict = field(default_factory=dict)  # step -> seconds
    criu_frozen_ms: float | None = None  # CRIU's own frozen_time from stats-dump
    images_bytes: int | None = None  # what the target received as image files
    root_pid: int | None = None  # the restored root's host pid on the target

    def as_dict(self) -> dict:
        return asdict(self)


def pre_copy(*_args, **_kwargs) -> BaselineResult:
    """CRIU pre-copy cannot run here; returns the result saying so (never blocks)."""
    return BaselineResult("criu-pre-copy", supported=False, reason=SOFT_DIRTY_REASON)


# --- helpers -------------------------------------------------------------------------------------


def _link_bytes(cluster, node: str) -> int:
    """Bytes that crossed `node`'s link so far (both directions, host side of its veth)."""
    base = Path("/sys/class/net") / cluster.node(node).veth / "statistics"
    return int((base / "rx_bytes").read_text()) + int((base / "tx_bytes").read_text())


def _free_port() -> int:
    # Ports inside a node's own network namespace: nothing else of ours uses this range there.
    return random.randint(20000, 60000)


def _start_ready(argv: list[str], *, env: dict | None = None, timeout: float = 60.0,
                 log: Path | None = None) -> subprocess.Popen:
    """Starts a CRIU service with `--status-fd` appended; returns once it wrote its ready byte."""
    r, w = os.pipe()
    try:
        out = open(log, "ab") if log else subprocess.DEVNULL
        proc = subprocess.Popen(argv + ["--status-fd", str(w)], pass_fds=(w,), env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        if log:
            out.close()
    finally:
        os.close(w)
    try:
        import select

        ready, _, _ = select.select([r], [], [], timeout)
        if not ready or os.read(r, 1) != b"\0":
            proc.kill()
            proc.wait()
            raise GfvmError(f"`{' '.join(argv[:3])}` did not become ready (exit {proc.returncode})")
    finally:
        os.close(r)
    return proc


def _copy_images(cluster, src_node: str, src_dir: Path, dst_node: str, dst_dir: Path) -> int:
    """Copies every file of src_dir into dst_dir over TCP between the two nodes; returns bytes."""
    port = _free_port()
    here = [sys.executable, "-P", "-m", "gfvm.migrate.imgcopy"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    receiver = _start_plain(cluster.exec_argv(dst_node, [*here, "recv", str(dst_dir), str(port)]), env)
    try:
        host = cluster.node(dst_node).address
        proc = subprocess.run(cluster.exec_argv(src_node, [*here, "send", str(src_dir), host, str(port)]),
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise GfvmError(f"image copy failed: {proc.stderr.strip()}")
        if receiver.wait(60) != 0:
            raise GfvmError("image receiver failed")
        return int(proc.stdout.strip() or 0)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()


def _start_plain(argv: list[str], env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if line.strip() != b"ready":
        proc.kill()
        proc.wait()
        raise GfvmError("image receiver did not start")
    return proc


@contextlib.contextmanager
def raised_pipe_max_size(value: int = LAZY_PIPE_MAX):
    """fs.pipe-max-size at least `value` inside the block, put back afterwards (CRIU's page
    server tees 64 KiB+ pipes; unprivileged-by-default sizes make it fail with EPERM here)."""
    old = PIPE_MAX_SIZE.read_text().strip()
    if int(old) >= value:
        yield
        return
    PIPE_MAX_SIZE.write_text(str(value))
    try:
        yield
    finally:
        PIPE_MAX_SIZE.write_text(old)


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


# --- stop-and-copy -------------------------------------------------------------------------------------


def stop_and_copy(cluster, src_node: str, dst_node: str, root_pid: int, work: Path, *,
                  page_server: bool = True) -> BaselineResult:
    """CRIU stop-and-copy of the tree rooted at host pid `root_pid` from `src_node` to `dst_node`
    (blocking). `work` gets src/ and dst/ image directories. The tree is killed on the source
    and left running on the target (`root_pid` of the result)."""
    binary = criu.criu_binary()
    src, dst = Path(work) / "src", Path(work) / "dst"
    src.mkdir(parents=True)
    dst.mkdir(parents=True)
    result = BaselineResult("criu-stop-and-copy" + ("" if page_server else "-image-copy"))
    server = None
    link0 = _link_bytes(cluster, src_node)
    try:
        port = _free_port()
        if page_server:
            server = _start_ready(cluster.exec_argv(dst_node, [
                binary, "page-server", "-D", str(dst), "-W", str(dst), "-o", "page-server.log", "-v4",
                "--address", cluster.node(dst_node).address, "--port", str(port)]), log=work / "page-server.out")
        t0 = time.monotonic()
        criu.dump_blocking(
            root_pid, src, wrap=lambda a: cluster.exec_argv(src_node, a),
            page_server=(cluster.node(dst_node).address, port) if page_server else None)
        t1 = time.monotonic()
        if server is not None:
            server.wait(60)
        _copy_images(cluster, src_node, src, dst_node, dst)
        t2 = time.monotonic()
        restored = criu.restore_blocking(dst, work_dir=Path(work) / "dst-work", require_manifest=False,
                                         wrap=lambda a: cluster.exec_argv(dst_node, a))
        t3 = time.monotonic()
        moved = _link_bytes(cluster, src_node) - link0
        stats = ImageDir(src).dump_stats()
        result.freeze_seconds = t3 - t0
        result.total_seconds = t3 - t0
        result.bytes_moved = result.bytes_moved_during_freeze = moved
        result.steps = {"dump": t1 - t0, "copy_images": t2 - t1, "restore": t3 - t2}
        result.criu_frozen_ms = stats.frozen_time / 1000 if stats else None
        result.images_bytes = sum(p.stat().st_size for p in dst.iterdir() if p.is_file())
        result.root_pid = restored.root_pid
        return result
    finally:
        _kill(server)


# --- lazy post-copy -----------------------------------------------------------------------------------


def lazy_post_copy(cluster, src_node: str, dst_node: str, root_pid: int, work: Path, *,
                   timeout: float = 600.0) -> BaselineResult:
    """CRIU lazy post-copy (Copy-On-Reference) of the tree from `src_node` to `dst_node`
    (blocking until every page has been transferred and CRIU's helpers have exited)."""
    binary = criu.criu_binary()
    src, dst, dst_work = Path(work) / "src", Path(work) / "dst", Path(work) / "dst-work"
    for d in (src, dst, dst_work):
        d.mkdir(parents=True)
    result = BaselineResult("criu-lazy-post-copy")
    source = daemon = None
    src_addr = cluster.node(src_node).address
    with raised_pipe_max_size():
        link0 = _link_bytes(cluster, src_node)
        try:
            port = _free_port()
            dump_argv = criu.dump_argv(binary, root_pid, src, work_dir=src, lazy_pages=True,
                                       extra=["--address", src_addr, "--port", str(port)])
            t0 = time.monotonic()
            # The dump returns only when every page has been pulled: it reports ready (status fd)
            # once the non-memory images are written and its page server listens.
            source = _start_ready(cluster.exec_argv(src_node, dump_argv),
                                  env={**os.environ, **criu_compat.dump_env(binary)}, log=work / "dump.out")
            t1 = time.monotonic()
            _copy_images(cluster, src_node, src, dst_node, dst)
            t2 = time.monotonic()
            daemon = _start_ready(cluster.exec_argv(dst_node, [
                binary, "lazy-pages", "--page-server", "--address", src_addr, "--port", str(port),
                "-D", str(dst), "-W", str(dst_work), "-o", "lazy-pages.log", "-v4"]), log=work / "lazy.out")
            restored = criu.restore_blocking(dst, work_dir=dst_work, lazy_pages=True, require_manifest=False,
                                             wrap=lambda a: cluster.exec_argv(dst_node, a))
            t3 = time.monotonic()
            during_freeze = _link_bytes(cluster, src_node) - link0
            rc_daemon = daemon.wait(timeout)
            rc_source = source.wait(timeout)
            t4 = time.monotonic()
            if rc_daemon != 0 or rc_source != 0:
                raise GfvmError(f"lazy transfer failed (lazy-pages exit {rc_daemon}, dump exit {rc_source}); "
                                f"logs in {dst_work} and {src}")
            result.freeze_seconds = t3 - t0
            result.total_seconds = t4 - t0
            result.bytes_moved = _link_bytes(cluster, src_node) - link0
            result.bytes_moved_during_freeze = during_freeze
            result.steps = {"dump": t1 - t0, "copy_images": t2 - t1, "restore": t3 - t2, "page_transfer": t4 - t3}
            # criu_frozen_ms stays None: CRIU's frozen_time of a lazy dump spans the page transfer.
            result.images_bytes = sum(p.stat().st_size for p in dst.iterdir() if p.is_file())
            result.root_pid = restored.root_pid
            return result
        finally:
            _kill(daemon)
            _kill(source)
