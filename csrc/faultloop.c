/* Native fault-service loop: serves MISSING faults of one or more uffds on its own pthread,
 * without the GIL.
 *
 * On a fault at page A of a uffd, the loop serves the window of `window_pages` pages aligned
 * around A (cut to the VMA that holds A): each page found in one of the uffd's sources (page ->
 * slot index + paging-file fd or mapping) is read from there, every other page is installed as
 * zeros, or, with GFVM_FL_DEFER_MISSING, left alone (a fault on it goes to Python). Pages are
 * installed with UFFDIO_COPY (MODE_WP when the uffd tracks dirty pages, so that an installed
 * page does not count as written; zero pages are then a COPY of zeros, see csrc/uffd.c) or,
 * without WP tracking, UFFDIO_ZEROPAGE for zero runs.
 *
 * Checksums (corruption is never served): an index entry may carry the page's CRC-32 (zlib's).
 * After reading such a page the loop checks it; a page that fails is not installed but poisoned
 * (UFFDIO_POISON: an access raises SIGBUS, never wrong data; in a WP-tracked range the page's
 * write-protect marker is dropped first, since POISON refuses to replace even a marker), and an
 * ERROR event with errno EBADMSG names the page, the slot and the source; the uffd stays served.
 * Entries without a CRC (e.g. CRIU's own image pages) are served unchecked.
 *
 * errno triage (as in Firecracker's handler): EEXIST = page already there, skip it and go on;
 * EAGAIN with no progress = the mm is changing, read the pending events first and redo the
 * window (re-reading the index: a REMOVE may just have dropped entries); ENOENT = the window
 * crossed a VMA edge or the range went away: retry with the faulting page alone, and if even
 * that fails, wake it (it re-faults or gets SIGSEGV like without uffd); ESRCH = the mm is gone;
 * anything else is fatal for that uffd: the loop stops reading it, wakes the faults it had read
 * but not served (so that their messages wait in the uffd for whoever takes over) and queues an
 * ERROR event. Python decides what to do (normally fail-stop the process).
 *
 * Events: fork, remap, remove and unmap block the process until read, so the loop reads them
 * promptly, applies REMOVE/UNMAP (drop index entries: later faults there get zeros) and REMAP
 * (move entries) to every source index itself, serves a forked child at once (new entry whose
 * indexes are clones of the parent's, taken while the parent still waits in fork()), and queues
 * every event for Python, signalling the eventfd `notify_fd` (readable while events are queued).
 * The kernel releases the process from an event as soon as the message is *read*, i.e. a moment
 * before the loop has applied and queued it: gfvm_faultloop_sync() waits for that moment (the
 * loop holds the entry's mutex from read() to the end of the batch).
 *
 * Contract for stopping (stop(), remove(), errors, death of the daemon): the loop never reads a
 * fault it does not serve or wake. Faults not yet read stay queued in the uffd. A thread that
 * faults while nobody serves stays blocked; it never reads zeros *as long as some process keeps
 * the uffd open*: when the last reference to a uffd goes away the kernel resolves faults with
 * zero pages, so the Python side keeps a duplicate of every uffd in a keeper process
 * (PLATFORM.md). A successor that takes over a uffd whose server died must UFFDIO_WAKE all
 * ranges: faults the dead server had read are never sent again.
 *
 * Prefetch (gfvm_faultloop_prefetch): per uffd a queue of ranges whose pages the loop installs
 * from the sources when no fault or event waits (epoll polled with timeout 0 while there is
 * such work), one chunk of up to 256 pages of one VMA per step, never zeros ahead; a PREFETCHED
 * event reports each finished queue. Its copies are ordered with the events like the faults'.
 *
 * Only the loop thread reads messages from a uffd it serves: callers must not read() it. A uffd
 * says nothing when its process exits; the optional pidfd per uffd lets the loop notice (EXIT). */
#include "kernel_abi.h"
#include "checksum.h"
#include "faultloop.h"
#include "pageindex.h"
#include "uffd.h"

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096ull
#define MSG_BATCH 64
#define PENDING_MAX 1024
#define TAG_CTL 0
#define TAG_UFFD 1
#define TAG_PIDFD 2

struct entry {
    uint32_t id;
    int refs;              /* under loop->lock */
    int listed;            /* still in loop->entries (not removed) */
    pthread_mutex_t mu;    /* held while serving; guards everything below */
    int uffd, pidfd, maps_fd;
    uint32_t flags;
    int state, error;
    uint32_t nsources;
    struct gfvm_fl_source sources[GFVM_FL_MAX_SOURCES]; /* own fd dups and index references */
    struct gfvm_fl_counters c;                          /* updated with atomics */
    uint64_t *evict;                                    /* [start, end) pairs, see expect_remove */
    uint32_t n_evict;
    /* Prefetch queue (gfvm_faultloop_prefetch): [start, end) pairs, pf_head the one in work. */
    uint64_t *pf;
    uint32_t pf_n, pf_cap, pf_head;
    uint32_t pf_single;   /* pages of the current range to do one by one (a VMA edge was hit) */
    uint64_t pf_done;     /* pages installed since the queue started */
    int pf_pending;       /* queue not empty (atomic: also read under loop->lock) */
};

struct gfvm_faultloop {
    pthread_mutex_t lock; /* entries, event queue */
    struct entry **entries;
    size_t n_entries, cap_entries;
    uint32_t next_id;
    int epfd, ctl_fd, notify_fd;
    pthread_t thread;
    int running;
    int stop_requested;
    uint32_t window;
    struct gfvm_fl_event *queue;
    size_t q_head, q_len, q_cap;
    struct gfvm_fl_counters total;
    uint64_t hist[GFVM_FL_HIST_BUCKETS];
    char *buf; /* window buffer: only the loop thread uses it */
    int pf_any;        /* some entry may have prefetch work (under lock; atomic reads) */
    size_t pf_next;    /* round robin over entries with prefetch work */
};

struct fault {
    uint64_t addr;
    uint64_t flags;
    uint32_t tid;
};

/* ------------------------------------------------------------------ small helpers */

#define BUMP(e, loop, field, n)                                                \
    do {                                                                       \
        __atomic_add_fetch(&(e)->c.field, (n), __ATOMIC_RELAXED);              \
        __atomic_add_fetch(&(loop)->total.field, (n), __ATOMIC_RELAXED);       \
    } while (0)

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void record_latency(struct gfvm_faultloop *loop, uint64_t ns)
{
    int b = ns ? 63 - __builtin_clzll(ns) : 0; /* bucket b holds [2^b, 2^(b+1)) ns */
    if (b >= GFVM_FL_HIST_BUCKETS)
        b = GFVM_FL_HIST_BUCKETS - 1;
    __atomic_add_fetch(&loop->hist[b], 1, __ATOMIC_RELAXED);
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static void drop_sources(struct entry *e)
{
    for (uint32_t i = 0; i < e->nsources; i++) {
        close_fd(&e->sources[i].fd);
        gfvm_pageindex_unref(e->sources[i].index);
    }
    e->nsources = 0;
}

static void free_entry(struct entry *e)
{
    close_fd(&e->uffd);
    close_fd(&e->pidfd);
    close_fd(&e->maps_fd);
    drop_sources(e);
    free(e->evict);
    free(e->pf);
    pthread_mutex_destroy(&e->mu);
    free(e);
}

static struct entry *find_ref(struct gfvm_faultloop *loop, uint32_t id)
{
    struct entry *found = NULL;
    pthread_mutex_lock(&loop->lock);
    for (size_t i = 0; i < loop->n_entries; i++)
        if (loop->entries[i]->id == id) {
            found = loop->entries[i];
            found->refs++;
            break;
        }
    pthread_mutex_unlock(&loop->lock);
    return found;
}

static void put_ref(struct gfvm_faultloop *loop, struct entry *e)
{
    pthread_mutex_lock(&loop->lock);
    int last = --e->refs == 0;
    pthread_mutex_unlock(&loop->lock);
    if (last)
        free_entry(e);
}

static void notify(struct gfvm_faultloop *loop)
{
    uint64_t one = 1;
    ssize_t rc = write(loop->notify_fd, &one, sizeof(one));
    (void)rc; /* an eventfd write only fails when the counter would overflow: still readable */
}

/* Queues an event for Python. Never drops one: fork events carry fds. Returns -ENOMEM only if
 * the queue cannot grow; the caller then keeps the fd closed-or-owned as it sees fit. */
static int queue_event(struct gfvm_faultloop *loop, const struct gfvm_fl_event *ev)
{
    pthread_mutex_lock(&loop->lock);
    if (loop->q_len == loop->q_cap) {
        size_t cap = loop->q_cap ? loop->q_cap * 2 : 64;
        struct gfvm_fl_event *q = malloc(cap * sizeof(*q));
        if (!q) {
            pthread_mutex_unlock(&loop->lock);
            return -ENOMEM;
        }
        for (size_t i = 0; i < loop->q_len; i++)
            q[i] = loop->queue[(loop->q_head + i) % loop->q_cap];
        free(loop->queue);
        loop->queue = q;
        loop->q_head = 0;
        loop->q_cap = cap;
    }
    loop->queue[(loop->q_head + loop->q_len) % loop->q_cap] = *ev;
    loop->q_len++;
    pthread_mutex_unlock(&loop->lock);
    notify(loop);
    return 0;
}

static void epoll_forget(struct gfvm_faultloop *loop, struct entry *e)
{
    if (e->uffd >= 0)
        epoll_ctl(loop->epfd, EPOLL_CTL_DEL, e->uffd, NULL);
    if (e->pidfd >= 0)
        epoll_ctl(loop->epfd, EPOLL_CTL_DEL, e->pidfd, NULL);
}

/* Ends an entry's prefetch queue (done, or given up with `err`): PREFETCHED event with the pages
 * it installed. Caller holds e->mu. */
static void end_prefetch(struct gfvm_faultloop *loop, struct entry *e, int err)
{
    if (!__atomic_load_n(&e->pf_pending, __ATOMIC_RELAXED))
        return;
    free(e->pf);
    e->pf = NULL;
    e->pf_n = e->pf_cap = e->pf_head = e->pf_single = 0;
    __atomic_store_n(&e->pf_pending, 0, __ATOMIC_RELEASE);
    struct gfvm_fl_event ev = {.kind = GFVM_FL_PREFETCHED, .uffd_id = e->id, .count = e->pf_done, .error = err,
                               .fd = -1};
    queue_event(loop, &ev);
}

/* The entry's process is gone: stop reading its uffd, tell Python (once). Caller holds e->mu. */
static void mark_exited(struct gfvm_faultloop *loop, struct entry *e)
{
    if (e->state != GFVM_FL_ACTIVE)
        return;
    e->state = GFVM_FL_EXITED;
    epoll_forget(loop, e);
    end_prefetch(loop, e, ESRCH);
    struct gfvm_fl_event ev = {.kind = GFVM_FL_EXIT, .uffd_id = e->id, .fd = -1};
    queue_event(loop, &ev);
}

/* Fatal error: stop reading the uffd, wake the faults read but not served so that their
 * messages are queued again for whoever takes over, tell Python. Caller holds e->mu. */
static void mark_failed(struct gfvm_faultloop *loop, struct entry *e, int err, const struct fault *unserved,
                        int n_unserved)
{
    if (e->state != GFVM_FL_ACTIVE)
        return;
    e->state = GFVM_FL_FAILED;
    e->error = err;
    epoll_forget(loop, e);
    end_prefetch(loop, e, err);
    for (int i = 0; i < n_unserved; i++)
        gfvm_uffd_wake(e->uffd, unserved[i].addr & ~(PAGE - 1), PAGE);
    BUMP(e, loop, errors, 1);
    struct gfvm_fl_event ev = {.kind = GFVM_FL_ERROR, .uffd_id = e->id, .fd = -1, .error = err};
    queue_event(loop, &ev);
}

/* ------------------------------------------------------------------ entries */

static int add_source_refs(struct entry *e, const struct gfvm_fl_source *src, uint32_t n, int clone)
{
    for (uint32_t i = 0; i < n; i++) {
        struct gfvm_fl_source *s = &e->sources[i];
        *s = src[i];
        s->fd = -1;
        s->index = NULL;
        if (src[i].fd >= 0) {
            s->fd = fcntl(src[i].fd, F_DUPFD_CLOEXEC, 3);
            if (s->fd < 0) {
                e->nsources = i;
                return -errno;
            }
        }
        if (clone) {
            s->index = gfvm_pageindex_clone(src[i].index);
            if (!s->index) {
                close_fd(&s->fd);
                e->nsources = i;
                return -ENOMEM;
            }
        } else {
            s->index = src[i].index;
            gfvm_pageindex_ref(s->index);
        }
        e->nsources = i + 1;
    }
    return 0;
}

static int open_maps(int pid)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/maps", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

static int watch(struct gfvm_faultloop *loop, int fd, uint32_t id, int tag)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = ((uint64_t)id << 8) | (uint64_t)tag};
    return epoll_ctl(loop->epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

/* Registers an entry whose fds are set up. On failure the caller still owns `e` (not listed).
 * The id is watched before the entry is listed: until then the loop thread finds no entry for
 * it and simply polls again. */
static int insert_entry(struct gfvm_faultloop *loop, struct entry *e, uint32_t *id)
{
    pthread_mutex_lock(&loop->lock);
    e->id = ++loop->next_id;
    pthread_mutex_unlock(&loop->lock);
    int rc = watch(loop, e->uffd, e->id, TAG_UFFD);
    if (rc == 0 && e->pidfd >= 0)
        rc = watch(loop, e->pidfd, e->id, TAG_PIDFD);
    if (rc == 0) {
        pthread_mutex_lock(&loop->lock);
        if (loop->n_entries == loop->cap_entries) {
            size_t cap = loop->cap_entries ? loop->cap_entries * 2 : 8;
            struct entry **v = realloc(loop->entries, cap * sizeof(*v));
            if (v) {
                loop->entries = v;
                loop->cap_entries = cap;
            } else {
                rc = -ENOMEM;
            }
        }
        if (rc == 0) {
            e->refs = 1;
            e->listed = 1;
            loop->entries[loop->n_entries++] = e;
        }
        pthread_mutex_unlock(&loop->lock);
    }
    if (rc < 0) {
        epoll_forget(loop, e);
        return rc;
    }
    *id = e->id;
    return 0;
}

static struct entry *new_entry(void)
{
    struct entry *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    pthread_mutex_init(&e->mu, NULL);
    e->uffd = e->pidfd = e->maps_fd = -1;
    return e;
}

int gfvm_faultloop_add(struct gfvm_faultloop *loop, const struct gfvm_fl_uffd_spec *spec, uint32_t *id)
{
    if (spec->nsources > GFVM_FL_MAX_SOURCES || spec->uffd < 0)
        return -EINVAL;
    for (uint32_t i = 0; i < spec->nsources; i++)
        if (!spec->sources[i].index || (spec->sources[i].fd < 0 && !spec->sources[i].map))
            return -EINVAL;
    struct entry *e = new_entry();
    if (!e)
        return -ENOMEM;
    int rc = 0;
    e->flags = spec->flags;
    e->uffd = fcntl(spec->uffd, F_DUPFD_CLOEXEC, 3);
    if (e->uffd < 0)
        rc = -errno;
    if (rc == 0 && spec->pidfd >= 0) {
        e->pidfd = fcntl(spec->pidfd, F_DUPFD_CLOEXEC, 3);
        if (e->pidfd < 0)
            rc = -errno;
    }
    if (rc == 0 && spec->pid > 0) {
        e->maps_fd = open_maps(spec->pid);
        if (e->maps_fd < 0)
            rc = e->maps_fd;
    }
    if (rc == 0) {
        /* poll() on a uffd whose file is not O_NONBLOCK reports POLLERR for ever. */
        int fl = fcntl(e->uffd, F_GETFL);
        if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(e->uffd, F_SETFL, fl | O_NONBLOCK) < 0))
            rc = -errno;
    }
    if (rc == 0)
        rc = add_source_refs(e, spec->sources, spec->nsources, 0);
    if (rc == 0)
        rc = insert_entry(loop, e, id);
    if (rc < 0)
        free_entry(e);
    return rc;
}

int gfvm_faultloop_set_sources(struct gfvm_faultloop *loop, uint32_t id, const struct gfvm_fl_source *sources,
                               uint32_t nsources)
{
    if (nsources > GFVM_FL_MAX_SOURCES)
        return -EINVAL;
    for (uint32_t i = 0; i < nsources; i++)
        if (!sources[i].index || (sources[i].fd < 0 && !sources[i].map))
            return -EINVAL;
    struct entry *e = find_ref(loop, id);
    if (!e)
        return -ENOENT;
    pthread_mutex_lock(&e->mu);
    struct gfvm_fl_source old[GFVM_FL_MAX_SOURCES];
    uint32_t n_old = e->nsources;
    memcpy(old, e->sources, sizeof(old));
    int rc = add_source_refs(e, sources, nsources, 0);
    if (rc < 0) {
        drop_sources(e); /* the partial new set */
        memcpy(e->sources, old, sizeof(old));
        e->nsources = n_old;
    } else {
        for (uint32_t i = 0; i < n_old; i++) {
            close_fd(&old[i].fd);
            gfvm_pageindex_unref(old[i].index);
        }
    }
    pthread_mutex_unlock(&e->mu);
    put_ref(loop, e);
    return rc;
}

/* Gives an entry (typically a forked child's) its process: pidfd to notice its death, pid to
 * clamp windows to VMAs. */
int gfvm_faultloop_set_process(struct gfvm_faultloop *loop, uint32_t id, int pid, int pidfd)
{
    struct entry *e = find_ref(loop, id);
    if (!e)
        return -ENOENT;
    int rc = 0, maps = -1, pfd = -1;
    if (pid > 0 && (maps = open_maps(pid)) < 0)
        rc = maps;
    if (rc == 0 && pidfd >= 0 && (pfd = fcntl(pidfd, F_DUPFD_CLOEXEC, 3)) < 0)
        rc = -errno;
    pthread_mutex_lock(&e->mu);
    if (rc == 0) {
        if (maps >= 0) {
            close_fd(&e->maps_fd);
            e->maps_fd = maps;
            maps = -1;
        }
        if (pfd >= 0) {
            if (e->pidfd >= 0) {
                epoll_ctl(loop->epfd, EPOLL_CTL_DEL, e->pidfd, NULL);
                close_fd(&e->pidfd);
            }
            e->pidfd = pfd;
            pfd = -1;
            if (e->state == GFVM_FL_ACTIVE)
                rc = watch(loop, e->pidfd, e->id, TAG_PIDFD);
        }
    }
    pthread_mutex_unlock(&e->mu);
    close_fd(&maps);
    close_fd(&pfd);
    put_ref(loop, e);
    return rc;
}

/* Stops serving a uffd. The loop thread may be in the middle of a batch for it: it finishes that
 * batch (every fault it read gets served) and then lets go; fds are closed when the last
 * reference goes. */
int gfvm_faultloop_remove(struct gfvm_faultloop *loop, uint32_t id)
{
    struct entry *e = NULL;
    pthread_mutex_lock(&loop->lock);
    for (size_t i = 0; i < loop->n_entries; i++)
        if (loop->entries[i]->id == id) {
            e = loop->entries[i];
            loop->entries[i] = loop->entries[--loop->n_entries];
            break;
        }
    pthread_mutex_unlock(&loop->lock);
    if (!e)
        return -ENOENT;
    pthread_mutex_lock(&e->mu);
    e->listed = 0;
    epoll_forget(loop, e);
    end_prefetch(loop, e, ECANCELED);
    pthread_mutex_unlock(&e->mu);
    put_ref(loop, e);
    return 0;
}

static int cmp_pair(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Announces the pager's own evictions: until the next call, REMOVE events inside these ranges
 * (from MADV_DONTNEED injected by the pager) keep their index entries, and are queued with
 * flags GFVM_FL_EVICTED. n = 0 ends the announcement. Taking e->mu orders this after every
 * event of the batch being served, so "announce; inject madvise; end announcement" is exact. */
int gfvm_faultloop_expect_remove(struct gfvm_faultloop *loop, uint32_t id, const uint64_t *starts,
                                 const uint64_t *ends, uint32_t n)
{
    uint64_t *v = NULL;
    if (n) {
        v = malloc(2 * n * sizeof(*v));
        if (!v)
            return -ENOMEM;
        for (uint32_t i = 0; i < n; i++) {
            if (ends[i] < starts[i]) {
                free(v);
                return -EINVAL;
            }
            v[2 * i] = starts[i];
            v[2 * i + 1] = ends[i];
        }
        qsort(v, n, 2 * sizeof(*v), cmp_pair);
        uint32_t m = 0; /* merge overlapping or touching ranges */
        for (uint32_t i = 0; i < n; i++) {
            if (m > 0 && v[2 * i] <= v[2 * (m - 1) + 1]) {
                if (v[2 * i + 1] > v[2 * (m - 1) + 1])
                    v[2 * (m - 1) + 1] = v[2 * i + 1];
            } else {
                v[2 * m] = v[2 * i];
                v[2 * m + 1] = v[2 * i + 1];
                m++;
            }
        }
        n = m;
    }
    struct entry *e = find_ref(loop, id);
    if (!e) {
        free(v);
        return -ENOENT;
    }
    pthread_mutex_lock(&e->mu);
    free(e->evict);
    e->evict = v;
    e->n_evict = n;
    pthread_mutex_unlock(&e->mu);
    put_ref(loop, e);
    return 0;
}

/* The sources entry `id` serves from (for a forked child: the clones the loop made at the fork).
 * out[i].index carries a new reference and out[i].fd a new descriptor (-1: none), both the
 * caller's; map/map_len are the mapping as given. Returns how many (at most max), or -errno. */
int gfvm_faultloop_sources(struct gfvm_faultloop *loop, uint32_t id, struct gfvm_fl_source *out, uint32_t max)
{
    struct entry *e = find_ref(loop, id);
    if (!e)
        return -ENOENT;
    int rc = 0;
    uint32_t n = 0;
    pthread_mutex_lock(&e->mu);
    for (; n < e->nsources && n < max; n++) {
        out[n] = e->sources[n];
        if (out[n].fd >= 0 && (out[n].fd = fcntl(out[n].fd, F_DUPFD_CLOEXEC, 3)) < 0) {
            rc = -errno;
            break;
        }
        gfvm_pageindex_ref(out[n].index);
    }
    pthread_mutex_unlock(&e->mu);
    if (rc < 0)
        for (uint32_t i = 0; i < n; i++) {
            close_fd(&out[i].fd);
            gfvm_pageindex_unref(out[i].index);
        }
    put_ref(loop, e);
    return rc < 0 ? rc : (int)n;
}

/* Returns once the loop thread has finished with every message it has read so far from uffd `id`
 * (0: from every uffd): events applied to the indexes and queued, faults served. Needed because
 * the kernel lets a process return from madvise/munmap/mremap/fork as soon as the loop *reads*
 * the event, a moment before the loop has applied and queued it. The loop holds e->mu from the
 * read to the end of the batch, so taking and releasing it is the barrier. */
int gfvm_faultloop_sync(struct gfvm_faultloop *loop, uint32_t id)
{
    if (id != 0) {
        struct entry *e = find_ref(loop, id);
        if (!e)
            return -ENOENT;
        pthread_mutex_lock(&e->mu);
        pthread_mutex_unlock(&e->mu);
        put_ref(loop, e);
        return 0;
    }
    pthread_mutex_lock(&loop->lock);
    size_t n = loop->n_entries;
    struct entry **v = malloc((n ? n : 1) * sizeof(*v));
    if (!v) {
        pthread_mutex_unlock(&loop->lock);
        return -ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        v[i] = loop->entries[i];
        v[i]->refs++;
    }
    pthread_mutex_unlock(&loop->lock);
    for (size_t i = 0; i < n; i++) {
        pthread_mutex_lock(&v[i]->mu);
        pthread_mutex_unlock(&v[i]->mu);
        put_ref(loop, v[i]);
    }
    free(v);
    return 0;
}

int gfvm_faultloop_state(struct gfvm_faultloop *loop, uint32_t id, int *state, int *error)
{
    struct entry *e = find_ref(loop, id);
    if (!e)
        return -ENOENT;
    pthread_mutex_lock(&e->mu);
    *state = e->state;
    *error = e->error;
    pthread_mutex_unlock(&e->mu);
    put_ref(loop, e);
    return 0;
}

/* A new fd for the uffd an entry serves (e.g. to hand a forked child's uffd to a keeper). */
int gfvm_faultloop_dup_uffd(struct gfvm_faultloop *loop, uint32_t id)
{
    struct entry *e = find_ref(loop, id);
    if (!e)
        return -ENOENT;
    int fd = fcntl(e->uffd, F_DUPFD_CLOEXEC, 3);
    int rc = fd < 0 ? -errno : fd;
    put_ref(loop, e);
    return rc;
}

/* ------------------------------------------------------------------ serving a window */

enum install_result { INSTALLED = 0, NEED_DRAIN = 1, HIT_ENOENT = 2, MM_GONE = 3 };

/* Page classes in a window's slots[]: >= 0 data from a source, else: */
#define SLOT_NONE (-1)   /* in no source: zeros (or left alone) */
#define SLOT_POISON (-2) /* its bytes failed their checksum: poisoned, never served */

/* What one window looked up and read: per page its slot (or class), source, checksum (-1: none)
 * and, for poisoned pages, the slot that failed. The data is in loop->buf. */
struct window {
    uint64_t start, n;
    int64_t slots[GFVM_FL_MAX_WINDOW];
    int64_t crcs[GFVM_FL_MAX_WINDOW];
    int64_t bad_slot[GFVM_FL_MAX_WINDOW];
    uint8_t src[GFVM_FL_MAX_WINDOW];
};

struct tally {
    uint64_t copied, zeros, poisoned;              /* pages installed with data / as zeros / poisoned */
    uint64_t from_source[GFVM_FL_MAX_SOURCES];     /* copied, per source */
    int fault_present;                             /* the faulting page turned out to be there already */
};

static void count_installed(struct tally *t, const struct window *w, uint64_t first, uint64_t n)
{
    for (uint64_t i = first; i < first + n; i++) {
        if (w->slots[i] >= 0) {
            t->copied++;
            t->from_source[w->src[i]]++;
        } else {
            t->zeros++;
        }
    }
}

static void bump_tally(struct gfvm_faultloop *loop, struct entry *e, const struct tally *t)
{
    BUMP(e, loop, pages_copied, t->copied);
    BUMP(e, loop, pages_zero, t->zeros);
    BUMP(e, loop, pages_poisoned, t->poisoned);
    for (uint32_t s = 0; s < GFVM_FL_MAX_SOURCES; s++)
        if (t->from_source[s])
            BUMP(e, loop, from_source[s], t->from_source[s]);
}

/* Installs pages [first, first + n) of the window from loop->buf (data: true) or as zeros
 * (UFFDIO_ZEROPAGE). Skips pages that are already present. Returns an install_result or -errno
 * (fatal). */
static int install(struct gfvm_faultloop *loop, struct entry *e, const struct window *w, uint64_t first,
                   uint64_t n, int data, uint64_t fault, struct tally *t)
{
    static const char zero_page[PAGE] __attribute__((aligned(PAGE)));
    uint64_t start = w->start + first * PAGE, end = start + n * PAGE, pos = start;
    const char *src = data ? loop->buf + first * PAGE : NULL;
    uint64_t mode = (e->flags & GFVM_FL_WP) ? UFFDIO_COPY_MODE_WP : 0;
    while (pos < end) {
        int64_t done = 0;
        int rc = src ? gfvm_uffd_copy(e->uffd, pos, src + (pos - start), end - pos, mode, &done)
                     : gfvm_uffd_zeropage(e->uffd, pos, end - pos, 0, &done);
        count_installed(t, w, (pos - w->start) / PAGE, (uint64_t)done / PAGE);
        pos += (uint64_t)done;
        if (rc == 0)
            break;
        if (rc == -EAGAIN && done > 0)
            continue; /* partial: stopped in front of a present page, EEXIST comes next */
        if (rc == -EEXIST && !src) {
            /* ZEROPAGE also refuses a missing page that carries a write-protect marker (a
             * WP-armed range served without wp); COPY accepts it. */
            rc = gfvm_uffd_copy(e->uffd, pos, zero_page, PAGE, mode, &done);
            if (rc == 0) {
                t->zeros++;
                pos += PAGE;
                continue;
            }
        }
        if (rc == -EAGAIN)
            return NEED_DRAIN;
        if (rc == -EEXIST) {
            BUMP(e, loop, eexist, 1);
            if (pos == fault)
                t->fault_present = 1;
            pos += PAGE;
            continue;
        }
        if (rc == -ENOENT)
            return HIT_ENOENT;
        if (rc == -ESRCH)
            return MM_GONE;
        return rc;
    }
    return INSTALLED;
}

/* Page i of the window failed its checksum: UFFDIO_POISON it (an access raises SIGBUS, never
 * wrong data) and tell Python (ERROR event, errno EBADMSG, naming the page and the slot). If
 * poisoning itself fails for good, the error is fatal for the uffd (its faults then wait). */
static int poison(struct gfvm_faultloop *loop, struct entry *e, const struct window *w, uint64_t i, uint64_t fault,
                  struct tally *t)
{
    uint64_t addr = w->start + i * PAGE;
    int64_t done = 0;
    int rc = gfvm_uffd_poison(e->uffd, addr, PAGE, 0, &done);
    if (rc == -EEXIST &&
        gfvm_uffd_writeprotect(e->uffd, addr, PAGE, UFFDIO_WRITEPROTECT_MODE_DONTWAKE) == 0)
        /* POISON refuses to replace even a write-protect marker (a missing page in a WP-tracked
         * range, e.g. after an eviction), where COPY would not: drop the marker, then poison.
         * (Fails with EINVAL where the range is not WP-registered: then the page is present.) */
        rc = gfvm_uffd_poison(e->uffd, addr, PAGE, 0, &done);
    if (rc == -EAGAIN)
        return NEED_DRAIN;
    if (rc == -ENOENT)
        return HIT_ENOENT;
    if (rc == -ESRCH)
        return MM_GONE;
    if (rc == -EEXIST) { /* present already (installed before the slot went bad): not ours */
        BUMP(e, loop, eexist, 1);
        if (addr == fault)
            t->fault_present = 1;
        return INSTALLED;
    }
    if (rc == 0)
        t->poisoned++;
    struct gfvm_fl_event ev = {.kind = GFVM_FL_ERROR, .uffd_id = e->id, .start = addr, .end = addr + PAGE,
                               .slot = (uint64_t)w->bad_slot[i], .source = w->src[i], .error = EBADMSG,
                               .fd = -1};
    queue_event(loop, &ev);
    return rc == 0 ? INSTALLED : rc;
}

/* Looks the window's pages up in the sources (the first source that has a page wins). Returns
 * how many pages have data. */
static uint64_t lookup_window(struct entry *e, struct window *w)
{
    int64_t tmp[GFVM_FL_MAX_WINDOW], tmp_crc[GFVM_FL_MAX_WINDOW];
    uint64_t found = 0;
    for (uint64_t i = 0; i < w->n; i++)
        w->slots[i] = SLOT_NONE;
    for (uint32_t s = 0; s < e->nsources; s++) {
        if (gfvm_pageindex_lookup_run(e->sources[s].index, w->start, w->n, tmp, tmp_crc) == 0)
            continue;
        for (uint64_t i = 0; i < w->n; i++)
            if (w->slots[i] < 0 && tmp[i] >= 0) {
                w->slots[i] = tmp[i];
                w->crcs[i] = tmp_crc[i];
                w->src[i] = (uint8_t)s;
                found++;
            }
    }
    return found;
}

/* Reads the pages of a window that have a slot into loop->buf and verifies their checksums: a
 * page that fails becomes SLOT_POISON (bad_slot keeps its slot). */
static int read_sources(struct gfvm_faultloop *loop, struct entry *e, struct window *w)
{
    uint64_t i = 0, n = w->n;
    const int64_t *slots = w->slots;
    while (i < n) {
        if (slots[i] < 0) {
            i++;
            continue;
        }
        uint64_t j = i + 1; /* one read for a run of consecutive slots of one source */
        while (j < n && slots[j] == slots[j - 1] + 1 && w->src[j] == w->src[i])
            j++;
        const struct gfvm_fl_source *s = &e->sources[w->src[i]];
        uint64_t off = (uint64_t)slots[i] * PAGE, len = (j - i) * PAGE;
        char *dst = loop->buf + i * PAGE;
        if (s->map && off + len <= s->map_len) {
            memcpy(dst, (const char *)s->map + off, len);
        } else if (s->fd >= 0) {
            uint64_t got = 0;
            while (got < len) {
                ssize_t r = pread(s->fd, dst + got, len - got, (off_t)(off + got));
                if (r < 0 && errno == EINTR)
                    continue;
                if (r < 0)
                    return -errno;
                if (r == 0)
                    return -EIO; /* slot beyond the end of the paging file: never serve zeros for it */
                got += (uint64_t)r;
            }
        } else {
            return -EIO; /* slot beyond the caller's mapping and no fd to read it from */
        }
        i = j;
    }
    for (i = 0; i < n; i++)
        if (w->slots[i] >= 0 && w->crcs[i] >= 0 && gfvm_crc32_page(loop->buf + i * PAGE) != (uint32_t)w->crcs[i]) {
            w->bad_slot[i] = w->slots[i];
            w->slots[i] = SLOT_POISON;
        }
    return 0;
}

/* Installs a window that read_sources filled: data pages by COPY, failed ones by POISON, pages in
 * no source as zeros -- with WP tracking in the same COPY as their neighbours (zeros that go in
 * write-protected), else by ZEROPAGE -- or, with `zeros` 0, not at all. */
static int install_window(struct gfvm_faultloop *loop, struct entry *e, struct window *w, int zeros,
                          uint64_t fault, struct tally *t)
{
    int one_copy = zeros && (e->flags & GFVM_FL_WP);
    int rc = INSTALLED;
    for (uint64_t i = 0; i < w->n && rc == INSTALLED;) {
        uint64_t j = i + 1;
        if (w->slots[i] == SLOT_POISON) {
            rc = poison(loop, e, w, i, fault, t);
        } else if (one_copy) {
            while (j < w->n && w->slots[j] != SLOT_POISON)
                j++;
            for (uint64_t k = i; k < j; k++)
                if (w->slots[k] < 0)
                    memset(loop->buf + k * PAGE, 0, PAGE);
            rc = install(loop, e, w, i, j - i, 1, fault, t);
        } else {
            while (j < w->n && w->slots[j] != SLOT_POISON && (w->slots[j] >= 0) == (w->slots[i] >= 0))
                j++;
            if (w->slots[i] >= 0)
                rc = install(loop, e, w, i, j - i, 1, fault, t);
            else if (zeros)
                rc = install(loop, e, w, i, j - i, 0, fault, t);
        }
        i = j;
    }
    return rc;
}

/* The VMA holding `page`, via PROCMAP_QUERY. Returns 0, -ENOENT (no VMA there) or another -errno
 * (query unavailable: the caller does without). */
static int query_vma(struct entry *e, uint64_t page, uint64_t *vs, uint64_t *ve)
{
    if (e->maps_fd < 0)
        return -EBADF;
    struct procmap_query q = {.size = sizeof(q), .query_addr = page};
    if (ioctl(e->maps_fd, PROCMAP_QUERY, &q) < 0)
        return -errno;
    *vs = q.vma_start;
    *ve = q.vma_end;
    return 0;
}

/* Serves the window around fault page `page`. Returns INSTALLED, NEED_DRAIN, MM_GONE, or -errno;
 * a deferred page is queued for Python (returns INSTALLED). The window goes to w_start, w_end. */
static int serve_window(struct gfvm_faultloop *loop, struct entry *e, const struct fault *f, int single,
                        uint64_t *w_start, uint64_t *w_end)
{
    static __thread struct window w;
    uint64_t page = f->addr & ~(PAGE - 1);
    uint64_t n = single ? 1 : loop->window;
    uint64_t ws = page - ((page / PAGE) % n) * PAGE, we = ws + n * PAGE;
    if (!single) {
        uint64_t vs = 0, ve = 0;
        int q = query_vma(e, page, &vs, &ve);
        if (q == 0) {
            if (ws < vs)
                ws = vs;
            if (we > ve)
                we = ve;
        } else if (q == -ENOENT) {
            ws = page; /* no VMA (unmapped meanwhile): let the copy say so */
            we = page + PAGE;
        } else if (q == -ESRCH) {
            return MM_GONE;
        }
    }
    w.start = ws;
    w.n = (we - ws) / PAGE;
    *w_start = ws;
    *w_end = we;
    lookup_window(e, &w);
    uint64_t fi = (page - ws) / PAGE;
    int defer = (e->flags & GFVM_FL_DEFER_MISSING) != 0;
    if (defer && w.slots[fi] < 0) {
        struct gfvm_fl_event ev = {.kind = GFVM_FL_FAULT, .uffd_id = e->id, .start = f->addr,
                                   .flags = f->flags, .tid = f->tid, .fd = -1};
        BUMP(e, loop, deferred, 1);
        queue_event(loop, &ev);
        return INSTALLED; /* the faulting page is Python's; neighbours wait for their own faults */
    }
    int rc = read_sources(loop, e, &w);
    if (rc < 0)
        return rc;
    struct tally t;
    memset(&t, 0, sizeof(t));
    rc = install_window(loop, e, &w, !defer, page, &t);
    bump_tally(loop, e, &t);
    if (rc != INSTALLED)
        return rc;
    if (t.fault_present)
        gfvm_uffd_wake(e->uffd, page, PAGE); /* whoever installed it may not have woken us */
    BUMP(e, loop, windows, 1);
    return INSTALLED;
}

/* ------------------------------------------------------------------ events */

static void remove_from_indexes(struct entry *e, uint64_t start, uint64_t end)
{
    for (uint32_t s = 0; s < e->nsources && start < end; s++)
        gfvm_pageindex_remove_range(e->sources[s].index, start, end);
}

/* A REMOVE drops the entries of [start, end), except where the pager announced an eviction
 * (its own injected MADV_DONTNEED: those pages live on in the paging file). Returns 1 when the
 * whole range was an announced eviction. The announced ranges are sorted and disjoint. */
static int apply_remove(struct entry *e, uint64_t start, uint64_t end)
{
    uint64_t pos = start;
    for (uint32_t i = 0; i < e->n_evict && pos < end; i++) {
        uint64_t es = e->evict[2 * i], ee = e->evict[2 * i + 1];
        if (ee <= pos || es >= end)
            continue;
        remove_from_indexes(e, pos, es > pos ? es : pos);
        pos = ee;
    }
    if (pos == start) {
        remove_from_indexes(e, start, end);
        return 0;
    }
    remove_from_indexes(e, pos, end);
    return pos >= end && e->n_evict > 0 ? 1 : 0;
}

static void apply_to_indexes(struct entry *e, const struct gfvm_uffd_event *ev)
{
    if (ev->event == UFFD_EVENT_REMAP)
        for (uint32_t s = 0; s < e->nsources; s++)
            gfvm_pageindex_move_range(e->sources[s].index, ev->start, ev->to, ev->end - ev->start);
    else
        remove_from_indexes(e, ev->start, ev->end);
}

/* A forked child: serve it at once with clones of the parent's indexes (the parent waits in
 * fork() until this message is read, so the clones are exactly the parent's state at fork). */
static void handle_fork(struct gfvm_faultloop *loop, struct entry *parent, int child_uffd)
{
    struct gfvm_fl_event out = {.kind = GFVM_FL_FORK, .uffd_id = parent->id, .fd = -1};
    struct entry *c = new_entry();
    int rc = c ? 0 : -ENOMEM;
    if (rc == 0) {
        c->flags = parent->flags;
        rc = add_source_refs(c, parent->sources, parent->nsources, 1);
        if (rc == 0) {
            c->uffd = child_uffd;
            rc = insert_entry(loop, c, &out.child_id);
            if (rc < 0)
                c->uffd = -1; /* stays Python's, below */
        }
        if (rc < 0)
            free_entry(c);
    }
    if (rc == 0) {
        /* Served by the loop (child_id); Python gets its own fd for the keeper. */
        out.fd = fcntl(child_uffd, F_DUPFD_CLOEXEC, 3);
        if (out.fd < 0)
            out.error = errno; /* gfvm_faultloop_dup_uffd(child_id) can still get one */
    } else {
        /* Not served (child_id 0): Python gets the uffd itself and must serve it. */
        out.fd = child_uffd;
        out.error = -rc;
        BUMP(parent, loop, errors, 1);
    }
    if (queue_event(loop, &out) < 0 && out.fd >= 0)
        close(out.fd);
}

/* Applies and queues one non-fault message. Caller holds e->mu. */
static void handle_event(struct gfvm_faultloop *loop, struct entry *e, const struct gfvm_uffd_event *ev)
{
    BUMP(e, loop, events, 1);
    struct gfvm_fl_event out = {.uffd_id = e->id, .start = ev->start, .end = ev->end, .to = ev->to, .fd = -1};
    switch (ev->event) {
    case UFFD_EVENT_FORK:
        handle_fork(loop, e, (int)ev->fd);
        return;
    case UFFD_EVENT_REMAP:
        out.kind = GFVM_FL_REMAP;
        break;
    case UFFD_EVENT_REMOVE:
        out.kind = GFVM_FL_REMOVE;
        out.flags = apply_remove(e, ev->start, ev->end) ? GFVM_FL_EVICTED : 0;
        queue_event(loop, &out);
        return;
    case UFFD_EVENT_UNMAP:
        out.kind = GFVM_FL_UNMAP;
        break;
    default:
        return;
    }
    apply_to_indexes(e, ev);
    queue_event(loop, &out);
}

/* Reads a batch of messages; applies events now, appends faults to pend (PENDING_MAX of them at
 * most: beyond that a fault is woken instead, so it faults again and is read later). Returns
 * the number of messages read, or -errno. */
static int read_messages(struct gfvm_faultloop *loop, struct entry *e, struct fault *pend, int *np)
{
    struct uffd_msg msgs[MSG_BATCH];
    ssize_t r = read(e->uffd, msgs, sizeof(msgs));
    if (r < 0)
        return errno == EAGAIN ? 0 : -errno;
    int n = (int)(r / (ssize_t)sizeof(msgs[0]));
    for (int i = 0; i < n; i++) {
        struct gfvm_uffd_event ev;
        gfvm_uffd_decode(&msgs[i], &ev);
        if (ev.event == UFFD_EVENT_PAGEFAULT) {
            BUMP(e, loop, faults, 1);
            if (*np < PENDING_MAX)
                pend[(*np)++] = (struct fault){.addr = ev.address, .flags = ev.flags, .tid = ev.tid};
            else
                gfvm_uffd_wake(e->uffd, ev.address & ~(PAGE - 1), PAGE);
        } else {
            handle_event(loop, e, &ev);
        }
    }
    return n;
}

static void defer_fault(struct gfvm_faultloop *loop, struct entry *e, const struct fault *f)
{
    struct gfvm_fl_event ev = {.kind = GFVM_FL_FAULT, .uffd_id = e->id, .start = f->addr, .flags = f->flags,
                               .tid = f->tid, .fd = -1};
    BUMP(e, loop, deferred, 1);
    queue_event(loop, &ev);
}

/* One batch for one uffd: read messages, serve every fault read. Caller holds e->mu. Returns the
 * number of messages read (0: nothing was pending). */
static int serve_batch(struct gfvm_faultloop *loop, struct entry *e)
{
    static __thread struct fault pend[PENDING_MAX];
    int np = 0;
    int n = read_messages(loop, e, pend, &np);
    if (n < 0) {
        mark_failed(loop, e, -n, pend, np);
        return 0;
    }
    uint64_t t0 = now_ns();
    uint64_t done_start[MSG_BATCH], done_end[MSG_BATCH];
    int n_done = 0;
    for (int i = 0; i < np && e->state == GFVM_FL_ACTIVE; i++) {
        const struct fault *f = &pend[i];
        uint64_t page = f->addr & ~(PAGE - 1);
        if (f->flags & (UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR)) {
            defer_fault(loop, e, f); /* not ours: write-protect (sync WP) or minor faults */
            continue;
        }
        int covered = 0;
        for (int k = 0; k < n_done && !covered; k++)
            covered = page >= done_start[k] && page < done_end[k];
        if (covered) {
            /* Its thread was woken by that window's copy, unless the page was there already. */
            gfvm_uffd_wake(e->uffd, page, PAGE);
            continue;
        }
        int single = 0, rc;
        uint64_t ws = page, we = page + PAGE;
        for (;;) {
            rc = serve_window(loop, e, f, single, &ws, &we);
            if (rc == NEED_DRAIN) {
                BUMP(e, loop, eagain, 1);
                int got = read_messages(loop, e, pend, &np);
                if (got < 0) {
                    rc = got;
                    break;
                }
                if (got == 0)
                    sched_yield(); /* the event is being queued right now */
                continue;
            }
            if (rc == HIT_ENOENT && !single) {
                BUMP(e, loop, enoent, 1);
                single = 1;
                continue;
            }
            break;
        }
        if (rc == HIT_ENOENT) {
            gfvm_uffd_wake(e->uffd, page, PAGE); /* gone or not ours: let the thread retry */
            continue;
        }
        if (rc == MM_GONE) {
            mark_exited(loop, e);
            break;
        }
        if (rc < 0) {
            mark_failed(loop, e, -rc, pend + i, np - i);
            break;
        }
        record_latency(loop, now_ns() - t0);
        /* With DEFER_MISSING a window may leave pages out: no short cut for later faults. */
        if (n_done < MSG_BATCH && !(e->flags & GFVM_FL_DEFER_MISSING)) {
            done_start[n_done] = ws;
            done_end[n_done++] = we;
        }
    }
    return n;
}

/* ------------------------------------------------------------------ prefetch */

#define PREFETCH_CHUNK 256       /* pages per UFFDIO_COPY run at most */
#define PREFETCH_EMPTY_CHUNKS 64 /* chunks without data skipped per step at most (faults wait) */

/* One step of an entry's prefetch queue: installs the next chunk (up to PREFETCH_CHUNK pages of
 * one VMA) of pages that some source has -- never zeros for the others -- or skips chunks that
 * have none. Pages already present are left alone (EEXIST). Called between faults only, on the
 * loop thread, with e->mu held: like the faults' copies, every prefetch copy is ordered with the
 * events the loop reads (a copy never lands in a range the process already dropped). */
static void prefetch_chunk(struct gfvm_faultloop *loop, struct entry *e)
{
    static __thread struct window w;
    for (int empty = 0; empty < PREFETCH_EMPTY_CHUNKS;) {
        if (e->state != GFVM_FL_ACTIVE || !e->listed) {
            end_prefetch(loop, e, e->state == GFVM_FL_FAILED ? e->error : ESRCH);
            return;
        }
        if (e->pf_head == e->pf_n) {
            end_prefetch(loop, e, 0);
            return;
        }
        uint64_t *r = &e->pf[2 * e->pf_head];
        if (r[0] >= r[1]) {
            e->pf_head++;
            e->pf_single = 0;
            continue;
        }
        uint64_t start = r[0], end = r[1];
        uint64_t n = (end - start) / PAGE < PREFETCH_CHUNK ? (end - start) / PAGE : PREFETCH_CHUNK;
        if (e->pf_single) {
            n = 1;
        } else if (e->maps_fd >= 0) {
            /* Keep the chunk in one VMA; jump over holes. */
            struct procmap_query q = {.size = sizeof(q), .query_flags = PROCMAP_QUERY_COVERING_OR_NEXT_VMA,
                                      .query_addr = start};
            if (ioctl(e->maps_fd, PROCMAP_QUERY, &q) < 0) {
                if (errno == ENOENT) { /* no VMA at or after start */
                    r[0] = end;
                    continue;
                }
                if (errno == ESRCH) {
                    mark_exited(loop, e);
                    return;
                }
                /* otherwise do without: ENOENT from the copy cuts the chunk down */
            } else if (q.vma_start >= end) {
                r[0] = end;
                continue;
            } else if (q.vma_start > start) {
                r[0] = q.vma_start;
                continue;
            } else if (start + n * PAGE > q.vma_end) {
                n = (q.vma_end - start) / PAGE;
            }
        }
        w.start = start;
        w.n = n;
        if (lookup_window(e, &w) == 0) {
            r[0] = start + n * PAGE;
            if (e->pf_single)
                e->pf_single--;
            empty++;
            continue;
        }
        int rc = read_sources(loop, e, &w);
        if (rc < 0) {
            mark_failed(loop, e, -rc, NULL, 0);
            return;
        }
        struct tally t;
        memset(&t, 0, sizeof(t));
        rc = install_window(loop, e, &w, 0, UINT64_MAX, &t);
        bump_tally(loop, e, &t);
        BUMP(e, loop, pages_prefetched, t.copied);
        e->pf_done += t.copied;
        if (rc == INSTALLED || (rc == HIT_ENOENT && n == 1)) {
            r[0] = start + n * PAGE; /* a single page that is not mapped (any more): skipped */
            if (e->pf_single)
                e->pf_single--;
        } else if (rc == HIT_ENOENT) {
            e->pf_single = (uint32_t)n; /* crossed a VMA edge: this chunk again, page by page */
        } else if (rc == NEED_DRAIN) {
            serve_batch(loop, e); /* the mm is changing: read the events (and faults) first */
        } else if (rc == MM_GONE) {
            mark_exited(loop, e);
        } else {
            mark_failed(loop, e, -rc, NULL, 0);
        }
        return; /* one chunk per step: faults come first */
    }
}

/* Runs one prefetch step for the next entry (round robin) that has prefetch work. When none has
 * any, clears pf_any: the loop then waits for events again without polling. */
static void prefetch_step(struct gfvm_faultloop *loop)
{
    struct entry *e = NULL;
    pthread_mutex_lock(&loop->lock);
    size_t n = loop->n_entries;
    for (size_t k = 0; k < n && !e; k++) {
        struct entry *c = loop->entries[(loop->pf_next + k) % n];
        if (__atomic_load_n(&c->pf_pending, __ATOMIC_ACQUIRE)) {
            e = c;
            e->refs++;
            loop->pf_next = (loop->pf_next + k + 1) % n;
        }
    }
    if (!e)
        __atomic_store_n(&loop->pf_any, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&loop->lock);
    if (!e)
        return;
    pthread_mutex_lock(&e->mu);
    if (__atomic_load_n(&e->pf_pending, __ATOMIC_RELAXED))
        prefetch_chunk(loop, e);
    pthread_mutex_unlock(&e->mu);
    put_ref(loop, e);
}

/* Queues [starts[i], ends[i]) ranges (rounded out to pages) for prefetch on entry `id`: the loop
 * installs the pages its sources have there, between faults, and queues a PREFETCHED event when
 * the entry's queue is done. -ESRCH if the entry no longer serves (process gone or failed). */
int gfvm_faultloop_prefetch(struct gfvm_faultloop *loop, uint32_t id, const uint64_t *starts, const uint64_t *ends,
                            uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        if (ends[i] < starts[i])
            return -EINVAL;
    struct entry *e = find_ref(loop, id);
    if (!e)
        return -ENOENT;
    int rc = 0;
    pthread_mutex_lock(&e->mu);
    if (e->state != GFVM_FL_ACTIVE) {
        rc = -ESRCH;
    } else {
        if (e->pf_head > 0) { /* drop the ranges done */
            memmove(e->pf, e->pf + 2 * e->pf_head, 2 * (e->pf_n - e->pf_head) * sizeof(*e->pf));
            e->pf_n -= e->pf_head;
            e->pf_head = 0;
        }
        if (e->pf_n + n > e->pf_cap) {
            uint32_t cap = e->pf_cap ? e->pf_cap : 16;
            while (cap < e->pf_n + n)
                cap *= 2;
            uint64_t *v = realloc(e->pf, 2 * (size_t)cap * sizeof(*v));
            if (!v)
                rc = -ENOMEM;
            else {
                e->pf = v;
                e->pf_cap = cap;
            }
        }
        if (rc == 0 && n > 0) {
            for (uint32_t i = 0; i < n; i++) {
                e->pf[2 * (e->pf_n + i)] = starts[i] & ~(PAGE - 1);
                e->pf[2 * (e->pf_n + i) + 1] = (ends[i] + PAGE - 1) & ~(PAGE - 1);
            }
            e->pf_n += n;
            if (!__atomic_load_n(&e->pf_pending, __ATOMIC_RELAXED))
                e->pf_done = 0;
            __atomic_store_n(&e->pf_pending, 1, __ATOMIC_RELEASE);
        }
    }
    int queued = rc == 0 && __atomic_load_n(&e->pf_pending, __ATOMIC_RELAXED);
    if (rc == 0 && !queued) {
        /* Nothing to do (no ranges): say so right away, as for a queue that ran out. */
        struct gfvm_fl_event ev = {.kind = GFVM_FL_PREFETCHED, .uffd_id = e->id, .fd = -1};
        queue_event(loop, &ev);
    }
    pthread_mutex_unlock(&e->mu);
    put_ref(loop, e);
    if (queued) {
        pthread_mutex_lock(&loop->lock);
        __atomic_store_n(&loop->pf_any, 1, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&loop->lock);
        uint64_t one = 1;
        ssize_t w = write(loop->ctl_fd, &one, sizeof(one)); /* the thread may sit in epoll_wait */
        (void)w;
    }
    return rc;
}

/* ------------------------------------------------------------------ the thread */

static void serve_entry(struct gfvm_faultloop *loop, uint32_t id, int tag)
{
    struct entry *e = find_ref(loop, id);
    if (!e)
        return; /* removed meanwhile */
    pthread_mutex_lock(&e->mu);
    if (e->listed && e->state == GFVM_FL_ACTIVE) {
        if (tag == TAG_PIDFD)
            mark_exited(loop, e);
        else
            /* A few batches, then back to epoll so that other uffds get their turn. */
            for (int round = 0; round < 4 && e->state == GFVM_FL_ACTIVE; round++)
                if (serve_batch(loop, e) < MSG_BATCH)
                    break;
    }
    pthread_mutex_unlock(&e->mu);
    put_ref(loop, e);
}

static void *loop_main(void *arg)
{
    struct gfvm_faultloop *loop = arg;
    struct epoll_event evs[64];
    while (!__atomic_load_n(&loop->stop_requested, __ATOMIC_ACQUIRE)) {
        /* With prefetch work, poll: faults and events first, a prefetch chunk when none waits. */
        int prefetching = __atomic_load_n(&loop->pf_any, __ATOMIC_ACQUIRE);
        int n = epoll_wait(loop->epfd, evs, 64, prefetching ? 0 : -1);
        if (n < 0)
            continue; /* EINTR */
        if (n == 0 && prefetching)
            prefetch_step(loop);
        for (int i = 0; i < n; i++) {
            uint64_t tag = evs[i].data.u64 & 0xff;
            uint32_t id = (uint32_t)(evs[i].data.u64 >> 8);
            if (tag == TAG_CTL) {
                uint64_t v;
                ssize_t rc = read(loop->ctl_fd, &v, sizeof(v));
                (void)rc;
                continue;
            }
            serve_entry(loop, id, (int)tag);
        }
    }
    return NULL;
}

int gfvm_faultloop_create(struct gfvm_faultloop **out, uint32_t window_pages)
{
    if (window_pages < 1 || window_pages > GFVM_FL_MAX_WINDOW)
        return -EINVAL;
    struct gfvm_faultloop *loop = calloc(1, sizeof(*loop));
    if (!loop)
        return -ENOMEM;
    pthread_mutex_init(&loop->lock, NULL);
    loop->window = window_pages;
    loop->epfd = loop->ctl_fd = loop->notify_fd = -1;
    loop->buf = aligned_alloc(PAGE, GFVM_FL_MAX_WINDOW * PAGE);
    int rc = loop->buf ? 0 : -ENOMEM;
    if (rc == 0 && (loop->epfd = epoll_create1(EPOLL_CLOEXEC)) < 0)
        rc = -errno;
    if (rc == 0 && (loop->ctl_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0)
        rc = -errno;
    if (rc == 0 && (loop->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0)
        rc = -errno;
    if (rc == 0)
        rc = watch(loop, loop->ctl_fd, 0, TAG_CTL);
    if (rc < 0) {
        gfvm_faultloop_destroy(loop);
        return rc;
    }
    *out = loop;
    return 0;
}

int gfvm_faultloop_start(struct gfvm_faultloop *loop)
{
    if (loop->running)
        return -EALREADY;
    __atomic_store_n(&loop->stop_requested, 0, __ATOMIC_RELEASE);
    /* The loop thread takes no signals: they belong to Python's main thread. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&loop->thread, NULL, loop_main, loop);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0)
        return -rc;
    loop->running = 1;
    return 0;
}

/* Blocks until the loop thread has finished the batch it is serving and exited. */
int gfvm_faultloop_stop(struct gfvm_faultloop *loop)
{
    if (!loop->running)
        return 0;
    __atomic_store_n(&loop->stop_requested, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    ssize_t w = write(loop->ctl_fd, &one, sizeof(one));
    (void)w;
    pthread_join(loop->thread, NULL);
    loop->running = 0;
    return 0;
}

/* Stops the thread, drops every entry and every queued event (closing the fds of fork events
 * nobody collected). */
void gfvm_faultloop_destroy(struct gfvm_faultloop *loop)
{
    if (!loop)
        return;
    gfvm_faultloop_stop(loop);
    while (loop->n_entries > 0)
        gfvm_faultloop_remove(loop, loop->entries[loop->n_entries - 1]->id);
    for (size_t i = 0; i < loop->q_len; i++) {
        struct gfvm_fl_event *ev = &loop->queue[(loop->q_head + i) % loop->q_cap];
        if (ev->fd >= 0)
            close(ev->fd);
    }
    free(loop->queue);
    free(loop->entries);
    close_fd(&loop->epfd);
    close_fd(&loop->ctl_fd);
    close_fd(&loop->notify_fd);
    free(loop->buf);
    pthread_mutex_destroy(&loop->lock);
    free(loop);
}

int gfvm_faultloop_notify_fd(struct gfvm_faultloop *loop)
{
    return loop->notify_fd;
}

/* Takes effect from the next window on. */
int gfvm_faultloop_set_window(struct gfvm_faultloop *loop, uint32_t pages)
{
    if (pages < 1 || pages > GFVM_FL_MAX_WINDOW)
        return -EINVAL;
    __atomic_store_n(&loop->window, pages, __ATOMIC_RELAXED);
    return 0;
}

/* id 0: totals over every uffd ever served. */
int gfvm_faultloop_counters(struct gfvm_faultloop *loop, uint32_t id, struct gfvm_fl_counters *out)
{
    struct entry *e = NULL;
    const uint64_t *src;
    if (id == 0) {
        src = (const uint64_t *)&loop->total;
    } else {
        if (!(e = find_ref(loop, id)))
            return -ENOENT;
        src = (const uint64_t *)&e->c;
    }
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
    if (e)
        put_ref(loop, e);
    return 0;
}

/* buckets[b] = windows whose service took [2^b, 2^(b+1)) ns, from reading the fault message to
 * the page being installed. Returns the number of buckets written. */
int gfvm_faultloop_latency(struct gfvm_faultloop *loop, uint64_t *buckets, int n)
{
    if (n > GFVM_FL_HIST_BUCKETS)
        n = GFVM_FL_HIST_BUCKETS;
    for (int i = 0; i < n; i++)
        buckets[i] = __atomic_load_n(&loop->hist[i], __ATOMIC_RELAXED);
    return n;
}

/* Moves up to `max` queued events to `out` (the receiver owns their fds). Reading the eventfd
 * is the caller's business; it stays readable until read, whether or not events remain. */
int gfvm_faultloop_pop_events(struct gfvm_faultloop *loop, struct gfvm_fl_event *out, int max)
{
    pthread_mutex_lock(&loop->lock);
    int n = 0;
    while (n < max && loop->q_len > 0) {
        out[n++] = loop->queue[loop->q_head];
        loop->q_head = (loop->q_head + 1) % loop->q_cap;
        loop->q_len--;
    }
    pthread_mutex_unlock(&loop->lock);
    return n;
}
