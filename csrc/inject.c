/* ptrace: stopping threads and injecting system calls into a stopped thread, without modifying
 * any code of the target.
 *
 * Technique: the thread is seized (PTRACE_SEIZE, never PTRACE_ATTACH: no SIGSTOP is sent) and
 * put into a ptrace stop with PTRACE_INTERRUPT. That stop is taken inside the kernel's signal
 * path (get_signal), with the registers of the moment: for a thread interrupted in a blocking
 * syscall that is rax = -ERESTARTSYS (or another restart code), orig_rax = the syscall number,
 * rip = after its `syscall` instruction; the kernel rewinds to restart the syscall right after
 * get_signal returns, *using whatever registers are there at that point*.
 *
 * An injection session (begin / syscall... / end):
 *   begin:   save all general registers and the signal mask; set PTRACE_O_EXITKILL (if the
 *            tracer dies mid-session the target is killed rather than left running with
 *            foreign registers: fail-stop); block every asynchronous signal (synchronous ones
 *            stay unblocked: a blocked SIGSEGV/SIGSYS raised by a fault would reset the
 *            process's handler to SIG_DFL).
 *   syscall: rip = an existing `syscall` instruction (found in the target's [vdso]), rax = nr,
 *            orig_rax = -1 (so no restart logic touches our registers), arguments; resume with
 *            PTRACE_SYSCALL to the syscall-entry stop and again to the syscall-exit stop; rax is
 *            the result. Several syscalls can follow each other in one session.
 *   end:     bring the thread back into a signal-path stop first (PTRACE_INTERRUPT + CONT from
 *            the syscall-exit stop: the thread traps in get_signal before reaching user mode),
 *            then restore registers and signal mask exactly and drop EXITKILL. The thread is
 *            then in the same kind of stop with the same registers as before begin, so an
 *            interrupted syscall restarts exactly as it would have (ERESTARTSYS/NOINTR/NOHAND
 *            and ERESTART_RESTARTBLOCK via restart_syscall), whether the caller detaches or
 *            continues it, and signals that arrived meanwhile are delivered as they would have
 *            been. Restoring registers directly at the syscall-exit stop would NOT be exact: a
 *            thread resumed from there returns to user mode without passing through the
 *            restart logic, and read() would return -512 to the program.
 *   Rollback on every error path: end() works from any state (at the syscall-entry stop it
 *   first turns the pending syscall into a no-op with orig_rax = -1). If the injected syscall
 *   blocks beyond the timeout, syscall() returns -ETIMEDOUT with the session still open; end()
 *   interrupts it and finishes the rollback, or returns -ETIMEDOUT again (state kept, retry
 *   later; EXITKILL stays set meanwhile).
 *
 * Rules: all ptrace requests for a tracee must come from the thread that seized it, and no other
 * thread of this process may wait for a tracee (any thread's waitpid can reap ptrace stops of
 * the whole thread group's tracees; we wait with __WNOTHREAD ourselves). A task frozen by the
 * cgroup v2 freezer can be seized and interrupted (it then sits in a ptrace stop and the cgroup
 * still reads frozen) but does not run while frozen: injection needs the cgroup thawed while
 * the threads are held in ptrace stops, then frozen again before detaching (see gfvm/native.py).
 * rseq: a thread interrupted inside an rseq critical section may have that critical section's
 * abort skipped (the return to the vdso clears rseq_cs); only code using rseq critical
 * sections (not glibc's sched_getcpu) is affected. x86_64 only. */
#include "kernel_abi.h"
#include "inject.h"

#include <fcntl.h>
#include <signal.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef __x86_64__
#error "syscall injection is implemented for x86_64 only"
#endif

_Static_assert(sizeof(struct user_regs_struct) == GFVM_NREGS * 8, "user_regs_struct is 27 x u64");

#define BASE_OPTIONS (PTRACE_O_TRACESYSGOOD)
#define SYSCALL_STOP (SIGTRAP | 0x80)

/* Where the thread is during a session. S_AT_STOP: a signal-path stop (interrupt, group or
 * signal-delivery stop); S_TO_ENTRY / S_IN_SYSCALL: running toward / inside the injected syscall
 * (a wait timed out). */
enum { S_IDLE = 0, S_AT_STOP, S_TO_ENTRY, S_AT_ENTRY, S_IN_SYSCALL, S_AT_EXIT, S_DEAD };

struct gfvm_inject {
    int tid;
    int state;
    int regs_dirty;
    int pending_sig; /* an asynchronous signal caught on the way, re-sent at end() */
    uint64_t syscall_ip;
    uint64_t saved_mask;
    struct user_regs_struct saved;
};

struct gfvm_inject *gfvm_inject_new(void)
{
    return calloc(1, sizeof(struct gfvm_inject));
}

void gfvm_inject_free(struct gfvm_inject *s)
{
    free(s);
}

int gfvm_inject_state(struct gfvm_inject *s)
{
    return s->state;
}

/* ------------------------------------------------------------------ waiting */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* waitpid cannot time out, so poll: a few yields (stops usually come within microseconds),
 * then sleeps doubling up to 1 ms. Timer slack 1 us on this thread keeps short sleeps short. */
static int wait_status(int tid, int timeout_ms, int *status)
{
    static __thread int slack_set;
    if (!slack_set) {
        prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
        slack_set = 1;
    }
    uint64_t start = now_ns(), sleep_ns = 0;
    for (int i = 0;; i++) {
        int r = waitpid(tid, status, __WALL | __WNOTHREAD | WNOHANG);
        if (r == tid)
            return 0;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno == ECHILD ? -ESRCH : -errno;
        }
        if (timeout_ms >= 0 && now_ns() - start > (uint64_t)timeout_ms * 1000000ull)
            return -ETIMEDOUT;
        if (i < 20) {
            sched_yield();
            continue;
        }
        sleep_ns = sleep_ns ? (sleep_ns * 2 > 1000000 ? 1000000 : sleep_ns * 2) : 2000;
        struct timespec ts = {0, (long)sleep_ns};
        nanosleep(&ts, NULL);
    }
}

static int is_sync_fault(int tid, int sig)
{
    if (sig != SIGSEGV && sig != SIGBUS && sig != SIGILL && sig != SIGFPE && sig != SIGSYS && sig != SIGTRAP)
        return 0;
    siginfo_t si;
    if (ptrace(PTRACE_GETSIGINFO, tid, 0, &si) < 0)
        return 1;
    return si.si_code > 0; /* raised by the kernel for this thread, not sent by someone */
}

/* ------------------------------------------------------------------ stopping */

int gfvm_ptrace_seize(int tid)
{
    return ptrace(PTRACE_SEIZE, tid, 0, (void *)(long)BASE_OPTIONS) < 0 ? -errno : 0;
}

/* PTRACE_SEIZE with extra options (e.g. PTRACE_O_TRACEEXEC | PTRACE_O_EXITKILL) on top of ours. */
int gfvm_ptrace_seize_opts(int tid, int options)
{
    return ptrace(PTRACE_SEIZE, tid, 0, (void *)(long)(BASE_OPTIONS | options)) < 0 ? -errno : 0;
}

/* The next wait status of a seized thread, raw (the caller decodes stops, ptrace events, exit).
 * -ETIMEDOUT after timeout_ms (-1: none), -ESRCH if it is not our tracee any more. */
int gfvm_ptrace_wait_status(int tid, int timeout_ms, int *status)
{
    return wait_status(tid, timeout_ms, status);
}

/* PTRACE_CONT from any ptrace stop, delivering `sig` (0: none). */
int gfvm_ptrace_cont(int tid, int sig)
{
    return ptrace(PTRACE_CONT, tid, 0, (void *)(long)sig) < 0 ? -errno : 0;
}

int gfvm_ptrace_interrupt(int tid)
{
    return ptrace(PTRACE_INTERRUPT, tid, 0, 0) < 0 ? -errno : 0;
}

/* Waits until the seized thread sits in an interrupt or group stop (the ptrace stop inside the
 * signal path). Signals that arrive first are delivered (the thread handles them, then traps).
 * *stop_sig = 0 for an interrupt stop, the stop signal (SIGSTOP, ...) for a group stop. */
int gfvm_ptrace_wait_stop(int tid, int timeout_ms, int *stop_sig)
{
    for (;;) {
        int st, rc = wait_status(tid, timeout_ms, &st);
        if (rc < 0)
            return rc;
        if (!WIFSTOPPED(st))
            return -ESRCH;
        int sig = WSTOPSIG(st), event = (unsigned)st >> 16;
        if (event == PTRACE_EVENT_STOP) {
            *stop_sig = sig == SIGTRAP ? 0 : sig;
            return 0;
        }
        int deliver = (event == 0 && sig != SYSCALL_STOP) ? sig : 0;
        if (ptrace(PTRACE_CONT, tid, 0, (void *)(long)deliver) < 0)
            return -errno;
    }
}

int gfvm_ptrace_detach(int tid)
{
    return ptrace(PTRACE_DETACH, tid, 0, 0) < 0 ? -errno : 0;
}

int gfvm_ptrace_getregs(int tid, uint64_t *regs)
{
    return ptrace(PTRACE_GETREGS, tid, 0, regs) < 0 ? -errno : 0;
}

/* ------------------------------------------------------------------ finding a syscall insn */

static int scan_for_syscall(int memfd, uint64_t start, uint64_t end, uint64_t *addr)
{
    static const uint64_t chunk = 65536;
    char *buf = malloc(chunk + 1);
    if (!buf)
        return -ENOMEM;
    int rc = -ENOENT;
    for (uint64_t pos = start; pos < end && rc == -ENOENT;) {
        uint64_t len = end - pos < chunk + 1 ? end - pos : chunk + 1; /* 1 byte overlap */
        ssize_t got = pread(memfd, buf, len, (off_t)pos);
        if (got <= 0)
            break;
        for (ssize_t i = 0; i + 1 < got; i++)
            if ((unsigned char)buf[i] == 0x0f && (unsigned char)buf[i + 1] == 0x05) {
                *addr = pos + (uint64_t)i;
                rc = 0;
                break;
            }
        pos += (uint64_t)got > 1 ? (uint64_t)got - 1 : 1;
    }
    free(buf);
    return rc;
}

/* The address of a `syscall` instruction (bytes 0f 05) in the target: in its [vdso] (same for
 * every process, mapped at a random address), else in its first executable mapping. Any
 * occurrence of the two bytes works: execution starts right there. */
int gfvm_find_syscall_insn(int pid, uint64_t *addr)
{
    char path[64], line[512];
    snprintf(path, sizeof(path), "/proc/%d/maps", pid);
    FILE *maps = fopen(path, "re");
    if (!maps)
        return -errno;
    uint64_t vdso_s = 0, vdso_e = 0, x_s = 0, x_e = 0;
    while (fgets(line, sizeof(line), maps)) {
        unsigned long s, e;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s", &s, &e, perms) != 3)
            continue;
        if (strstr(line, "[vdso]")) {
            vdso_s = s;
            vdso_e = e;
        } else if (!x_e && perms[0] == 'r' && perms[2] == 'x') {
            x_s = s;
            x_e = e;
        }
    }
    fclose(maps);
    snprintf(path, sizeof(path), "/proc/%d/mem", pid);
    int memfd = open(path, O_RDONLY | O_CLOEXEC);
    if (memfd < 0)
        return -errno;
    int rc = -ENOENT;
    if (vdso_e)
        rc = scan_for_syscall(memfd, vdso_s, vdso_e, addr);
    if (rc == -ENOENT && x_e)
        rc = scan_for_syscall(memfd, x_s, x_e > x_s + (64 << 20) ? x_s + (64 << 20) : x_e, addr);
    close(memfd);
    return rc;
}

/* ------------------------------------------------------------------ the session */

enum { K_SYSCALL = 1, K_SIGNAL_PATH = 2 };

/* Resumes with PTRACE_SYSCALL (unless `resume` is 0: the thread already runs) and waits for the
 * next stop: a syscall stop, or with want_syscall == 0 also an interrupt/group stop. SIGSTOP
 * and friends are delivered; an asynchronous signal that slipped through the mask is kept for
 * end(); a synchronous fault (our doing, e.g. SIGSYS from seccomp) ends the wait in its
 * signal-delivery stop with -EFAULT/-ENOSYS (the signal is dropped when the thread resumes). */
static int wait_next(struct gfvm_inject *s, int resume, int want_syscall, int timeout_ms, int *kind)
{
    int deliver = 0;
    for (;;) {
        if (resume && ptrace(PTRACE_SYSCALL, s->tid, 0, (void *)(long)deliver) < 0)
            return -errno;
        resume = 1;
        deliver = 0;
        int st, rc = wait_status(s->tid, timeout_ms, &st);
        if (rc < 0)
            return rc;
        if (!WIFSTOPPED(st))
            return -ESRCH;
        int sig = WSTOPSIG(st), event = (unsigned)st >> 16;
        if (sig == SYSCALL_STOP) {
            *kind = K_SYSCALL;
            return 0;
        }
        if (event != 0) {
            if (!want_syscall) {
                *kind = K_SIGNAL_PATH;
                return 0;
            }
            continue; /* an interrupt or group stop on the way (e.g. a leftover INTERRUPT) */
        }
        if (is_sync_fault(s->tid, sig)) {
            *kind = K_SIGNAL_PATH;
            return sig == SIGSYS ? -ENOSYS : -EFAULT;
        }
        if (sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU)
            deliver = sig; /* job control goes on; we resume the thread from its group stop */
        else if (!s->pending_sig)
            s->pending_sig = sig;
    }
}

/* State after a wait that did not succeed normally. */
static void after_failed_wait(struct gfvm_inject *s, int rc, int timeout_state)
{
    if (rc == -ETIMEDOUT)
        s->state = timeout_state;
    else if (rc == -ESRCH)
        s->state = S_DEAD;
    else if (rc == -EFAULT || rc == -ENOSYS)
        s->state = S_AT_STOP; /* a signal-delivery stop: as good as the original stop */
}

int gfvm_inject_begin(struct gfvm_inject *s, int tid, uint64_t syscall_ip)
{
    if (s->state != S_IDLE)
        return -EBUSY;
    memset(s, 0, sizeof(*s));
    s->tid = tid;
    s->syscall_ip = syscall_ip;
    if (ptrace(PTRACE_GETREGS, tid, 0, &s->saved) < 0)
        return -errno;
    if (ptrace(PTRACE_GETSIGMASK, tid, sizeof(uint64_t), &s->saved_mask) < 0)
        return -errno;
    if (ptrace(PTRACE_SETOPTIONS, tid, 0, (void *)(long)(BASE_OPTIONS | PTRACE_O_EXITKILL)) < 0)
        return -errno;
    uint64_t block = ~0ull;
    int sync_sigs[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGSYS, SIGTRAP};
    for (size_t i = 0; i < sizeof(sync_sigs) / sizeof(sync_sigs[0]); i++)
        block &= ~(1ull << (sync_sigs[i] - 1));
    if (ptrace(PTRACE_SETSIGMASK, tid, sizeof(uint64_t), &block) < 0) {
        int err = errno;
        ptrace(PTRACE_SETOPTIONS, tid, 0, (void *)(long)BASE_OPTIONS);
        return -err;
    }
    s->state = S_AT_STOP;
    return 0;
}

/* Runs one syscall in the stopped thread. *result is its raw return value (-errno on failure).
 * Returns 0 when the syscall ran, else -errno for the injection itself: -ETIMEDOUT (still
 * running after timeout_ms; -1 waits for ever), -ESRCH (thread gone), -ENOSYS (seccomp), ...
 * In every case end() must follow. */
int gfvm_inject_syscall(struct gfvm_inject *s, int64_t nr, const uint64_t *args, int64_t *result, int timeout_ms)
{
    if (s->state == S_DEAD)
        return -ESRCH;
    if (s->state != S_AT_STOP && s->state != S_AT_EXIT)
        return -EBUSY;
    struct user_regs_struct r = s->saved;
    r.rip = s->syscall_ip;
    r.rax = (uint64_t)nr;
    r.orig_rax = (uint64_t)-1;
    r.rdi = args[0];
    r.rsi = args[1];
    r.rdx = args[2];
    r.r10 = args[3];
    r.r8 = args[4];
    r.r9 = args[5];
    s->regs_dirty = 1; /* restore at end() even if SETREGS fails half-way */
    if (ptrace(PTRACE_SETREGS, s->tid, 0, &r) < 0)
        return -errno;
    int kind;
    /* To the syscall-entry stop: immediate, unless the thread cannot run (cgroup-frozen). */
    int rc = wait_next(s, 1, 1, timeout_ms, &kind);
    if (rc < 0) {
        after_failed_wait(s, rc, S_TO_ENTRY);
        return rc;
    }
    s->state = S_AT_ENTRY;
    struct user_regs_struct at;
    if (ptrace(PTRACE_GETREGS, s->tid, 0, &at) < 0)
        return -errno;
    if ((int64_t)at.orig_rax != nr || at.rip != s->syscall_ip + 2)
        return -EPROTO; /* not our syscall: end() skips it */
    /* Through the syscall to its exit stop. */
    rc = wait_next(s, 1, 1, timeout_ms, &kind);
    if (rc < 0) {
        after_failed_wait(s, rc, S_IN_SYSCALL);
        return rc;
    }
    s->state = S_AT_EXIT;
    if (ptrace(PTRACE_GETREGS, s->tid, 0, &at) < 0)
        return -errno;
    *result = (int64_t)at.rax;
    return 0;
}

/* Ends the session: registers, signal mask and options exactly as before begin(), the thread in
 * a signal-path ptrace stop. Works from every state. Returns 0, -ESRCH (the thread died: nothing
 * to restore), -ETIMEDOUT (the injected syscall still blocks, or the thread cannot run: call
 * again later; EXITKILL stays set meanwhile), or another -errno. */
int gfvm_inject_end(struct gfvm_inject *s, int timeout_ms)
{
    int rc = 0, kind;
    if (s->state == S_IDLE)
        return 0;
    for (int guard = 0; guard < 8 && s->state != S_AT_STOP && s->state != S_DEAD; guard++) {
        switch (s->state) {
        case S_TO_ENTRY:
        case S_IN_SYSCALL:
            /* Interruptible waits end (and a frozen thread leaves the freezer for the trap). */
            ptrace(PTRACE_INTERRUPT, s->tid, 0, 0);
            rc = wait_next(s, 0, 0, timeout_ms, &kind);
            if (rc == -ETIMEDOUT)
                return rc;
            if (rc < 0)
                after_failed_wait(s, rc, s->state);
            else if (kind == K_SIGNAL_PATH)
                s->state = S_AT_STOP;
            else
                s->state = s->state == S_TO_ENTRY ? S_AT_ENTRY : S_AT_EXIT;
            break;
        case S_AT_ENTRY: {
            /* Turn the pending syscall into a no-op; it then reaches its exit stop. */
            struct user_regs_struct r;
            rc = ptrace(PTRACE_GETREGS, s->tid, 0, &r) < 0 ? -errno : 0;
            if (rc == 0) {
                r.orig_rax = (uint64_t)-1;
                rc = ptrace(PTRACE_SETREGS, s->tid, 0, &r) < 0 ? -errno : 0;
            }
            if (rc == 0)
                rc = wait_next(s, 1, 1, timeout_ms, &kind);
            if (rc == 0)
                s->state = S_AT_EXIT;
            else
                after_failed_wait(s, rc, S_IN_SYSCALL);
            if (rc == -ETIMEDOUT)
                return rc;
            break;
        }
        case S_AT_EXIT: {
            /* Back into the signal path before restoring registers (see the header). */
            int stop_sig;
            rc = ptrace(PTRACE_INTERRUPT, s->tid, 0, 0) < 0 ? -errno : 0;
            if (rc == 0)
                rc = ptrace(PTRACE_CONT, s->tid, 0, 0) < 0 ? -errno : 0;
            if (rc == 0)
                rc = gfvm_ptrace_wait_stop(s->tid, timeout_ms, &stop_sig);
            if (rc == 0)
                s->state = S_AT_STOP;
            else if (rc == -ESRCH)
                s->state = S_DEAD;
            else
                return rc; /* -ETIMEDOUT: the thread runs toward the trap (e.g. frozen): retry */
            break;
        }
        default:
            return -EPROTO;
        }
    }
    if (s->state == S_DEAD) {
        s->state = S_IDLE;
        return -ESRCH;
    }
    if (s->state != S_AT_STOP)
        return rc ? rc : -EPROTO;
    rc = 0;
    if (s->regs_dirty && ptrace(PTRACE_SETREGS, s->tid, 0, &s->saved) < 0)
        rc = -errno;
    if (rc == 0 && ptrace(PTRACE_SETSIGMASK, s->tid, sizeof(uint64_t), &s->saved_mask) < 0)
        rc = -errno;
    if (rc == 0 && ptrace(PTRACE_SETOPTIONS, s->tid, 0, (void *)(long)BASE_OPTIONS) < 0)
        rc = -errno;
    if (rc < 0)
        return rc;
    if (s->pending_sig)
        syscall(SYS_tkill, s->tid, s->pending_sig); /* delivered when the thread resumes */
    s->state = S_IDLE;
    s->regs_dirty = 0;
    s->pending_sig = 0;
    return 0;
}
