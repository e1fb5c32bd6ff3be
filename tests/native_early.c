/* Test program for Tracer.inject_userfaultfd_at_exec (tests/test_native_inject.py and the pager's
 * `gfvm run` test): built with -nostdlib -static, so that its first instructions are these:
 *   1. write MARKER into page `first` (its very first store);
 *   2. forbid userfaultfd() with a seccomp filter (EPERM), as sandboxed programs do (Docker's
 *      default profile denies it too): from then on nobody can create a uffd in this process, so
 *      a uffd it has must have been made before its first instruction;
 *   3. print "early <address of page first> <address of page probe>\n" on stdout;
 *   4. for every byte read on stdin, write the first 8 bytes of page `probe` to stdout (a page it
 *      never touches otherwise); at end of input, pause() for ever.
 * Build: gcc -O1 -static -nostdlib -fno-stack-protector -fno-builtin -o native_early native_early.c */
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/syscall.h>

#define MARKER 0x6766766d65617231ull /* "gfvmear1" */
#define PR_SET_NO_NEW_PRIVS_ 38

/* The pages live in the middle of .bss, away from any page shared with .data (file-backed). */
static volatile uint64_t pages[4][512] __attribute__((aligned(4096)));
#define first pages[1]
#define probe pages[2]

static long sys6(long nr, long a, long b, long c, long d, long e, long f)
{
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

static void put(const char *s, long n)
{
    sys6(SYS_write, 1, (long)s, n, 0, 0, 0);
}

static long hex(char *out, uint64_t v)
{
    char tmp[16];
    long n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    for (long i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

__attribute__((noreturn, force_align_arg_pointer)) void _start(void)
{
    first[0] = MARKER;

    static const struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_userfaultfd, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | 1 /* EPERM */),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {.len = sizeof(filter) / sizeof(filter[0]), .filter = (struct sock_filter *)filter};
    if (sys6(SYS_prctl, PR_SET_NO_NEW_PRIVS_, 1, 0, 0, 0, 0) != 0 ||
        sys6(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, (long)&prog, 0, 0, 0) != 0)
        sys6(SYS_exit_group, 3, 0, 0, 0, 0, 0);

    char line[64];
    long n = 0;
    for (const char *p = "early "; *p; p++)
        line[n++] = *p;
    n += hex(line + n, (uint64_t)(uintptr_t)first);
    line[n++] = ' ';
    n += hex(line + n, (uint64_t)(uintptr_t)probe);
    line[n++] = '\n';
    put(line, n);

    char c;
    while (sys6(SYS_read, 0, (long)&c, 1, 0, 0, 0) == 1) {
        uint64_t v = probe[0];
        put((const char *)&v, 8);
    }
    for (;;)
        sys6(SYS_pause, 0, 0, 0, 0, 0, 0);
}
