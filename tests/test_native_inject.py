"""ptrace stop and syscall injection (gfvm.native.Tracer) on real processes in every state:
running, blocked in read() / nanosleep(), SIGSTOP'd, multi-threaded, cgroup-v2-frozen. After
each injection the target must carry on exactly: same registers, same signal mask, its blocked
syscall completes (no EINTR), its memory checks out."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from native_support import PAGE, page_bytes, require_root

from gfvm import native

pytest_plugins = ["native_fixtures"]  # start_target, target_binary, tracer

CGROUP2 = Path("/sys/fs/cgroup/unified")


def task_state(pid: int, tid: int) -> str:
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_running_target_keeps_running_with_exact_registers(start_target, tracer):
    t = start_target(8)
    t.send("spin 400")
    time.sleep(0.1)
    tracer.stop_process(t.pid)
    before = tracer.registers(t.pid)
    assert before.orig_rax == 2**64 - 1  # interrupted in user mode
    assert tracer.syscall(t.pid, native.SYS_getpid) == t.pid
    assert tracer.registers(t.pid) == before
    tracer.resume_process(t.pid)
    assert t.read_line().startswith("ok ")
    assert t.cmd("verify") == "ok 8"


def test_blocked_read_restarts_after_injection(start_target, tracer):
    t = start_target(8)
    assert t.wait_state("S") == "S"  # waiting for a command in read(0)
    tracer.stop_process(t.pid)
    before = tracer.registers(t.pid)
    assert before.orig_rax == 0  # read
    assert before.rax == 2**64 - 512  # -ERESTARTSYS
    results = tracer.inject(t.pid, [(native.SYS_getpid,), (native.SYS_close, 999)])
    assert results == [t.pid, -errno.EBADF]
    assert tracer.registers(t.pid) == before
    tracer.resume_process(t.pid)
    assert t.wait_state("S") == "S"
    assert t.cmd("verify") == "ok 8"  # the read got our command: restarted, no EINTR


def test_blocked_nanosleep_completes_its_full_time(start_target, tracer):
    t = start_target(8)
    t.send("sleep 600")
    time.sleep(0.15)
    tracer.stop_process(t.pid)
    before = tracer.registers(t.pid)
    assert before.rax == 2**64 - 516  # -ERESTART_RESTARTBLOCK: resumes via restart_syscall
    assert tracer.syscall(t.pid, native.SYS_getpid) == t.pid
    tracer.resume_process(t.pid)
    word, elapsed = t.read_line().split()
    assert word == "ok" and int(elapsed) >= 600


def test_sigstopped_target_stays_stopped(start_target, tracer):
    t = start_target(8)
    os.kill(t.pid, signal.SIGSTOP)
    assert t.wait_state("T") == "T"
    with tracer.stopped(t.pid):
        assert tracer.syscall(t.pid, native.SYS_getpid) == t.pid
    time.sleep(0.05)
    assert t.state() == "T"  # still in its group stop
    os.kill(t.pid, signal.SIGCONT)
    assert t.cmd("verify") == "ok 8"


def test_signal_mask_is_restored(start_target, tracer):
    t = start_target(4)
    before = t.cmd("sigblk")
    assert tracer.syscall(t.pid, native.SYS_getpid) == t.pid
    assert t.cmd("sigblk") == before


def test_multithreaded_target_all_threads_stop_and_resume(start_target, tracer):
    t = start_target(8)
    assert t.cmd("threads 3") == "ok"
    tids = tracer.stop_process(t.pid)
    assert len(tids) == 4
    assert {task_state(t.pid, tid) for tid in tids} == {"t"}
    worker = max(tids)
    before = tracer.registers(worker)
    assert tracer.syscall(t.pid, native.SYS_getpid, tid=worker) == t.pid
    assert tracer.registers(worker) == before
    tracer.resume_process(t.pid)
    first = int(t.cmd("progress").split()[1])
    time.sleep(0.05)
    assert int(t.cmd("progress").split()[1]) > first
    assert t.cmd("verify") == "ok 8"


def test_threads_created_while_stopping_are_caught(start_target, tracer):
    t = start_target(4)
    assert t.cmd("churn") == "ok"  # keeps creating short-lived threads
    time.sleep(0.05)
    tids = tracer.stop_process(t.pid)
    time.sleep(0.05)
    listed = {int(x) for x in os.listdir(f"/proc/{t.pid}/task")}
    assert listed <= set(tids)
    assert {task_state(t.pid, tid) for tid in listed} == {"t"}
    tracer.resume_process(t.pid)
    assert t.cmd("verify") == "ok 4"


def test_process_whose_main_thread_exited(start_target, tracer):
    t = start_target(8)
    assert t.cmd("leaderexit") == "ok"
    deadline = time.monotonic() + 5
    while task_state(t.pid, t.pid) != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.005)
    tids = tracer.stop_process(t.pid)
    assert t.pid not in tids and len(tids) == 1
    with tracer.inject_userfaultfd(t.pid) as u:
        u.api(native.UFFD_FEATURE_WP_ASYNC | native.UFFD_FEATURE_WP_UNPOPULATED)
    tracer.resume_process(t.pid)
    assert t.cmd("verify") == "ok 8"


def test_inject_userfaultfd_leaves_no_fd_behind(start_target, tracer):
    t = start_target(8)
    fds = fd_count(t.pid)
    with tracer.inject_userfaultfd(t.pid) as u:
        assert fd_count(t.pid) == fds
        u.api(native.UFFD_FEATURE_WP_ASYNC | native.UFFD_FEATURE_WP_UNPOPULATED)
        u.register(t.addr, 8 * PAGE, missing=False, wp=True)  # acts on the target's memory
    assert t.cmd("verify") == "ok 8"


def test_inject_mmap_and_munmap(start_target, tracer):
    t = start_target(4)
    with tracer.stopped(t.pid):
        addr = tracer.inject_mmap(
            t.pid,
            0,
            2 * PAGE,
            mmap.PROT_READ | mmap.PROT_WRITE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
        )
        assert native.write_pages(t.pid, [addr], page_bytes(0, 5)) == PAGE
        got = bytearray(PAGE)
        assert native.read_pages(t.pid, [addr], got) == PAGE and bytes(got) == page_bytes(0, 5)
        tracer.inject_munmap(t.pid, addr, 2 * PAGE)
        with pytest.raises(OSError) as exc:
            native.read_pages(t.pid, [addr], got)
        assert exc.value.errno == errno.EFAULT
    assert t.cmd("verify") == "ok 4"


def test_inject_madvise_drops_pages(start_target, tracer):
    t = start_target(16)
    tracer.inject_madvise(t.pid, [(t.page(2), t.page(4)), (t.page(10), t.page(11))])
    for first, count in ((2, 2), (10, 1)):
        assert t.cmd(f"expect {first} {count} 0") == "ok"
    assert t.cmd("verify") == "ok 16"


def test_failing_injected_call_is_a_clear_oserror(start_target, tracer):
    t = start_target(4)
    with pytest.raises(OSError) as exc:
        tracer.inject_close(t.pid, 999)
    assert exc.value.errno == errno.EBADF
    with pytest.raises(OSError) as exc:
        tracer.inject_madvise(t.pid, [(t.addr + 1, t.page(1))])
    assert exc.value.errno == errno.EINVAL
    assert t.cmd("verify") == "ok 4"


def test_dead_process_is_esrch(start_target, tracer):
    t = start_target(4)
    pid = t.pid
    t.kill()
    with pytest.raises(ProcessLookupError):
        tracer.stop_process(pid)
    with pytest.raises(ProcessLookupError):
        tracer.syscall(pid, native.SYS_getpid)


def test_second_tracer_and_own_process_are_eperm(start_target, tracer):
    t = start_target(4)
    tracer.stop_process(t.pid)
    with native.Tracer() as other:
        with pytest.raises(PermissionError):
            other.stop_process(t.pid)
        with pytest.raises(PermissionError):
            other.stop_process(os.getpid())
    tracer.resume_process(t.pid)
    assert t.cmd("verify") == "ok 4"


def test_blocked_injected_syscall_times_out_then_rolls_back(start_target):
    """madvise on a range whose uffd wants REMOVE events blocks until someone reads the event:
    the injection times out with the session open; once the event is read, finish() puts the
    registers back and the target carries on."""
    t = start_target(8)
    with native.Tracer(syscall_timeout=0.3) as tr:
        tr.stop_process(t.pid)
        before = tr.registers(t.pid)
        with tr.inject_userfaultfd(t.pid) as u:
            u.api(native.UFFD_FEATURE_EVENT_REMOVE)
            u.register(t.addr, 8 * PAGE)
            with pytest.raises(TimeoutError):
                tr.inject_madvise(t.pid, [(t.page(0), t.page(1))])
            with pytest.raises(TimeoutError):
                tr.finish(t.pid)  # still blocked: nobody read the event
            assert u.read_events() == [native.RemoveEvent(t.page(0), t.page(1))]
            tr.finish(t.pid)
            assert tr.registers(t.pid) == before
            u.unregister(t.addr, 8 * PAGE)  # nobody serves faults in this test
            tr.resume_process(t.pid)
            assert t.cmd("expect 0 1 0") == "ok"
            assert t.cmd("verify") == "ok 8"


def test_tracer_death_mid_injection_kills_the_target(start_target):
    """Fail-stop: a tracer that dies with registers swapped takes the target with it rather
    than letting it run foreign registers (PTRACE_O_EXITKILL during a session)."""
    t = start_target(4)
    script = textwrap.dedent(f"""
        import os
        from gfvm._native import ffi, lib
        tid = {t.pid}
        assert lib.gfvm_ptrace_seize(tid) == 0 and lib.gfvm_ptrace_interrupt(tid) == 0
        assert lib.gfvm_ptrace_wait_stop(tid, 5000, ffi.new("int *")) == 0
        ip = ffi.new("uint64_t *")
        assert lib.gfvm_find_syscall_insn(tid, ip) == 0
        s = lib.gfvm_inject_new()
        assert lib.gfvm_inject_begin(s, tid, ip[0]) == 0
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parent.parent)
    assert t.proc.wait(timeout=10) == -signal.SIGKILL


def test_tracer_death_outside_a_session_releases_the_target(start_target):
    t = start_target(4)
    script = textwrap.dedent(f"""
        import os
        from gfvm._native import ffi, lib
        assert lib.gfvm_ptrace_seize({t.pid}) == 0 and lib.gfvm_ptrace_interrupt({t.pid}) == 0
        assert lib.gfvm_ptrace_wait_stop({t.pid}, 5000, ffi.new("int *")) == 0
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parent.parent)
    assert t.cmd("verify") == "ok 4"


@pytest.fixture
def cgroup2():
    require_root()
    if not (CGROUP2 / "cgroup.procs").exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"no cgroup2 hierarchy at {CGROUP2}")
        pytest.skip(f"no cgroup2 hierarchy at {CGROUP2}")
    path = CGROUP2 / f"gfvm-test-native-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        (path / "cgroup.freeze").write_text("0")
        for pid in (path / "cgroup.procs").read_text().split():
            (CGROUP2 / "cgroup.procs").write_text(pid)
        path.rmdir()


def set_frozen(cg: Path, frozen: bool) -> None:
    (cg / "cgroup.freeze").write_text("1" if frozen else "0")
    deadline = time.monotonic() + 5
    want = f"frozen {int(frozen)}"
    while want not in (cg / "cgroup.events").read_text().split("\n"):
        assert time.monotonic() < deadline, f"cgroup did not reach {want!r}"
        time.sleep(0.005)


def test_cgroup2_frozen_target(start_target, tracer, cgroup2):
    """What ptrace can do with a v2-frozen task: stop it (it stays counted frozen) but not run
    an injected syscall; thaw with the threads held in ptrace stops, inject, freeze again,
    release: the task is back in the freezer without having run any of its own code."""
    t = start_target(8)
    (cgroup2 / "cgroup.procs").write_text(str(t.pid))
    set_frozen(cgroup2, True)
    tracer.stop_process(t.pid)
    assert "frozen 1" in (cgroup2 / "cgroup.events").read_text()
    with pytest.raises(OSError) as exc:
        tracer.syscall(t.pid, native.SYS_getpid)
    assert exc.value.errno == errno.EBUSY
    assert native.frozen_cgroup(t.pid) == str(cgroup2 / "cgroup.freeze")
    before = tracer.registers(t.pid)
    set_frozen(cgroup2, False)
    assert t.state() == "t"  # thawed, but held by ptrace
    assert tracer.syscall(t.pid, native.SYS_getpid) == t.pid
    assert tracer.registers(t.pid) == before
    set_frozen(cgroup2, True)
    tracer.resume_process(t.pid)
    time.sleep(0.05)
    assert "frozen 1" in (cgroup2 / "cgroup.events").read_text()
    assert not t.ready_to_read(0.1)
    t.send("verify")
    assert not t.ready_to_read(0.2)  # frozen: does not answer
    set_frozen(cgroup2, False)
    assert t.read_line() == "ok 8"


def test_cgroup1_frozen_target_is_refused_clearly(start_target, tracer):
    """A task in a frozen v1 freezer cgroup enters a ptrace stop only once thawed (measured:
    seize and interrupt succeed, the stop never comes): stop_process says so up front."""
    v1 = Path("/sys/fs/cgroup/freezer")
    if not (v1 / "freezer.state").exists() and not (v1 / "cgroup.procs").exists():
        if os.environ.get("CI") == "true":
            pytest.fail("no cgroup v1 freezer hierarchy")
        pytest.skip("no cgroup v1 freezer hierarchy")
    t = start_target(4)
    cg = v1 / f"gfvm-test-native-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "cgroup.procs").write_text(str(t.pid))
        (cg / "freezer.state").write_text("FROZEN")
        with pytest.raises(OSError) as exc:
            tracer.stop_process(t.pid)
        assert exc.value.errno == errno.EBUSY and "freezer.state" in str(exc.value)
        (cg / "freezer.state").write_text("THAWED")
        assert t.cmd("verify") == "ok 4"
    finally:
        (cg / "freezer.state").write_text("THAWED")
        for pid in (cg / "cgroup.procs").read_text().split():
            (v1 / "cgroup.procs").write_text(pid)
        cg.rmdir()


def test_thread_that_stops_only_after_release_is_let_go(start_target, tracer):
    """A seized thread that cannot stop yet (here: v1-frozen) is given up on by stop_process; it
    would then sit in its ptrace stop for ever once thawed. The tracer detaches it as soon as it
    stops (checked before each of its jobs)."""
    from gfvm._native import ffi, lib

    v1 = Path("/sys/fs/cgroup/freezer")
    if not (v1 / "cgroup.procs").exists():
        if os.environ.get("CI") == "true":
            pytest.fail("no cgroup v1 freezer hierarchy")
        pytest.skip("no cgroup v1 freezer hierarchy")
    t = start_target(4)
    cg = v1 / f"gfvm-test-native-late-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "cgroup.procs").write_text(str(t.pid))
        (cg / "freezer.state").write_text("FROZEN")

        def seize_without_stop():
            assert lib.gfvm_ptrace_seize(t.pid) == 0 and lib.gfvm_ptrace_interrupt(t.pid) == 0
            assert lib.gfvm_ptrace_wait_stop(t.pid, 200, ffi.new("int *")) == -errno.ETIMEDOUT
            tracer._stopped[t.pid] = {t.pid: -1}  # what stop_process leaves after a timeout

        tracer.call(seize_without_stop)
        tracer.resume_process(t.pid)
        (cg / "freezer.state").write_text("THAWED")
        assert t.wait_state("t") == "t"  # stopped for us, nobody waiting for it
        tracer.call(lambda: None)  # any job lets the tracer notice and detach it
        assert t.cmd("verify") == "ok 4"
    finally:
        (cg / "freezer.state").write_text("THAWED")
        for pid in (cg / "cgroup.procs").read_text().split():
            (v1 / "cgroup.procs").write_text(pid)
        cg.rmdir()


def test_rollback_when_the_thread_cannot_reach_the_syscall(start_target, tracer, cgroup2):
    """Error path of the injector itself: the thread cannot run to the injected syscall (its
    cgroup is frozen), the syscall step times out, and end() still puts every register back."""
    from gfvm._native import ffi, lib

    t = start_target(4)
    mask = t.cmd("sigblk")
    (cgroup2 / "cgroup.procs").write_text(str(t.pid))
    set_frozen(cgroup2, True)
    tracer.stop_process(t.pid)
    before = tracer.registers(t.pid)

    def inject_while_frozen():
        ip = ffi.new("uint64_t *")
        assert lib.gfvm_find_syscall_insn(t.pid, ip) == 0
        s = ffi.gc(lib.gfvm_inject_new(), lib.gfvm_inject_free)
        assert lib.gfvm_inject_begin(s, t.pid, ip[0]) == 0
        args, res = ffi.new("uint64_t[6]"), ffi.new("int64_t *")
        assert lib.gfvm_inject_syscall(s, native.SYS_getpid, args, res, 200) == -errno.ETIMEDOUT
        return lib.gfvm_inject_end(s, 2000)

    assert tracer.call(inject_while_frozen) == 0
    assert tracer.registers(t.pid) == before
    set_frozen(cgroup2, False)
    tracer.resume_process(t.pid)
    assert t.cmd("sigblk") == mask
    assert t.cmd("verify") == "ok 4"


# --------------------------------------------------------------------------- attach at exec

SHIM = 'kill -STOP $$; exec "$@"'


class Shim:
    """`sh -c 'kill -STOP $$; exec "$@"' shim PROGRAM...`, stopped before its exec."""

    def __init__(self, *argv: str, script: str = SHIM, stops: bool = True):
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", script, "shim", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        self.pid = self.proc.pid
        deadline = time.monotonic() + 10
        while stops and task_state(self.pid, self.pid) != "T":
            assert time.monotonic() < deadline, "the shim did not stop itself"
            time.sleep(0.002)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


@pytest.fixture
def shims():
    require_root()
    started: list[Shim] = []

    def start(*argv: str, **kw) -> Shim:
        started.append(Shim(*argv, **kw))
        return started[-1]

    try:
        yield start
    finally:
        for s in started:
            s.kill()


def tracer_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("TracerPid:")).split()[1])


def test_uffd_at_exec_is_made_before_the_first_instruction(early_binary, shims, tracer):
    """native_early forbids userfaultfd() (seccomp) in its first instructions: only a uffd made
    before them exists, and it is the one of the new program's memory."""
    s = shims(str(early_binary))
    uffd = tracer.inject_userfaultfd_at_exec(s.pid, s.resume)
    with uffd:
        word, first, probe = s.proc.stdout.readline().split()
        assert word == b"early"
        first, probe = int(first, 16), int(probe, 16)
        # Too late now: the program has run its first instructions (it printed that line).
        with pytest.raises(PermissionError):
            tracer.inject_userfaultfd(s.pid)
        assert tracer_pid(s.pid) == 0  # detached, running
        # The uffd acts on the exec'd program: a fault on its untouched page comes to us.
        uffd.api(0)
        uffd.register(probe, PAGE, missing=True)
        s.proc.stdin.write(b"x")
        deadline = time.monotonic() + 10
        faults: list = []
        while not faults:
            assert time.monotonic() < deadline, "no fault on the probe page"
            select_readable(uffd.fileno())
            faults = [e for e in uffd.read_events() if isinstance(e, native.PageFault)]
        assert faults[0].address & ~(PAGE - 1) == probe
        uffd.copy(probe, page_bytes(5, 1))
        assert s.proc.stdout.read(8) == page_bytes(5, 1)[:8]


def select_readable(fd: int, timeout: float = 1.0) -> None:
    import select

    select.select([fd], [], [], timeout)


def test_uffd_at_exec_when_the_task_never_execs(shims, tracer):
    s = shims(script="kill -STOP $$; exit 7")
    with pytest.raises(ProcessLookupError, match="exit status 7"):
        tracer.inject_userfaultfd_at_exec(s.pid, s.resume)


def test_uffd_at_exec_of_a_missing_program(shims, tracer):
    s = shims("/nonexistent/program")
    with pytest.raises(ProcessLookupError, match="exit status 127"):
        tracer.inject_userfaultfd_at_exec(s.pid, s.resume)


def test_uffd_at_exec_releases_the_task_when_resume_fails(early_binary, shims, tracer):
    s = shims(str(early_binary))

    def resume() -> None:
        raise RuntimeError("cannot resume")

    with pytest.raises(RuntimeError, match="cannot resume"):
        tracer.inject_userfaultfd_at_exec(s.pid, resume)
    assert tracer_pid(s.pid) == 0  # released...
    deadline = time.monotonic() + 5
    # ...and back in its stop (it runs a moment to get there)
    while task_state(s.pid, s.pid) != "T":
        assert time.monotonic() < deadline, "the released task did not stay stopped"
        time.sleep(0.002)
    time.sleep(0.1)
    assert task_state(s.pid, s.pid) == "T" and s.proc.poll() is None
    # and it can still be taken later
    tracer.inject_userfaultfd_at_exec(s.pid, s.resume).close()
    assert s.proc.stdout.readline().startswith(b"early ")


def test_uffd_at_exec_times_out_on_a_task_that_does_not_stop(shims, tracer):
    s = shims("/bin/sleep", "30", script='exec "$@"', stops=False)
    # Not a self-stopped task: the shim runs (sleeping in python), never stops, never execs.
    fast = native.Tracer(stop_timeout=0.3)
    try:
        with pytest.raises(TimeoutError):
            fast.inject_userfaultfd_at_exec(s.pid, s.resume)
    finally:
        fast.close()
    time.sleep(0.1)
    assert tracer_pid(s.pid) == 0  # not left traced
