/* Workload for tests/test_pager_*.py and `gfvm bench pager` (gfvm/bench/pager.py): a process that writes known patterns
 * into its memory and checks them itself.
 *
 * Usage: pager_workload SOCKET NPAGES
 * Maps NPAGES private anonymous pages (the "region"), connects to the unix stream socket SOCKET and
 * serves one command per line, answering one line ("ok ..." or "bad ..."):
 *   pid                       -> "ok <pid> <region address> <npages>"
 *   fill FIRST COUNT GEN      -> write pattern(page, GEN) into pages          -> "ok"
 *   random N GEN SEED         -> write pattern(page, GEN) into N random pages   -> "ok"
 *   verify                    -> check every page against what was written    -> "ok <pages>" | "bad ..."
 *   dontneed FIRST COUNT      -> madvise(MADV_DONTNEED): the pages read zero    -> "ok"
 *   munmap FIRST COUNT        -> unmap pages (no longer verified)               -> "ok"
 *   mremap [COUNT]            -> move the first COUNT pages (default all) elsewhere; the rest
 *                                is no longer verified                          -> "ok <address>"
 *   fork                      -> child rewrites half of the pages, verifies, exits 0 if right;
 *                                parent verifies too and waits                 -> "ok <child status>"
 *   forkstay                  -> child stays alive, connects to SOCKET again and serves commands;
 *                                parent answers                                 -> "ok <child pid>"
 *   threads N ROUNDS          -> N threads each rewrite their slice ROUNDS times and verify -> "ok"
 *   heap MB GEN               -> malloc MB MiB, fill it, keep it (verified by verify) -> "ok"
 *   writeloop MS              -> rewrite random pages for MS ms                 -> "ok <pages written>"
 *   fillloop MS [MBPS]        -> rewrite the whole region sequentially, pass after pass, for MS ms,
 *                                at most MBPS MB/s (0: as fast as it can) -> "ok <MB written>"
 *   bench MS                  -> write 8 bytes per 64 on random pages for MS ms
 *                                -> "ok <bytes/s of wall time> <bytes/s of this process's CPU time>"
 *   touch ORDER [write]       -> read (or write) one word of every page (ORDER seq|random),
 *                                timing each page: "ok <total us> <p50 ns> <p99 ns>" (faults included)
 *   exec PATH ARGS...         -> execv(PATH, ARGS) (the connection is lost)
 *   exit CODE                 -> exits
 * Generation 0 means "zero page". */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define GONE (-1)

static unsigned char *region;
static long npages;
static int *gen;
static unsigned char *heap;
static long heap_pages;
static int heap_gen;
static const char *sock_path;
static FILE *in, *out;

static uint64_t word(long page, long w, int g)
{
    return ((uint64_t)(page + 1) * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)g * 0x100000001B3ull) ^ (uint64_t)w;
}

static void fill_page(unsigned char *base, long p, int g)
{
    uint64_t *q = (uint64_t *)(base + p * PAGE);
    for (long w = 0; w < PAGE / 8; w++)
        q[w] = g ? word(p, w, g) : 0;
}

static int check_page(unsigned char *base, long p, int g, char *why, size_t n)
{
    uint64_t *q = (uint64_t *)(base + p * PAGE);
    for (long w = 0; w < PAGE / 8; w++) {
        uint64_t want = g ? word(p, w, g) : 0;
        if (q[w] != want) {
            snprintf(why, n, "bad page %ld word %ld got %#llx want %#llx (gen %d)", p, w,
                     (unsigned long long)q[w], (unsigned long long)want, g);
            return 0;
        }
    }
    return 1;
}

static uint64_t rng_state;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static int verify_all(char *why, size_t n)
{
    long checked = 0;
    for (long p = 0; p < npages; p++) {
        if (gen[p] == GONE)
            continue;
        if (!check_page(region, p, gen[p], why, n))
            return -1;
        checked++;
    }
    for (long p = 0; p < heap_pages; p++) {
        if (!check_page(heap, p, heap_gen, why, n)) {
            strncat(why, " (heap)", n - strlen(why) - 1);
            return -1;
        }
        checked++;
    }
    return (int)checked;
}

static int connect_sock(void)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, sock_path, sizeof(a.sun_path) - 1);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
        return -1;
    in = fdopen(fd, "r");
    out = fdopen(dup(fd), "w");
    return in && out ? 0 : -1;
}

struct worker {
    pthread_t t;
    long first, count;
    int rounds;
    int ok;
    char why[200];
};

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    w->ok = 1;
    for (int r = 1; r <= w->rounds && w->ok; r++) {
        int g = 1000 + r;
        for (long p = w->first; p < w->first + w->count; p++)
            fill_page(region, p, g);
        for (long p = w->first; p < w->first + w->count; p++)
            if (!check_page(region, p, g, w->why, sizeof(w->why))) {
                w->ok = 0;
                break;
            }
        for (long p = w->first; p < w->first + w->count; p++)
            gen[p] = g;
    }
    return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void serve(void);

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s SOCKET NPAGES\n", argv[0]);
        return 2;
    }
    sock_path = argv[1];
    npages = atol(argv[2]);
    region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    gen = calloc(npages, sizeof(int));
    if (region == MAP_FAILED || !gen)
        return 3;
    rng_state = 0x1234567 ^ (uint64_t)getpid();
    if (connect_sock() < 0) {
        perror("connect");
        return 4;
    }
    serve();
    return 0;
}

static void serve(void)
{
    char line[4096], why[300];
    while (fgets(line, sizeof(line), in)) {
        char cmd[32] = "";
        long a = 0, b = 0, c = 0;
        sscanf(line, "%31s %ld %ld %ld", cmd, &a, &b, &c);
        if (!strcmp(cmd, "pid")) {
            fprintf(out, "ok %d %p %ld\n", getpid(), (void *)region, npages);
        } else if (!strcmp(cmd, "fill")) {
            for (long p = a; p < a + b && p < npages; p++) {
                fill_page(region, p, (int)c);
                gen[p] = (int)c;
            }
            fprintf(out, "ok\n");
        } else if (!strcmp(cmd, "random")) {
            rng_state = (uint64_t)c * 2654435761u + 1;
            for (long i = 0; i < a; i++) {
                long p = rnd() % npages;
                if (gen[p] == GONE)
                    continue;
                fill_page(region, p, (int)b);
                gen[p] = (int)b;
            }
            fprintf(out, "ok\n");
        } else if (!strcmp(cmd, "verify")) {
            int n = verify_all(why, sizeof(why));
            if (n < 0)
                fprintf(out, "%s\n", why);
            else
                fprintf(out, "ok %d\n", n);
        } else if (!strcmp(cmd, "dontneed")) {
            if (madvise(region + a * PAGE, b * PAGE, MADV_DONTNEED) < 0) {
                fprintf(out, "bad madvise %s\n", strerror(errno));
            } else {
                for (long p = a; p < a + b; p++)
                    gen[p] = 0;
                fprintf(out, "ok\n");
            }
        } else if (!strcmp(cmd, "munmap")) {
            if (munmap(region + a * PAGE, b * PAGE) < 0) {
                fprintf(out, "bad munmap %s\n", strerror(errno));
            } else {
                for (long p = a; p < a + b; p++)
                    gen[p] = GONE;
                fprintf(out, "ok\n");
            }
        } else if (!strcmp(cmd, "mremap")) {
            /* reserve a new place, then move the region there (MREMAP_FIXED replaces it) */
            long n = a > 0 && a < npages ? a : npages;
            void *dst = mmap(NULL, n * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            void *moved = dst == MAP_FAILED ? MAP_FAILED
                : mremap(region, n * PAGE, n * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
            if (moved == MAP_FAILED) {
                fprintf(out, "bad mremap %s\n", strerror(errno));
            } else {
                region = moved;
                for (long p = n; p < npages; p++)
                    gen[p] = GONE;
                fprintf(out, "ok %p\n", moved);
            }
        } else if (!strcmp(cmd, "fork")) {
            fflush(out);
            pid_t child = fork();
            if (child == 0) {
                int okc = verify_all(why, sizeof(why)) >= 0;
                for (long p = 0; p < npages / 2; p++)
                    if (gen[p] != GONE) {
                        fill_page(region, p, 777);
                        gen[p] = 777;
                    }
                okc = okc && verify_all(why, sizeof(why)) >= 0;
                _exit(okc ? 0 : 1);
            }
            int st = 0;
            waitpid(child, &st, 0);
            int n = verify_all(why, sizeof(why));
            if (n < 0)
                fprintf(out, "%s (parent after fork)\n", why);
            else
                fprintf(out, "ok %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
        } else if (!strcmp(cmd, "forkstay")) {
            fflush(out);
            pid_t child = fork();
            if (child == 0) {
                fclose(in);
                fclose(out);
                if (connect_sock() < 0)
                    _exit(4);
                serve();
                _exit(0);
            }
            fprintf(out, "ok %d\n", child);
        } else if (!strcmp(cmd, "threads")) {
            int n = (int)a;
            struct worker *ws = calloc(n, sizeof(*ws));
            long slice = npages / n;
            for (int i = 0; i < n; i++) {
                ws[i].first = i * slice;
                ws[i].count = slice;
                ws[i].rounds = (int)b;
                pthread_create(&ws[i].t, NULL, worker_main, &ws[i]);
            }
            int okt = 1;
            for (int i = 0; i < n; i++) {
                pthread_join(ws[i].t, NULL);
                if (!ws[i].ok && okt) {
                    okt = 0;
                    snprintf(why, sizeof(why), "%s (thread %d)", ws[i].why, i);
                }
            }
            free(ws);
            fprintf(out, okt ? "ok\n" : "%s\n", why);
        } else if (!strcmp(cmd, "heap")) {
            heap_pages = a * 256;
            heap_gen = (int)b;
            heap = malloc(heap_pages * PAGE);
            for (long p = 0; p < heap_pages; p++)
                fill_page(heap, p, heap_gen);
            fprintf(out, "ok\n");
        } else if (!strcmp(cmd, "writeloop")) {
            double end = now_s() + a / 1000.0;
            long written = 0;
            int g = 5000;
            while (now_s() < end) {
                for (int i = 0; i < 64; i++) {
                    long p = rnd() % npages;
                    if (gen[p] == GONE)
                        continue;
                    fill_page(region, p, g);
                    gen[p] = g;
                    written++;
                }
                g++;
            }
            fprintf(out, "ok %ld\n", written);
        } else if (!strcmp(cmd, "fillloop")) {
            double t0 = now_s(), end = t0 + a / 1000.0;
            long pages = 0;
            static int g = 20000;
            while (now_s() < end) {
                g++;
                for (long p = 0; p < npages && now_s() < end; p++) {
                    if (gen[p] == GONE)
                        continue;
                    fill_page(region, p, g);
                    gen[p] = g;
                    pages++;
                    if (b > 0 && (pages & 63) == 0) {
                        /* ahead of the rate: sleep until on schedule (not spin: the CPU is
                           left to others, as a process waiting on I/O or peers leaves it) */
                        double due = t0 + pages * (double)PAGE / (b * 1e6);
                        double wait = (due < end ? due : end) - now_s();
                        if (wait > 0) {
                            struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
                            nanosleep(&ts, NULL);
                        }
                    }
                }
            }
            fprintf(out, "ok %.0f\n", pages * (double)PAGE / 1e6);
        } else if (!strcmp(cmd, "bench")) {
            double t0 = now_s(), end = t0 + a / 1000.0, c0 = cpu_s();
            uint64_t bytes = 0;
            while (now_s() < end) {
                for (int i = 0; i < 4096; i++) {
                    long p = rnd() % npages;
                    uint64_t *q = (uint64_t *)(region + p * PAGE);
                    for (int w = 0; w < PAGE / 8; w += 8)
                        q[w] += 1;
                    bytes += PAGE / 8;
                }
            }
            fprintf(out, "ok %.0f %.0f\n", bytes / (now_s() - t0), bytes / (cpu_s() - c0));
        } else if (!strcmp(cmd, "touch")) {
            int random_order = strstr(line, "random") != NULL;
            int do_write = strstr(line, "write") != NULL;
            uint64_t *lat = malloc(npages * sizeof(uint64_t));
            long *order = malloc(npages * sizeof(long));
            for (long p = 0; p < npages; p++)
                order[p] = p;
            if (random_order)
                for (long p = npages - 1; p > 0; p--) {
                    long j = rnd() % (p + 1), t = order[p];
                    order[p] = order[j];
                    order[j] = t;
                }
            volatile uint64_t sink = 0;
            uint64_t t0 = now_ns();
            for (long i = 0; i < npages; i++) {
                uint64_t s = now_ns();
                if (do_write)
                    *(volatile uint64_t *)(region + order[i] * PAGE) = i;
                else
                    sink += *(volatile uint64_t *)(region + order[i] * PAGE);
                lat[i] = now_ns() - s;
            }
            uint64_t total = now_ns() - t0;
            qsort(lat, npages, sizeof(uint64_t), cmp_u64);
            fprintf(out, "ok %llu %llu %llu\n", (unsigned long long)(total / 1000),
                    (unsigned long long)lat[npages / 2], (unsigned long long)lat[npages * 99 / 100]);
            free(lat);
            free(order);
            (void)sink;
        } else if (!strcmp(cmd, "exec")) {
            char *args[64];
            int n = 0;
            char *save = NULL, *tok = strtok_r(line, " \n", &save);
            while ((tok = strtok_r(NULL, " \n", &save)) && n < 63)
                args[n++] = tok;
            args[n] = NULL;
            fflush(out);
            execv(args[0], args);
            fprintf(out, "bad exec %s\n", strerror(errno));
        } else if (!strcmp(cmd, "exit")) {
            fflush(out);
            _exit((int)a);
        } else {
            fprintf(out, "bad unknown command %s\n", cmd);
        }
        fflush(out);
    }
}
