/* Native fault-service loop (csrc/faultloop.c). */
#ifndef GFVM_FAULTLOOP_H
#define GFVM_FAULTLOOP_H
#include <stdint.h>

struct gfvm_pageindex;
struct gfvm_faultloop;

#define GFVM_FL_MAX_WINDOW 512
#define GFVM_FL_MAX_SOURCES 4
#define GFVM_FL_HIST_BUCKETS 40

/* Per-uffd options. */
#define GFVM_FL_WP 1             /* range is WP-registered for dirty tracking: install with MODE_WP */
#define GFVM_FL_DEFER_MISSING 2  /* a page in no source is not installed: its fault goes to Python */

/* What the loop queues for Python (gfvm_faultloop_pop_events). */
#define GFVM_FL_FORK 1   /* fd: the child's uffd (a dup the receiver owns); child_id: its entry */
#define GFVM_FL_REMAP 2  /* [start, end) moved to `to` (already applied to the indexes) */
#define GFVM_FL_REMOVE 3 /* [start, end) dropped by the process (already applied) */
#define GFVM_FL_UNMAP 4  /* [start, end) unmapped (already applied) */
#define GFVM_FL_FAULT 5  /* a fault the loop does not serve: start = address, flags, tid */
#define GFVM_FL_EXIT 6   /* the process is gone; the loop no longer reads this uffd */
#define GFVM_FL_ERROR 7  /* error `error` (errno): fatal, the loop no longer reads this uffd; except
                          * EBADMSG: page [start, end) failed its checksum (slot, source) and was
                          * poisoned instead of served; the uffd is still served */
#define GFVM_FL_PREFETCHED 8 /* the uffd's prefetch queue is done: count = pages it installed */
#define GFVM_FL_EVICTED 1 /* flags of a REMOVE inside an announced eviction (entries kept) */

/* Entry states (gfvm_faultloop_state). */
#define GFVM_FL_ACTIVE 0
#define GFVM_FL_EXITED 1
#define GFVM_FL_FAILED 2

struct gfvm_fl_event {
    uint32_t kind;
    uint32_t uffd_id;
    uint64_t start;
    uint64_t end;
    uint64_t to;
    uint64_t flags;
    int32_t fd;
    uint32_t child_id;
    int32_t error;
    uint32_t tid;
    uint64_t slot;   /* ERROR with error EBADMSG: the slot whose bytes failed their checksum */
    uint64_t count;  /* PREFETCHED: pages installed by the finished prefetch */
    uint32_t source; /* ERROR with error EBADMSG: which source (0, 1, ...) */
    uint32_t reserved;
};

struct gfvm_fl_counters {
    uint64_t faults;       /* page-fault messages read */
    uint64_t windows;      /* windows served */
    uint64_t pages_copied; /* pages installed from a source */
    uint64_t pages_zero;   /* pages installed as zeros */
    uint64_t eexist;       /* pages skipped because they were already present */
    uint64_t eagain;       /* retries after EAGAIN (events had to be read first) */
    uint64_t enoent;       /* windows cut back to one page (VMA edge moved, range unmapped) */
    uint64_t events;       /* non-fault messages (fork, remap, remove, unmap) */
    uint64_t deferred;     /* faults handed to Python */
    uint64_t errors;       /* fatal errors */
    uint64_t pages_poisoned;  /* pages that failed their checksum, poisoned instead of served */
    uint64_t pages_prefetched; /* pages installed by prefetch (also counted in pages_copied) */
    uint64_t from_source[GFVM_FL_MAX_SOURCES]; /* pages_copied, per source */
};

/* One place the loop reads pages from: page -> slot in `index`, data at slot * 4096 of `fd`
 * (pread) or of the mapping [map, map + map_len) when map is not NULL. */
struct gfvm_fl_source {
    struct gfvm_pageindex *index;
    int fd;
    const void *map;
    uint64_t map_len;
};

struct gfvm_fl_uffd_spec {
    int uffd;
    int pidfd;   /* -1: none (then the loop learns of the death only through ESRCH) */
    int pid;     /* 0: unknown (then windows are not clamped to the VMA in advance) */
    uint32_t flags;
    uint32_t nsources;
    struct gfvm_fl_source sources[GFVM_FL_MAX_SOURCES];
};

int gfvm_faultloop_create(struct gfvm_faultloop **out, uint32_t window_pages);
void gfvm_faultloop_destroy(struct gfvm_faultloop *loop);
int gfvm_faultloop_start(struct gfvm_faultloop *loop);
int gfvm_faultloop_stop(struct gfvm_faultloop *loop);
int gfvm_faultloop_notify_fd(struct gfvm_faultloop *loop);
int gfvm_faultloop_set_window(struct gfvm_faultloop *loop, uint32_t pages);
int gfvm_faultloop_add(struct gfvm_faultloop *loop, const struct gfvm_fl_uffd_spec *spec, uint32_t *id);
int gfvm_faultloop_set_sources(struct gfvm_faultloop *loop, uint32_t id, const struct gfvm_fl_source *sources,
                               uint32_t nsources);
int gfvm_faultloop_set_process(struct gfvm_faultloop *loop, uint32_t id, int pid, int pidfd);
int gfvm_faultloop_remove(struct gfvm_faultloop *loop, uint32_t id);
int gfvm_faultloop_expect_remove(struct gfvm_faultloop *loop, uint32_t id, const uint64_t *starts,
                                 const uint64_t *ends, uint32_t n);
int gfvm_faultloop_sources(struct gfvm_faultloop *loop, uint32_t id, struct gfvm_fl_source *out, uint32_t max);
int gfvm_faultloop_sync(struct gfvm_faultloop *loop, uint32_t id);
int gfvm_faultloop_prefetch(struct gfvm_faultloop *loop, uint32_t id, const uint64_t *starts, const uint64_t *ends,
                            uint32_t n);
int gfvm_faultloop_state(struct gfvm_faultloop *loop, uint32_t id, int *state, int *error);
int gfvm_faultloop_dup_uffd(struct gfvm_faultloop *loop, uint32_t id);
int gfvm_faultloop_counters(struct gfvm_faultloop *loop, uint32_t id, struct gfvm_fl_counters *out);
int gfvm_faultloop_latency(struct gfvm_faultloop *loop, uint64_t *buckets, int n);
int gfvm_faultloop_pop_events(struct gfvm_faultloop *loop, struct gfvm_fl_event *out, int max);

#endif
