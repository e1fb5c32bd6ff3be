/* Test target for tests/test_native_*.py: a process with known memory that checks itself.
 *
 * Usage: native_target NPAGES
 * Maps NPAGES private anonymous pages, fills page i with pattern(i, generation 1), prints
 * "ready <address> <npages> <pid>" and then serves one command per line on stdin (so between
 * commands it sits blocked in read(2) on a pipe), answering one line on stdout:
 *   verify                   -> "ok <pages checked>" or "bad <page> <word> <got> <want>"
 *   pverify N                -> N threads verify at once (concurrent faults) -> "ok" or "bad" 
 *   write FIRST COUNT GEN    -> rewrite pages with generation GEN            -> "ok"
 *   expect FIRST COUNT GEN   -> only record that the pages now hold GEN (someone else wrote them)
 *   dontneed FIRST COUNT     -> madvise(MADV_DONTNEED) by the process itself -> "ok" (pages read 0)
 *   munmap FIRST COUNT       -> unmap pages (no longer verified)             -> "ok"
 *   mremap                   -> move the whole region elsewhere              -> "ok <new address>"
 *   fork                     -> child verifies its memory, rewrites page 0 and verifies again,
 *                               exits 0 when all was right; parent waits     -> "child <status>"
 *   sleep MS                 -> nanosleep(MS)                                -> "ok <elapsed ms>"
 *   spin MS                  -> busy loop in user mode                       -> "ok <elapsed ms>"
 *   threads N                -> start N worker threads (busy + nanosleep)    -> "ok"
 *   progress                 -> "ok <sum of worker iterations>"
 *   churn                    -> a thread that keeps creating short-lived threads -> "ok"
 *   touch                    -> read one word of every page, "ok <elapsed us>"
 *   fresh                    -> first-touch (write) NPAGES fresh pages, "ok <elapsed us>"
 *   sigblk                   -> "ok <blocked signal mask in hex>"
 *   leaderexit               -> a new thread takes over the commands, the main thread exits
 *   exit                     -> exits 0
 * Generation 0 means "zero page". */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define GONE (-1)

static unsigned char *region;
static long npages;
static int *gen; /* per page: generation, 0 zero, GONE unmapped */
static volatile uint64_t work[64];
static int nworkers;

static uint64_t word(long page, long w, int g)
{
    return ((uint64_t)(page + 1) * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)g * 0x100000001B3ull) ^ (uint64_t)w;
}

static void fill(long first, long count, int g)
{
    for (long p = first; p < first + count; p++) {
        uint64_t *q = (uint64_t *)(region + p * PAGE);
        for (long w = 0; w < PAGE / 8; w++)
            q[w] = word(p, w, g);
        gen[p] = g;
    }
}

static void reply(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    buf[n++] = '\n';
    for (int off = 0; off < n;) {
        ssize_t w = write(1, buf + off, n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            exit(3);
        off += w;
    }
}

/* Returns -1 when all is right, else the first bad page (details in *msg). */
static long check(char *msg, size_t len)
{
    for (long p = 0; p < npages; p++) {
        if (gen[p] == GONE)
            continue;
        const uint64_t *q = (const uint64_t *)(region + p * PAGE);
        for (long w = 0; w < PAGE / 8; w++) {
            uint64_t want = gen[p] ? word(p, w, gen[p]) : 0;
            if (q[w] != want) {
                snprintf(msg, len, "bad %ld %ld %llx %llx", p, w, (unsigned long long)q[w],
                         (unsigned long long)want);
                return p;
            }
        }
    }
    return -1;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void *verifier(void *arg)
{
    char msg[160];
    return check(msg, sizeof(msg)) < 0 ? NULL : arg;
}

static void *nothing(void *arg)
{
    return arg;
}

static void *churner(void *arg)
{
    for (;;) {
        pthread_t t;
        if (pthread_create(&t, NULL, nothing, NULL) == 0)
            pthread_join(t, NULL);
    }
    return arg;
}

static void *worker(void *arg)
{
    long me = (long)arg;
    for (uint64_t i = 0;; i++) {
        work[me]++;
        if (i % 1000 == 0) {
            struct timespec ts = {0, 200000};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

/* A line from stdin, read with plain read(2) so the process blocks in that syscall. */
static int read_line(char *buf, size_t len)
{
    size_t n = 0;
    while (n + 1 < len) {
        ssize_t r = read(0, buf + n, 1);
        if (r < 0 && errno == EINTR) {
            reply("eintr"); /* would be a restart bug: the tests look for it */
            continue;
        }
        if (r <= 0)
            return -1;
        if (buf[n] == '\n')
            break;
        n++;
    }
    buf[n] = 0;
    return 0;
}

static void *serve(void *arg)
{
    char line[256], msg[160];
    while (read_line(line, sizeof(line)) == 0) {
        long a = 0, b = 0, c = 0;
        if (!strcmp(line, "verify")) {
            if (check(msg, sizeof(msg)) < 0) {
                long live = 0;
                for (long p = 0; p < npages; p++)
                    live += gen[p] != GONE;
                reply("ok %ld", live);
            } else {
                reply("%s", msg);
            }
        } else if (sscanf(line, "write %ld %ld %ld", &a, &b, &c) == 3) {
            fill(a, b, (int)c);
            reply("ok");
        } else if (sscanf(line, "pverify %ld", &a) == 1) {
            pthread_t ts[64];
            long bad = 0, n = a < 64 ? a : 64;
            for (long i = 0; i < n; i++)
                pthread_create(&ts[i], NULL, verifier, (void *)1);
            for (long i = 0; i < n; i++) {
                void *r;
                pthread_join(ts[i], &r);
                bad += r != NULL;
            }
            reply(bad ? "bad %ld" : "ok", bad);
        } else if (sscanf(line, "expect %ld %ld %ld", &a, &b, &c) == 3) {
            for (long p = a; p < a + b; p++)
                gen[p] = (int)c;
            reply("ok");
        } else if (!strcmp(line, "churn")) {
            pthread_t t;
            pthread_create(&t, NULL, churner, NULL);
            reply("ok");
        } else if (!strcmp(line, "touch")) {
            double t0 = now_ms();
            volatile uint64_t sum = 0;
            for (long p = 0; p < npages; p++)
                if (gen[p] != GONE)
                    sum += *(volatile uint64_t *)(region + p * PAGE);
            reply("ok %.0f", (now_ms() - t0) * 1000);
        } else if (!strcmp(line, "fresh")) {
            unsigned char *m = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            double t0 = now_ms();
            for (long p = 0; p < npages; p++)
                m[p * PAGE] = 1;
            double t1 = now_ms();
            munmap(m, npages * PAGE);
            reply("ok %.0f", (t1 - t0) * 1000);
        } else if (sscanf(line, "dontneed %ld %ld", &a, &b) == 2) {
            if (madvise(region + a * PAGE, b * PAGE, MADV_DONTNEED)) {
                reply("err %d", errno);
                continue;
            }
            for (long p = a; p < a + b; p++)
                gen[p] = 0;
            reply("ok");
        } else if (sscanf(line, "munmap %ld %ld", &a, &b) == 2) {
            if (munmap(region + a * PAGE, b * PAGE)) {
                reply("err %d", errno);
                continue;
            }
            for (long p = a; p < a + b; p++)
                gen[p] = GONE;
            reply("ok");
        } else if (!strcmp(line, "mremap")) {
            /* Reserve a fresh place, then move the region there. */
            void *dst = mmap(NULL, npages * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            void *moved = mremap(region, npages * PAGE, npages * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
            if (moved == MAP_FAILED) {
                reply("err %d", errno);
                continue;
            }
            region = moved;
            reply("ok %lx", (unsigned long)region);
        } else if (!strcmp(line, "fork")) {
            pid_t child = fork();
            if (child == 0) {
                if (check(msg, sizeof(msg)) >= 0)
                    _exit(1);
                if (gen[0] != GONE)
                    fill(0, 1, 77);
                _exit(check(msg, sizeof(msg)) >= 0 ? 2 : 0);
            }
            int st = -1;
            waitpid(child, &st, 0);
            reply("child %d", WIFEXITED(st) ? WEXITSTATUS(st) : 100 + WTERMSIG(st));
        } else if (sscanf(line, "sleep %ld", &a) == 1) {
            double t0 = now_ms();
            struct timespec ts = {a / 1000, (a % 1000) * 1000000};
            int rc = nanosleep(&ts, NULL);
            reply(rc ? "eintr %.0f" : "ok %.0f", now_ms() - t0);
        } else if (sscanf(line, "spin %ld", &a) == 1) {
            double t0 = now_ms();
            volatile uint64_t x = 0;
            while (now_ms() - t0 < a)
                for (int i = 0; i < 10000; i++)
                    x += i;
            reply("ok %.0f", now_ms() - t0);
        } else if (sscanf(line, "threads %ld", &a) == 1) {
            for (long i = 0; i < a && nworkers < 64; i++) {
                pthread_t t;
                pthread_create(&t, NULL, worker, (void *)(long)nworkers++);
            }
            reply("ok");
        } else if (!strcmp(line, "progress")) {
            uint64_t sum = 0;
            for (int i = 0; i < nworkers; i++)
                sum += work[i];
            reply("ok %llu", (unsigned long long)sum);
        } else if (!strcmp(line, "sigblk")) {
            sigset_t cur;
            sigprocmask(SIG_BLOCK, NULL, &cur);
            unsigned long long bits = 0;
            for (int s = 1; s < 64; s++)
                if (sigismember(&cur, s))
                    bits |= 1ull << (s - 1);
            reply("ok %llx", bits);
        } else if (!strcmp(line, "leaderexit")) {
            /* Another thread serves from now on; this one (the leader) exits: a zombie leader. */
            pthread_t t;
            pthread_create(&t, NULL, serve, NULL);
            reply("ok");
            pthread_exit(NULL);
        } else if (!strcmp(line, "exit")) {
            exit(0);
        } else {
            reply("unknown %s", line);
        }
    }
    exit(0);
    return arg;
}

int main(int argc, char **argv)
{
    npages = argc > 1 ? atol(argv[1]) : 64;
    region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    gen = calloc(npages, sizeof(*gen));
    if (region == MAP_FAILED || !gen)
        return 2;
    fill(0, npages, 1);
    reply("ready %lx %ld %d", (unsigned long)region, npages, getpid());
    serve(NULL);
    return 0;
}
