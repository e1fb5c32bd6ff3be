/* Test workload for the CRIU tests (tests/test_criu_*.py): a process tree with a known memory
 * pattern and the kinds of state a migration must carry (threads, a child, pipes with buffered
 * data, an open regular file at an offset, shared and private file mmaps, signal handlers, a
 * listening TCP socket bound to 0.0.0.0).
 *
 * Usage: criu_workload STATEDIR MIB SEED THREADS WITH_CHILD
 * It writes STATEDIR/port (the TCP port it listens on) once ready and then serves one-line
 * commands on that port, one command per connection, answering one line:
 *   ping     -> "pong PID"               (PID as seen in its own PID namespace)
 *   addr     -> "addr START LEN"         (the patterned region)
 *   verify   -> "ok PAGES" | "bad PAGE"  (every page of the region matches the pattern)
 *   release  -> "released"               (madvise(DONTNEED) of the region: simulates the pager
 *                                          releasing managed memory; the expectation is kept)
 *   hot      -> "ok" | "bad"             (a small buffer rewritten by a thread is consistent)
 *   threads  -> "ok N" | "stuck"         (every worker thread makes progress)
 *   signal   -> "ok N" | "bad"           (the SIGUSR1 handler runs; SIGUSR2 is still ignored)
 *   files    -> "ok" | "bad WHAT"        (open file offset+content, shared/private file mmaps)
 *   pipe     -> "ok" | "bad"             (data left in a pipe before the dump is still there)
 *   child    -> "child ok PAGES" | ...   (the child verifies its own region over pipes)
 *   remap    -> "ok ADDR" | "error ..."  (mremap the region to another address, then verify there)
 *   discard  -> "ok" | "bad ..."         (MADV_DONTNEED on the region's second half: that half must
 *                                          read as zeros afterwards, the first half keeps the pattern;
 *                                          the expectation is updated)
 *   forkcheck-> "ok" | "bad"             (a freshly forked child verifies the region and exits)
 *   exit     -> exits the whole tree with status 0
 * Memory pattern: 64-bit word j of page i = mix(seed, i * 512 + j) (splitmix64).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS (PAGE / 8)
#define MAX_THREADS 16
#define HOT_PAGES 16
#define FILE_BYTES (256 * 1024)

static uint64_t *region;
static size_t region_pages;
static size_t discarded_from = (size_t)-1; /* pages from here on were discarded: expect zeros */
static uint64_t seed;
static char statedir[512];
static volatile uint64_t *hot;
static atomic_ulong counters[MAX_THREADS];
static int nthreads;
static volatile sig_atomic_t usr1_count;
static int data_fd = -1;
static unsigned char *shared_map, *private_map;
static int stash_pipe[2];
static int to_child[2], from_child[2];
static pid_t child_pid;

static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t word(uint64_t s, size_t page, size_t j) { return mix(s ^ mix(page * WORDS + j)); }

static void fill(uint64_t *mem, size_t pages, uint64_t s)
{
    for (size_t i = 0; i < pages; i++)
        for (size_t j = 0; j < WORDS; j++)
            mem[i * WORDS + j] = word(s, i, j);
}

/* Returns -1 when every page matches, else the first bad page. */
static long check(const uint64_t *mem, size_t pages, uint64_t s)
{
    for (size_t i = 0; i < pages; i++)
        for (size_t j = 0; j < WORDS; j++)
            if (mem[i * WORDS + j] != word(s, i, j))
                return (long)i;
    return -1;
}

static void die(const char *what)
{
    fprintf(stderr, "workload: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void *worker(void *arg)
{
    long k = (long)arg;
    for (;;) {
        atomic_fetch_add(&counters[k], 1);
        if (k == 0) {
            /* Rewrite the hot buffer: every word of a page holds the same generation number. */
            uint64_t gen = atomic_load(&counters[0]);
            for (size_t p = 0; p < HOT_PAGES; p++)
                for (size_t j = 0; j < WORDS; j++)
                    hot[p * WORDS + j] = gen;
        }
        usleep(2000);
    }
    return NULL;
}

static int hot_consistent(void)
{
    /* The writer may be mid-page; a page is consistent when all its words are equal, and at most
     * one page (the one being written) may be torn. */
    int torn = 0;
    for (size_t p = 0; p < HOT_PAGES; p++)
        for (size_t j = 1; j < WORDS; j++)
            if (hot[p * WORDS + j] != hot[p * WORDS]) {
                torn++;
                break;
            }
    return torn <= 1;
}

static void on_usr1(int sig)
{
    (void)sig;
    usr1_count++;
}

static void child_main(void)
{
    /* The child has a region of its own with another seed and answers "verify" over pipes. */
    size_t pages = region_pages < 1024 ? region_pages : 1024;
    uint64_t *mine = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mine == MAP_FAILED)
        die("child mmap");
    fill(mine, pages, seed + 1);
    close(to_child[1]);
    close(from_child[0]);
    char buf[64];
    for (;;) {
        ssize_t n = read(to_child[0], buf, sizeof(buf));
        if (n <= 0)
            _exit(0);
        long bad = check(mine, pages, seed + 1);
        int len = bad < 0 ? snprintf(buf, sizeof(buf), "child ok %zu\n", pages)
                          : snprintf(buf, sizeof(buf), "child bad %ld\n", bad);
        if (write(from_child[1], buf, len) != len)
            _exit(3);
    }
}

static int files_check(char *out, size_t outlen)
{
    off_t pos = lseek(data_fd, 0, SEEK_CUR);
    if (pos != 5)
        return snprintf(out, outlen, "bad offset %lld\n", (long long)pos);
    char buf[16] = {0};
    if (pread(data_fd, buf, 10, 0) != 10 || memcmp(buf, "0123456789", 10) != 0)
        return snprintf(out, outlen, "bad content\n");
    for (size_t i = 0; i < FILE_BYTES; i++)
        if (shared_map[i] != (unsigned char)(i * 7))
            return snprintf(out, outlen, "bad shared %zu\n", i);
    for (size_t i = 0; i < FILE_BYTES; i++) {
        unsigned char want = i < PAGE ? 0xA5 : (unsigned char)(i * 7);
        if (private_map[i] != want)
            return snprintf(out, outlen, "bad private %zu\n", i);
    }
    return snprintf(out, outlen, "ok\n");
}

static void *remap_region(void)
{
    /* Reserve a new place, then move the region there (REMAP + UNMAP events under uffd). */
    size_t len = region_pages * PAGE;
    void *target = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (target == MAP_FAILED)
        return MAP_FAILED;
    void *moved = mremap(region, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, target);
    if (moved != MAP_FAILED)
        region = moved;
    return moved;
}

static long verify_region(void)
{
    size_t keep = discarded_from < region_pages ? discarded_from : region_pages;
    long bad = check(region, keep, seed);
    if (bad >= 0)
        return bad;
    for (size_t i = keep; i < region_pages; i++)
        for (size_t j = 0; j < WORDS; j++)
            if (region[i * WORDS + j] != 0)
                return (long)i;
    return -1;
}

static int handle(const char *cmd, char *out, size_t outlen)
{
    if (!strcmp(cmd, "ping"))
        return snprintf(out, outlen, "pong %d\n", getpid());
    if (!strcmp(cmd, "addr"))
        return snprintf(out, outlen, "addr %lu %lu\n", (unsigned long)region, region_pages * PAGE);
    if (!strcmp(cmd, "verify")) {
        long bad = verify_region();
        return bad < 0 ? snprintf(out, outlen, "ok %zu\n", region_pages)
                       : snprintf(out, outlen, "bad %ld\n", bad);
    }
    if (!strcmp(cmd, "release")) {
        if (madvise(region, region_pages * PAGE, MADV_DONTNEED))
            return snprintf(out, outlen, "error %s\n", strerror(errno));
        return snprintf(out, outlen, "released\n");
    }
    if (!strcmp(cmd, "hot"))
        return snprintf(out, outlen, hot_consistent() ? "ok\n" : "bad\n");
    if (!strcmp(cmd, "threads")) {
        unsigned long before[MAX_THREADS];
        for (int k = 0; k < nthreads; k++)
            before[k] = atomic_load(&counters[k]);
        for (int tries = 0; tries < 500; tries++) {
            int all = 1;
            usleep(10000);
            for (int k = 0; k < nthreads; k++)
                all &= atomic_load(&counters[k]) > before[k];
            if (all)
                return snprintf(out, outlen, "ok %d\n", nthreads);
        }
        return snprintf(out, outlen, "stuck\n");
    }
    if (!strcmp(cmd, "signal")) {
        struct sigaction sa;
        int before = usr1_count;
        raise(SIGUSR1);
        sigaction(SIGUSR2, NULL, &sa);
        if (usr1_count != before + 1 || sa.sa_handler != SIG_IGN)
            return snprintf(out, outlen, "bad\n");
        return snprintf(out, outlen, "ok %d\n", (int)usr1_count);
    }
    if (!strcmp(cmd, "files"))
        return files_check(out, outlen);
    if (!strcmp(cmd, "pipe")) {
        char buf[16] = {0};
        ssize_t n = read(stash_pipe[0], buf, sizeof(buf) - 1);
        int good = n == 8 && !memcmp(buf, "pipedata", 8);
        if (n > 0 && write(stash_pipe[1], buf, n) != n) /* put it back for the next check */
            good = 0;
        return snprintf(out, outlen, good ? "ok\n" : "bad\n");
    }
    if (!strcmp(cmd, "child")) {
        if (!child_pid)
            return snprintf(out, outlen, "no child\n");
        if (write(to_child[1], "verify\n", 7) != 7)
            return snprintf(out, outlen, "child gone\n");
        ssize_t n = read(from_child[0], out, outlen - 1);
        if (n <= 0)
            return snprintf(out, outlen, "child gone\n");
        return (int)n;
    }
    if (!strcmp(cmd, "remap")) {
        void *moved = remap_region();
        if (moved == MAP_FAILED)
            return snprintf(out, outlen, "error %s\n", strerror(errno));
        long bad = verify_region();
        return bad < 0 ? snprintf(out, outlen, "ok %lu\n", (unsigned long)moved)
                       : snprintf(out, outlen, "bad %ld\n", bad);
    }
    if (!strcmp(cmd, "discard")) {
        size_t half = region_pages / 2;
        if (madvise((char *)region + half * PAGE, (region_pages - half) * PAGE, MADV_DONTNEED))
            return snprintf(out, outlen, "error %s\n", strerror(errno));
        discarded_from = half;
        long bad = verify_region();
        return bad < 0 ? snprintf(out, outlen, "ok\n") : snprintf(out, outlen, "bad %ld\n", bad);
    }
    if (!strcmp(cmd, "forkcheck")) {
        pid_t pid = fork();
        if (pid < 0)
            return snprintf(out, outlen, "error %s\n", strerror(errno));
        if (pid == 0)
            _exit(verify_region() < 0 ? 0 : 1);
        int status = 0;
        if (waitpid(pid, &status, 0) != pid)
            return snprintf(out, outlen, "error %s\n", strerror(errno));
        return snprintf(out, outlen, WIFEXITED(status) && WEXITSTATUS(status) == 0 ? "ok\n" : "bad\n");
    }
    if (!strcmp(cmd, "exit")) {
        if (child_pid)
            kill(child_pid, SIGKILL);
        exit(0);
    }
    return snprintf(out, outlen, "unknown\n");
}

static void write_file(const char *name, const void *data, size_t len)
{
    char path[600];
    snprintf(path, sizeof(path), "%s/%s", statedir, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || write(fd, data, len) != (ssize_t)len || close(fd))
        die(name);
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s STATEDIR MIB SEED THREADS WITH_CHILD\n", argv[0]);
        return 2;
    }
    snprintf(statedir, sizeof(statedir), "%s", argv[1]);
    region_pages = strtoull(argv[2], NULL, 10) * 256;
    seed = strtoull(argv[3], NULL, 10);
    nthreads = atoi(argv[4]);
    int with_child = atoi(argv[5]);
    if (nthreads < 1 || nthreads > MAX_THREADS)
        nthreads = 1;

    region = mmap(NULL, region_pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    hot = mmap(NULL, HOT_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED || hot == MAP_FAILED)
        die("mmap");
    fill(region, region_pages, seed);

    /* Files: an open file at offset 5, a shared file mapping, a private one with one COW page. */
    write_file("data.txt", "0123456789", 10);
    unsigned char *pattern = malloc(FILE_BYTES);
    for (size_t i = 0; i < FILE_BYTES; i++)
        pattern[i] = (unsigned char)(i * 7);
    write_file("mapped.bin", pattern, FILE_BYTES);
    free(pattern);
    char path[600];
    snprintf(path, sizeof(path), "%s/data.txt", statedir);
    data_fd = open(path, O_RDWR);
    if (data_fd < 0 || lseek(data_fd, 5, SEEK_SET) != 5)
        die("data.txt");
    snprintf(path, sizeof(path), "%s/mapped.bin", statedir);
    int mfd = open(path, O_RDWR);
    if (mfd < 0)
        die("mapped.bin");
    shared_map = mmap(NULL, FILE_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    private_map = mmap(NULL, FILE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd, 0);
    if (shared_map == MAP_FAILED || private_map == MAP_FAILED)
        die("file mmap");
    close(mfd);
    memset(private_map, 0xA5, PAGE);

    /* A pipe holding data across the dump. */
    if (pipe(stash_pipe) || write(stash_pipe[1], "pipedata", 8) != 8)
        die("pipe");

    /* Signal handlers. */
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    signal(SIGUSR2, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);

    if (with_child) {
        if (pipe(to_child) || pipe(from_child))
            die("pipe");
        child_pid = fork();
        if (child_pid < 0)
            die("fork");
        if (child_pid == 0)
            child_main();
        close(to_child[0]);
        close(from_child[1]);
    }

    for (long k = 0; k < nthreads; k++) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker, (void *)k))
            die("pthread_create");
    }

    int ls = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_ANY)};
    socklen_t alen = sizeof(addr);
    if (ls < 0 || bind(ls, (struct sockaddr *)&addr, sizeof(addr)) || listen(ls, 16) ||
        getsockname(ls, (struct sockaddr *)&addr, &alen))
        die("listen");
    char port[16];
    int plen = snprintf(port, sizeof(port), "%d\n", ntohs(addr.sin_port));
    write_file("port.tmp", port, plen);
    char from[600], to[600];
    snprintf(from, sizeof(from), "%s/port.tmp", statedir);
    snprintf(to, sizeof(to), "%s/port", statedir);
    if (rename(from, to))
        die("rename");

    for (;;) {
        int c = accept(ls, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR)
                continue;
            die("accept");
        }
        char cmd[64];
        size_t got = 0;
        while (got < sizeof(cmd) - 1) {
            ssize_t n = read(c, cmd + got, sizeof(cmd) - 1 - got);
            if (n <= 0)
                break;
            got += n;
            if (memchr(cmd, '\n', got))
                break;
        }
        cmd[got] = 0;
        char *nl = strchr(cmd, '\n');
        if (nl)
            *nl = 0;
        char out[256];
        int len = handle(cmd, out, sizeof(out));
        if (write(c, out, len) < 0) {
            /* the client went away; nothing to do */
        }
        close(c);
    }
}
