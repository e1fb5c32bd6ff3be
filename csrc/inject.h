/* ptrace stop and syscall injection (csrc/inject.c). */
#ifndef GFVM_INJECT_H
#define GFVM_INJECT_H
#include <stdint.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>

#define GFVM_NREGS 27 /* u64 words of struct user_regs_struct (x86_64) */

struct gfvm_inject;

struct gfvm_inject *gfvm_inject_new(void);
void gfvm_inject_free(struct gfvm_inject *s);
int gfvm_inject_state(struct gfvm_inject *s);
int gfvm_ptrace_seize(int tid);
int gfvm_ptrace_seize_opts(int tid, int options);
int gfvm_ptrace_wait_status(int tid, int timeout_ms, int *status);
int gfvm_ptrace_cont(int tid, int sig);
int gfvm_ptrace_interrupt(int tid);
int gfvm_ptrace_wait_stop(int tid, int timeout_ms, int *stop_sig);
int gfvm_ptrace_detach(int tid);
int gfvm_ptrace_getregs(int tid, uint64_t *regs);
int gfvm_find_syscall_insn(int pid, uint64_t *addr);
int gfvm_inject_begin(struct gfvm_inject *s, int tid, uint64_t syscall_ip);
int gfvm_inject_syscall(struct gfvm_inject *s, int64_t nr, const uint64_t *args, int64_t *result, int timeout_ms);
int gfvm_inject_end(struct gfvm_inject *s, int timeout_ms);

#endif
