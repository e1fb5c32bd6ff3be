/* The migration workload (`gfvm demo`, `gfvm bench migrate`, tests/test_migrate_*.py): a process
 * whose whole memory is a pure function of one step counter, so that it can check itself at any
 * time, and whose hot set is rewritten all the time.
 *
 * Usage: gfvm-migrate-workload STATEDIR MIB HOT_MIB RATE STEPS CHECK_S
 *   MIB      size of the region (private anonymous memory), in MiB
 *   HOT_MIB  the first HOT_MIB MiB of the region are the hot set
 *   RATE     hot pages rewritten per second (0: as fast as it can)
 *   STEPS    finish after this many steps (0: run until told to exit)
 *   CHECK_S  verify the whole region every CHECK_S seconds (0: only on request)
 *
 * Step k rewrites hot page (k mod H) with generation k / H + 1, so after k steps hot page i holds
 * generation k / H + (i < k mod H) and every other page generation 0. Word j of page i with
 * generation g is mix(i, g, j), and word 0 is i: a page that is lost, stale, zero or misplaced
 * never matches. The counter k lives in the same memory; the writer holds `lock` across a step, so
 * a check under the lock sees memory and counter consistent.
 *
 * It writes STATEDIR/port (its TCP port, listening on 0.0.0.0) once the region is filled and then
 * answers one command per connection, one line each:
 *   status  -> "ok steps=K checks=C bad=B pid=P"   (P: its pid in its own PID namespace)
 *   verify  -> "ok steps=K" | "bad page=I steps=K"  (checks the whole region now)
 *   finish N-> "ok goal=G": finish (as with STEPS) once N more steps are done
 *   exit    -> "ok" and exits 0
 * With STEPS > 0, once K reaches STEPS it verifies everything, writes STATEDIR/result
 * ("ok steps=K checks=C" or "bad ...") and exits 0 (or 1 when a check failed).
 * Every check failure is also printed on stderr. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / 8)

static uint64_t *region;
static uint64_t npages, hot_pages, rate, steps_goal;
static double check_every;
static char statedir[512];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
/* Everything below lives in the process's memory like the region, and migrates with it. */
static volatile uint64_t steps;
static volatile uint64_t checks, bad_checks;

static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t gen_of(uint64_t page, uint64_t k)
{
    if (page >= hot_pages)
        return 0;
    return k / hot_pages + (page < k % hot_pages ? 1 : 0);
}

static void write_page(uint64_t page, uint64_t gen)
{
    uint64_t *p = region + page * WORDS;
    uint64_t base = mix(page * 0x100000001B3ULL ^ mix(gen));
    p[0] = page;
    for (uint64_t j = 1; j < WORDS; j++)
        p[j] = base + j;
}

/* -1 when the region matches step count k, else the first bad page. Call with `lock` held. */
static int64_t check_all(uint64_t k)
{
    for (uint64_t i = 0; i < npages; i++) {
        const uint64_t *p = region + i * WORDS;
        uint64_t base = mix(i * 0x100000001B3ULL ^ mix(gen_of(i, k)));
        if (p[0] != i)
            return (int64_t)i;
        for (uint64_t j = 1; j < WORDS; j++)
            if (p[j] != base + j)
                return (int64_t)i;
    }
    return -1;
}

static int64_t verify(uint64_t *k_out)
{
    pthread_mutex_lock(&lock);
    uint64_t k = steps;
    int64_t bad = check_all(k);
    checks++;
    if (bad >= 0) {
        bad_checks++;
        fprintf(stderr, "workload: page %lld does not match step %llu\n", (long long)bad,
                (unsigned long long)k);
    }
    pthread_mutex_unlock(&lock);
    *k_out = k;
    return bad;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void write_file(const char *name, const char *text)
{
    char path[600], tmp[620];
    snprintf(path, sizeof(path), "%s/%s", statedir, name);
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) {
        fprintf(stderr, "workload: %s: %s\n", tmp, strerror(errno));
        exit(2);
    }
    fputs(text, f);
    fflush(f);
    fsync(fileno(f));
    fclose(f);
    rename(tmp, path);
}

static void finish(void)
{
    uint64_t k;
    int64_t bad = verify(&k);
    char text[160];
    if (bad < 0 && bad_checks == 0)
        snprintf(text, sizeof(text), "ok steps=%llu checks=%llu\n", (unsigned long long)k,
                 (unsigned long long)checks);
    else
        snprintf(text, sizeof(text), "bad page=%lld steps=%llu bad_checks=%llu\n", (long long)bad,
                 (unsigned long long)k, (unsigned long long)bad_checks);
    write_file("result", text);
    exit(bad < 0 && bad_checks == 0 ? 0 : 1);
}

static void *writer(void *arg)
{
    (void)arg;
    const uint64_t batch = 64; /* pages between two looks at the clock */
    double start = now(), last_check = start;
    uint64_t done = 0;
    for (;;) {
        pthread_mutex_lock(&lock);
        for (uint64_t b = 0; b < batch; b++) {
            uint64_t k = steps;
            write_page(k % hot_pages, k / hot_pages + 1);
            steps = k + 1;
        }
        pthread_mutex_unlock(&lock);
        done += batch;
        if (steps_goal && steps >= steps_goal)
            finish();
        double t = now();
        if (check_every > 0 && t - last_check >= check_every) {
            uint64_t k;
            verify(&k);
            last_check = now();
        }
        if (rate) {
            double ahead = done / (double)rate - (now() - start);
            if (ahead > 0)
                usleep((useconds_t)(ahead * 1e6));
        }
    }
    return NULL;
}

static void serve(int listener)
{
    for (;;) {
        int c = accept(listener, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            fprintf(stderr, "workload: accept: %s\n", strerror(errno));
            exit(2);
        }
        char buf[64] = {0}, out[160];
        ssize_t n = read(c, buf, sizeof(buf) - 1);
        int len;
        if (n > 0 && strncmp(buf, "status", 6) == 0) {
            len = snprintf(out, sizeof(out), "ok steps=%llu checks=%llu bad=%llu pid=%d\n",
                           (unsigned long long)steps, (unsigned long long)checks,
                           (unsigned long long)bad_checks, (int)getpid());
        } else if (n > 0 && strncmp(buf, "verify", 6) == 0) {
            uint64_t k;
            int64_t bad = verify(&k);
            if (bad < 0)
                len = snprintf(out, sizeof(out), "ok steps=%llu\n", (unsigned long long)k);
            else
                len = snprintf(out, sizeof(out), "bad page=%lld steps=%llu\n", (long long)bad,
                               (unsigned long long)k);
        } else if (n > 0 && strncmp(buf, "finish ", 7) == 0) {
            pthread_mutex_lock(&lock);
            steps_goal = steps + strtoull(buf + 7, NULL, 10);
            pthread_mutex_unlock(&lock);
            len = snprintf(out, sizeof(out), "ok goal=%llu\n", (unsigned long long)steps_goal);
        } else if (n > 0 && strncmp(buf, "exit", 4) == 0) {
            len = snprintf(out, sizeof(out), "ok\n");
            if (write(c, out, len) < 0) {
            }
            close(c);
            exit(0);
        } else {
            len = snprintf(out, sizeof(out), "error unknown command\n");
        }
        if (write(c, out, len) < 0) {
        }
        close(c);
    }
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: %s STATEDIR MIB HOT_MIB RATE STEPS CHECK_S\n", argv[0]);
        return 2;
    }
    snprintf(statedir, sizeof(statedir), "%s", argv[1]);
    /* Its working directory names it: unlike /proc/PID/cmdline, which the kernel reads from the
     * process's memory (empty while that page waits in the paging file), the cwd is kernel state. */
    if (chdir(statedir) != 0) {
        fprintf(stderr, "workload: chdir %s: %s\n", statedir, strerror(errno));
        return 2;
    }
    npages = strtoull(argv[2], NULL, 10) * 256;
    hot_pages = strtoull(argv[3], NULL, 10) * 256;
    rate = strtoull(argv[4], NULL, 10);
    steps_goal = strtoull(argv[5], NULL, 10);
    check_every = atof(argv[6]);
    if (npages == 0 || hot_pages == 0 || hot_pages > npages) {
        fprintf(stderr, "workload: need 0 < HOT_MIB <= MIB\n");
        return 2;
    }
    region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) {
        fprintf(stderr, "workload: mmap: %s\n", strerror(errno));
        return 2;
    }
    for (uint64_t i = 0; i < npages; i++)
        write_page(i, 0);

    int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_ANY)};
    socklen_t alen = sizeof(addr);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
        listen(listener, 16) < 0 || getsockname(listener, (struct sockaddr *)&addr, &alen) < 0) {
        fprintf(stderr, "workload: listen: %s\n", strerror(errno));
        return 2;
    }
    pthread_t t;
    if (pthread_create(&t, NULL, writer, NULL) != 0) {
        fprintf(stderr, "workload: pthread_create failed\n");
        return 2;
    }
    char text[32];
    snprintf(text, sizeof(text), "%d\n", ntohs(addr.sin_port));
    write_file("port", text);
    serve(listener);
    return 0;
}
