"""Running CRIU as a subprocess to dump and restore one managed process tree.

A managed tree is rooted at its PID-namespace init (tini) and shares its node's mount and
network namespaces. CRIU must therefore run inside the node's mount and network namespaces
(gfvmd does; tests pass `wrap=cluster.exec_argv`-style wrappers): namespaces equal to CRIU's own
are not dumped, so the tree's files are reopened by path and its sockets are recreated in the
node CRIU restores on. The PID namespace differs from CRIU's, so it is dumped and recreated: inner
pids (tini 1, the workload 2, ...) survive, host pids change.

Options settled on (see `dump_argv` / `restore_argv`):
  - `-t <tini host pid>`: the whole PID namespace.
  - `--tcp-close` on dump and restore (default): established TCP connections cannot follow the
    process to another node's address; they are restored closed (the application sees errors on
    them and reconnects). Listening sockets are preserved (re-bound on the target, same port).
  - `--skip-in-flight`: connections still in a listening socket's accept queue are dropped
    (clients see a reset) instead of failing the dump.
  - cgroups are not managed by CRIU by default (`manage_cgroups=None`: CRIU's default without
    the option dumps no cgroup image): the restored tree starts in CRIU's cgroup and the caller
    moves it into the node's own cgroup; `freeze_cgroup` tells CRIU the tree is already frozen
    by us (cgroup freezer), as in the migration sequence (verified with the v1 freezer).
  - Every file the tree has open must have been opened inside the node's mount namespace (CRIU
    resolves each fd's mount there: "Can't lookup mount=N" otherwise), stdio included.
  - `-v4` logs into the work directory always; kept on failure (their tail is in the raised
    CriuError), removed on success unless `keep_log`.
  - no `--shell-job`: a managed tree is its own session (setsid inside the namespace), has no
    terminal, and its stdio are files/devnull. Pass `shell_job=True` for a tree with a terminal.
  - Regular files opened for writing must not change size between dump and restore unless
    opened O_WRONLY|O_APPEND (CRIU validates file sizes); logs should be opened for append.
  - On kernels >= 6.16 CRIU < 4.2 runs with a compatibility library (gfvm.migrate.criu_compat).

Not preserved: established TCP connections (closed, see above), anything in another mount or
network namespace than the node's, open files whose paths do not exist on the target.

`dump`/`restore` are async (trio.run_process); `dump_blocking`/`restore_blocking` block.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import trio

from gfvm.config import find_criu
from gfvm.errors import FeatureMissing, GfvmError
from gfvm.migrate import criu_compat
from gfvm.migrate.images import DumpStats, ImageDir, ImageError
from gfvm.migrate.manifest import verify_manifest

Wrap = Callable[[list[str]], list[str]]
LOG_TAIL_LINES = 40
#: CRIU prints this on every run here (no CAP_SYS_RESOURCE); it is harmless
_HARMLESS = ("Can't setup RLIMIT_NOFILE for self",)

# Error-line patterns -> what to tell the user.
_HINTS = [
    (r"Can't get 1:(16|34) opt", "this CRIU cannot dump TCP/UDP sockets on Linux >= 6.16 (needs CRIU >= 4.2 "
     "or gfvm's compatibility library)"),
    (r"has bad size", "a file the process has open changed size since the dump (CRIU checks sizes of "
     "files not opened O_WRONLY|O_APPEND)"),
    (r"session leader of .* is outside", "the tree's session leader is outside its PID namespace "
     "(start it with `setsid` inside the namespace)"),
    (r"Connected TCP socket", "the tree has an established TCP connection (dump with tcp_close=True)"),
    (r"in-flight", "a listening socket has in-flight connections (dump with skip_in_flight=True)"),
    (r"Address already in use", "an address or port the tree listens on is taken on this node"),
    (r"connect to lazy-pages.socket failed|lazy-pages.socket", "no lazy-pages server listens in the work directory"),
    (r"Can't (read|open).*No such file", "an image or a file the tree had open is missing"),
]


class CriuError(GfvmError):
    """`criu` failed. `str()` says what it was doing and why; `log_tail` has the end of its log."""

    kind = "criu"

    def __init__(self, message: str, *, action: str, returncode: int | None, log_path: Path | None,
                 log_tail: str, errors: list[str]) -> None:
        super().__init__(message)
        self.action = action
        self.returncode = returncode
        self.log_path = log_path
        self.log_tail = log_tail
        self.errors = errors


@dataclass
class CriuResult:
    """What a successful CRIU run produced."""

    action: str
    argv: list[str]
    seconds: float  # wall time of the criu process
    log_path: Path | None  # None when the log was removed on success
    root_pid: int | None = None  # restore: host pid of the restored root (tini)
    stats: DumpStats | None = None  # dump: CRIU's own statistics (frozen time, pages written)
    images_bytes: int = 0  # dump: total size of the image directory
    extra: dict = field(default_factory=dict)


def criu_binary() -> str:
    """The CRIU to run (gfvm.config.find_criu); FeatureMissing when there is none."""
    binary = find_criu()
    if binary is None:
        raise FeatureMissing("CRIU is not installed: run deploy/install (it builds CRIU >= 4 when needed)")
    return binary


def become_subreaper() -> None:
    """Makes the calling process a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so that trees
    restored with `detached=True` are re-parented to it and can be reaped (otherwise their
    roots become children of the host's init, which may never reap them). Never blocks."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


# --- argv -------------------------------------------------------------------------------------


def _common(images_dir: Path, work_dir: Path, log_name: str, verbosity: int) -> list[str]:
    return ["-D", str(images_dir), "-W", str(work_dir), "-o", log_name, f"-v{verbosity}"]


def dump_argv(
    criu: str,
    root_pid: int,
    images_dir: Path,
    *,
    work_dir: Path,
    log_name: str = "criu-dump.log",
    verbosity: int = 4,
    leave_running: bool = False,
    leave_stopped: bool = False,
    tcp_close: bool = True,
    skip_in_flight: bool = True,
    shell_job: bool = False,
    file_locks: bool = False,
    lazy_pages: bool = False,
    page_server: tuple[str, int] | None = None,
    freeze_cgroup: str | None = None,
    manage_cgroups: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The `criu dump` command line for the tree rooted at host pid `root_pid` (pure)."""
    if leave_running and leave_stopped:
        raise ValueError("leave_running and leave_stopped exclude each other")
    argv = [criu, "dump", "-t", str(root_pid), *_common(images_dir, work_dir, log_name, verbosity)]
    if leave_running:
        argv.append("--leave-running")
    if leave_stopped:
        argv.append("--leave-stopped")
    if tcp_close:
        argv.append("--tcp-close")
    if skip_in_flight:
        argv.append("--skip-in-flight")
    if shell_job:
        argv.append("--shell-job")
    if file_locks:
        argv.append("--file-locks")
    if lazy_pages:
        argv.append("--lazy-pages")
    if page_server is not None:
        argv += ["--page-server", "--address", page_server[0], "--port", str(page_server[1])]
    if freeze_cgroup:
        argv += ["--freeze-cgroup", freeze_cgroup]
    if manage_cgroups:
        argv += [f"--manage-cgroups={manage_cgroups}"]
    return argv + list(extra)


def restore_argv(
    criu: str,
    images_dir: Path,
    *,
    work_dir: Path,
    pidfile: Path | None,
    log_name: str = "criu-restore.log",
    verbosity: int = 4,
    detached: bool = True,
    lazy_pages: bool = False,
    tcp_close: bool = True,
    shell_job: bool = False,
    file_locks: bool = False,
    manage_cgroups: str | None = None,
    cgroup_root: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The `criu restore` command line (pure)."""
    argv = [criu, "restore", *_common(images_dir, work_dir, log_name, verbosity)]
    if detached:
        argv.append("--restore-detached")
    if pidfile is not None:
        argv += ["--pidfile", str(pidfile)]
    if lazy_pages:
        argv.append("--lazy-pages")
    if tcp_close:
        argv.append("--tcp-close")
    if shell_job:
        argv.append("--shell-job")
    if file_locks:
        argv.append("--file-locks")
    if manage_cgroups:
        argv += [f"--manage-cgroups={manage_cgroups}"]
    if cgroup_root:
        argv += ["--cgroup-root", cgroup_root]
    return argv + list(extra)


# --- errors -----------------------------------------------------------------------------------


def read_log_errors(log_path: Path) -> tuple[list[str], str]:
    """(meaningful "Error" lines, last LOG_TAIL_LINES lines) of a CRIU log (blocking read)."""
    try:
        text = log_path.read_text(errors="replace")
    except FileNotFoundError:
        return [], ""
    lines = text.splitlines()
    errors = [
        line.strip()
        for line in lines
        if re.search(r"\bError \(", line) and not any(h in line for h in _HARMLESS)
    ]
    return errors, "\n".join(lines[-LOG_TAIL_LINES:])


def _criu_failure(action: str, returncode: int | None, log_path: Path, stderr: str) -> CriuError:
    errors, tail = read_log_errors(log_path)
    first = errors[0] if errors else (stderr.strip().splitlines() or ["no error in its log"])[-1]
    first = re.sub(r"^\(\s*[\d.]+\)\s*", "", first)
    hint = next((h for pattern, h in _HINTS if any(re.search(pattern, e) for e in errors)), None)
    msg = f"criu {action} failed (exit {returncode}): {first}"
    if hint:
        msg += f" -- {hint}"
    msg += f" [log: {log_path}]"
    return CriuError(msg, action=action, returncode=returncode, log_path=log_path,
                     log_tail=tail or stderr[-4000:], errors=errors)


# --- running ----------------------------------------------------------------------------------


@dataclass
class _Plan:
    action: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    keep_log: bool


def _prepare_dump(root_pid: int, images_dir, work_dir, wrap: Wrap | None, keep_log: bool, kw) -> _Plan:
    criu = criu_binary()
    images_dir = Path(images_dir)
    work_dir = Path(work_dir) if work_dir is not None else images_dir
    images_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    if any(p.suffix == ".img" for p in images_dir.iterdir()):
        raise GfvmError(f"{images_dir} already holds images: dump into an empty directory")
    argv = dump_argv(criu, root_pid, images_dir, work_dir=work_dir, **kw)
    env = {**os.environ, **criu_compat.dump_env(criu)}
    if wrap is not None:
        argv = wrap(argv)
    log_name = kw.get("log_name", "criu-dump.log")
    return _Plan("dump", argv, env, work_dir / log_name, keep_log)


def _prepare_restore(images_dir, work_dir, pidfile, wrap: Wrap | None, keep_log: bool,
                     require_manifest: bool, kw) -> tuple[_Plan, Path]:
    criu = criu_binary()
    images_dir = Path(images_dir)
    work_dir = Path(work_dir) if work_dir is not None else images_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    if require_manifest:
        verify_manifest(images_dir)
    pidfile = Path(pidfile) if pidfile is not None else work_dir / "restored-root.pid"
    pidfile.unlink(missing_ok=True)
    argv = restore_argv(criu, images_dir, work_dir=work_dir, pidfile=pidfile, **kw)
    if wrap is not None:
        argv = wrap(argv)
    log_name = kw.get("log_name", "criu-restore.log")
    return _Plan("restore", argv, dict(os.environ), work_dir / log_name, keep_log), pidfile


def _finish(plan: _Plan, returncode: int, stderr: str, seconds: float) -> CriuResult:
    if returncode != 0:
        raise _criu_failure(plan.action, returncode, plan.log_path, stderr)
    log_path: Path | None = plan.log_path
    if not plan.keep_log:
        plan.log_path.unlink(missing_ok=True)
        log_path = None
    return CriuResult(plan.action, plan.argv, seconds, log_path)


def _dump_result(result: CriuResult, images_dir: Path) -> CriuResult:
    images_dir = Path(images_dir)
    result.images_bytes = sum(p.stat().st_size for p in images_dir.iterdir() if p.is_file())
    try:
        result.stats = ImageDir(images_dir).dump_stats()
    except ImageError:
        result.stats = None
    return result


def _restore_result(result: CriuResult, pidfile: Path, detached: bool) -> CriuResult:
    if detached:
        try:
            result.root_pid = int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError) as exc:
            raise GfvmError(f"criu restore succeeded but left no usable pid file {pidfile}: {exc}") from None
    return result


async def _run_async(plan: _Plan, deliver_cancel=None) -> tuple[int, str, float]:
    start = time.monotonic()
    extra = {"deliver_cancel": deliver_cancel} if deliver_cancel is not None else {}
    proc = await trio.run_process(
        plan.argv, env=plan.env, stdin=subprocess.DEVNULL, capture_stdout=True,
        capture_stderr=True, check=False, **extra,
    )
    return proc.returncode, proc.stderr.decode(errors="replace"), time.monotonic() - start


def _run_blocking(plan: _Plan) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = subprocess.run(plan.argv, env=plan.env, stdin=subprocess.DEVNULL, capture_output=True)
    return proc.returncode, proc.stderr.decode(errors="replace"), time.monotonic() - start


async def dump(root_pid: int, images_dir: str | os.PathLike, *, work_dir: str | os.PathLike | None = None,
               wrap: Wrap | None = None, keep_log: bool = False, **options) -> CriuResult:
    """Dumps the tree rooted at host pid `root_pid` into the empty directory `images_dir`.

    Async: runs `criu dump` with trio.run_process; cancelling kills CRIU (the tree is then left
    as CRIU leaves it on SIGTERM: usually running). `options` are dump_argv's keywords
    (leave_running, leave_stopped, tcp_close, skip_in_flight, lazy_pages, page_server,
    freeze_cgroup, manage_cgroups, shell_job, file_locks, verbosity, extra). By default the tree
    is killed after a successful dump (CRIU's default). Raises CriuError on failure.
    """
    plan = await trio.to_thread.run_sync(_prepare_dump, root_pid, images_dir, work_dir, wrap, keep_log, options)
    rc, stderr, seconds = await _run_async(plan)
    result = await trio.to_thread.run_sync(_finish, plan, rc, stderr, seconds)
    return await trio.to_thread.run_sync(_dump_result, result, Path(images_dir))


def dump_blocking(root_pid: int, images_dir: str | os.PathLike, *, work_dir: str | os.PathLike | None = None,
                  wrap: Wrap | None = None, keep_log: bool = False, **options) -> CriuResult:
    """`dump`, blocking the calling thread until CRIU exits."""
    plan = _prepare_dump(root_pid, images_dir, work_dir, wrap, keep_log, options)
    return _dump_result(_finish(plan, *_run_blocking(plan)), Path(images_dir))


async def restore(images_dir: str | os.PathLike, *, work_dir: str | os.PathLike | None = None,
                  pidfile: str | os.PathLike | None = None, detached: bool = True,
                  require_manifest: bool = True, wrap: Wrap | None = None, keep_log: bool = False,
                  **options) -> CriuResult:
    """Restores the tree dumped in `images_dir`; returns with `root_pid` set (detached).

    Async (trio.run_process). With `require_manifest` (the default) the checkpoint is restored
    only if its manifest verifies (gfvm.migrate.manifest); pass False for images gfvm did not
    commit (baselines, tests). With `lazy_pages=True` a lazy-pages server must already listen on
    `<work_dir>/lazy-pages.socket` (gfvm.migrate.lazypages) and keep serving while this runs.
    With `detached` the restored root is re-parented when CRIU exits: call `become_subreaper()`
    first so it becomes the caller's child. `options` are restore_argv's keywords. Cancelling
    kills the tasks restored so far, then CRIU. Raises CriuError (or ManifestError) on failure.
    """
    plan, pidfile_path = await trio.to_thread.run_sync(
        _prepare_restore, images_dir, work_dir, pidfile, wrap, keep_log, require_manifest,
        dict(options, detached=detached),
    )
    rc, stderr, seconds = await _run_async(plan, _kill_restore)
    result = await trio.to_thread.run_sync(_finish, plan, rc, stderr, seconds)
    return _restore_result(result, pidfile_path, detached)


async def _kill_restore(proc) -> None:
    """A cancelled restore: the tasks CRIU restored so far (its descendants: the tree's root,
    init of its own PID namespace) are killed before CRIU itself, so that no half-restored copy of the
    process outlives it."""
    import signal

    found, todo = [], [proc.pid]
    while todo:  # CRIU may run under a wrapper: every descendant, the restored root among them
        kids = _children(todo.pop())
        found += kids
        todo += kids
    for child in found:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return out


def restore_blocking(images_dir: str | os.PathLike, *, work_dir: str | os.PathLike | None = None,
                     pidfile: str | os.PathLike | None = None, detached: bool = True,
                     require_manifest: bool = True, wrap: Wrap | None = None, keep_log: bool = False,
                     **options) -> CriuResult:
    """`restore`, blocking the calling thread until CRIU exits."""
    plan, pidfile_path = _prepare_restore(images_dir, work_dir, pidfile, wrap, keep_log, require_manifest,
                                          dict(options, detached=detached))
    return _restore_result(_finish(plan, *_run_blocking(plan)), pidfile_path, detached)
