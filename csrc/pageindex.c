/* Virtual page -> paging-file slot index.
 *
 * An open-addressing hash table (linear probing, deletion by backward shift, so no tombstones)
 * keyed by virtual page number, guarded by one mutex. It is written by Python (the pager) and
 * read by the native fault loop on its own thread without the GIL; the loop also applies the
 * process's REMOVE/UNMAP (drop) and REMAP (move) events to it. Every operation takes the lock
 * once, including the batch ones, so a fault window sees one consistent state.
 *
 * Keys are page-aligned virtual addresses (callers pass addresses; unaligned ones are EINVAL).
 * Slots are < 2^63. An entry may carry the CRC-32 (zlib's) of its page's 4096 bytes; the fault
 * loop verifies it after reading the slot and never serves a page that fails (entries without
 * one, e.g. CRIU's own image pages, are served unchecked). Moves and clones keep it. The table is reference counted: the Python object and every fault-loop
 * entry that serves from it hold a reference.
 *
 * Change log: range removals and moves (what the process's REMOVE/UNMAP/REMAP events do) bump a
 * sequence number and are remembered (the last CHANGE_LOG of them). A pager that reads a page's
 * contents while the process runs takes the sequence number first and stores the slot with
 * set_many_if(since): entries whose page was removed or moved meanwhile are skipped, so a page
 * the process discarded never gets stale data back. */
#include "kernel_abi.h"
#include "pageindex.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define EMPTY UINT64_MAX
#define PAGE_SHIFT_ 12
#define PAGE_MASK_ ((uint64_t)4095)
#define MAX_SLOT ((uint64_t)INT64_MAX)

struct entry {
    uint64_t vpn;
    uint64_t slot;
    uint32_t crc;
    uint32_t has_crc;
};

#define CHANGE_LOG 256

struct change {
    uint64_t seq, start, end;
};

struct gfvm_pageindex {
    pthread_mutex_t lock;
    uint64_t seq; /* number of logged changes so far */
    struct change log[CHANGE_LOG];
    int refs;
    uint64_t cap; /* power of two */
    uint64_t count;
    struct entry *table;
};

static inline uint64_t hash_vpn(uint64_t vpn, uint64_t cap)
{
    /* Fibonacci hashing: neighbouring pages land far apart, so runs of consecutive pages do not
     * build long probe chains. */
    return (vpn * 0x9E3779B97F4A7C15ull) >> (64 - __builtin_ctzll(cap));
}

static struct entry *alloc_table(uint64_t cap)
{
    struct entry *t = malloc(cap * sizeof(*t));
    if (t)
        for (uint64_t i = 0; i < cap; i++)
            t[i].vpn = EMPTY;
    return t;
}

static uint64_t round_cap(uint64_t want)
{
    uint64_t cap = 64;
    while (cap < want * 2) /* keep the load factor <= 1/2 */
        cap <<= 1;
    return cap;
}

struct gfvm_pageindex *gfvm_pageindex_new(uint64_t capacity_hint)
{
    struct gfvm_pageindex *idx = calloc(1, sizeof(*idx));
    if (!idx)
        return NULL;
    idx->cap = round_cap(capacity_hint);
    idx->table = alloc_table(idx->cap);
    if (!idx->table) {
        free(idx);
        return NULL;
    }
    pthread_mutex_init(&idx->lock, NULL);
    idx->refs = 1;
    return idx;
}

void gfvm_pageindex_ref(struct gfvm_pageindex *idx)
{
    __atomic_add_fetch(&idx->refs, 1, __ATOMIC_RELAXED);
}

void gfvm_pageindex_unref(struct gfvm_pageindex *idx)
{
    if (!idx || __atomic_sub_fetch(&idx->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    pthread_mutex_destroy(&idx->lock);
    free(idx->table);
    free(idx);
}

/* --- unlocked helpers (caller holds idx->lock) --- */

static struct entry *find(struct gfvm_pageindex *idx, uint64_t vpn)
{
    uint64_t mask = idx->cap - 1;
    for (uint64_t i = hash_vpn(vpn, idx->cap);; i = (i + 1) & mask) {
        struct entry *e = &idx->table[i];
        if (e->vpn == vpn)
            return e;
        if (e->vpn == EMPTY)
            return NULL;
    }
}

static void insert_fresh(struct entry *table, uint64_t cap, const struct entry *e)
{
    uint64_t mask = cap - 1;
    uint64_t i = hash_vpn(e->vpn, cap);
    while (table[i].vpn != EMPTY)
        i = (i + 1) & mask;
    table[i] = *e;
}

static int grow(struct gfvm_pageindex *idx, uint64_t need)
{
    if (need * 2 <= idx->cap)
        return 0;
    uint64_t cap = round_cap(need);
    struct entry *t = alloc_table(cap);
    if (!t)
        return -ENOMEM;
    for (uint64_t i = 0; i < idx->cap; i++)
        if (idx->table[i].vpn != EMPTY)
            insert_fresh(t, cap, &idx->table[i]);
    free(idx->table);
    idx->table = t;
    idx->cap = cap;
    return 0;
}

/* crc < 0: the entry carries no checksum. */
static int put(struct gfvm_pageindex *idx, uint64_t vpn, uint64_t slot, int64_t crc)
{
    struct entry n = {vpn, slot, crc >= 0 ? (uint32_t)crc : 0, crc >= 0};
    struct entry *e = find(idx, vpn);
    if (e) {
        *e = n;
        return 0;
    }
    int rc = grow(idx, idx->count + 1);
    if (rc < 0)
        return rc;
    insert_fresh(idx->table, idx->cap, &n);
    idx->count++;
    return 0;
}

static int64_t crc_of(const struct entry *e)
{
    return e->has_crc ? (int64_t)e->crc : -1;
}

/* Backward-shift deletion: later members of the probe chain move into the hole so lookups never
 * stop early at it. */
static int del(struct gfvm_pageindex *idx, uint64_t vpn)
{
    struct entry *e = find(idx, vpn);
    if (!e)
        return 0;
    uint64_t mask = idx->cap - 1;
    uint64_t hole = (uint64_t)(e - idx->table);
    for (uint64_t j = (hole + 1) & mask;; j = (j + 1) & mask) {
        struct entry *n = &idx->table[j];
        if (n->vpn == EMPTY)
            break;
        uint64_t home = hash_vpn(n->vpn, idx->cap);
        /* n may fill the hole only if its home is not cyclically within (hole, j]. */
        int home_between = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!home_between) {
            idx->table[hole] = *n;
            hole = j;
        }
    }
    idx->table[hole].vpn = EMPTY;
    idx->count--;
    return 1;
}

static void log_change(struct gfvm_pageindex *idx, uint64_t start, uint64_t end)
{
    idx->seq++;
    idx->log[idx->seq % CHANGE_LOG] = (struct change){idx->seq, start, end};
}

static int check_addr(uint64_t addr)
{
    return (addr & PAGE_MASK_) ? -EINVAL : 0;
}

/* Entries whose page lies in [start, end), collected into a malloc'd array (sorted by page). */
static int cmp_entry(const void *a, const void *b)
{
    uint64_t x = ((const struct entry *)a)->vpn, y = ((const struct entry *)b)->vpn;
    return x < y ? -1 : x > y;
}

static int64_t collect(struct gfvm_pageindex *idx, uint64_t start, uint64_t end, struct entry **out)
{
    uint64_t vs = start >> PAGE_SHIFT_, ve = (end >> PAGE_SHIFT_) + ((end & PAGE_MASK_) != 0);
    uint64_t span = ve > vs ? ve - vs : 0;
    uint64_t n = 0, cap = span < idx->count ? span : idx->count;
    struct entry *v = malloc((cap ? cap : 1) * sizeof(*v));
    if (!v)
        return -ENOMEM;
    if (span <= idx->count) {
        /* Small range: probe each page of it. */
        for (uint64_t p = vs; p < ve; p++) {
            struct entry *e = find(idx, p);
            if (e)
                v[n++] = *e;
        }
    } else {
        for (uint64_t i = 0; i < idx->cap; i++) {
            uint64_t p = idx->table[i].vpn;
            if (p != EMPTY && p >= vs && p < ve)
                v[n++] = idx->table[i];
        }
        qsort(v, n, sizeof(*v), cmp_entry);
    }
    *out = v;
    return (int64_t)n;
}

/* --- public API: each takes the lock once --- */

struct gfvm_pageindex *gfvm_pageindex_clone(struct gfvm_pageindex *src)
{
    pthread_mutex_lock(&src->lock);
    struct gfvm_pageindex *idx = calloc(1, sizeof(*idx));
    struct entry *t = idx ? malloc(src->cap * sizeof(*t)) : NULL;
    if (!t) {
        pthread_mutex_unlock(&src->lock);
        free(idx);
        return NULL;
    }
    memcpy(t, src->table, src->cap * sizeof(*t));
    idx->table = t;
    idx->cap = src->cap;
    idx->count = src->count;
    idx->seq = src->seq;
    memcpy(idx->log, src->log, sizeof(idx->log));
    pthread_mutex_unlock(&src->lock);
    pthread_mutex_init(&idx->lock, NULL);
    idx->refs = 1;
    return idx;
}

/* crc < 0: no checksum; else the page's CRC-32 (< 2^32). */
int gfvm_pageindex_set(struct gfvm_pageindex *idx, uint64_t addr, uint64_t slot, int64_t crc)
{
    if (check_addr(addr) || slot > MAX_SLOT || crc > (int64_t)UINT32_MAX)
        return -EINVAL;
    pthread_mutex_lock(&idx->lock);
    int rc = put(idx, addr >> PAGE_SHIFT_, slot, crc);
    pthread_mutex_unlock(&idx->lock);
    return rc;
}

/* *crc (if crc is not NULL) = the checksum, or -1 when the entry has none. */
int gfvm_pageindex_get(struct gfvm_pageindex *idx, uint64_t addr, uint64_t *slot, int64_t *crc)
{
    if (check_addr(addr))
        return -EINVAL;
    pthread_mutex_lock(&idx->lock);
    struct entry *e = find(idx, addr >> PAGE_SHIFT_);
    if (e) {
        *slot = e->slot;
        if (crc)
            *crc = crc_of(e);
    }
    pthread_mutex_unlock(&idx->lock);
    return e ? 0 : -ENOENT;
}

/* Returns 1 if an entry was removed, 0 if there was none. */
int gfvm_pageindex_remove(struct gfvm_pageindex *idx, uint64_t addr)
{
    if (check_addr(addr))
        return -EINVAL;
    pthread_mutex_lock(&idx->lock);
    int rc = del(idx, addr >> PAGE_SHIFT_);
    pthread_mutex_unlock(&idx->lock);
    return rc;
}

/* Drops every entry whose page overlaps [start, end). Returns how many. */
int64_t gfvm_pageindex_remove_range(struct gfvm_pageindex *idx, uint64_t start, uint64_t end)
{
    pthread_mutex_lock(&idx->lock);
    struct entry *v;
    int64_t n = collect(idx, start & ~PAGE_MASK_, end, &v);
    for (int64_t i = 0; i < n; i++)
        del(idx, v[i].vpn);
    if (n >= 0)
        free(v);
    log_change(idx, start & ~PAGE_MASK_, end);
    pthread_mutex_unlock(&idx->lock);
    return n;
}

/* Moves the entries of [from, from + len) to the same offsets from `to` (mremap), replacing any
 * entry already there. Source and destination may overlap. Returns how many moved. */
int64_t gfvm_pageindex_move_range(struct gfvm_pageindex *idx, uint64_t from, uint64_t to, uint64_t len)
{
    if (check_addr(from) || check_addr(to))
        return -EINVAL;
    pthread_mutex_lock(&idx->lock);
    struct entry *v;
    int64_t n = collect(idx, from, from + len, &v);
    if (n < 0) {
        pthread_mutex_unlock(&idx->lock);
        return n;
    }
    int rc = grow(idx, idx->count + (uint64_t)n); /* so that the puts below cannot fail */
    if (rc == 0) {
        for (int64_t i = 0; i < n; i++)
            del(idx, v[i].vpn);
        uint64_t fv = from >> PAGE_SHIFT_, tv = to >> PAGE_SHIFT_;
        for (int64_t i = 0; i < n; i++)
            put(idx, v[i].vpn - fv + tv, v[i].slot, crc_of(&v[i]));
        log_change(idx, from, from + len);
        log_change(idx, to, to + len);
    }
    free(v);
    pthread_mutex_unlock(&idx->lock);
    return rc < 0 ? rc : n;
}

void gfvm_pageindex_clear(struct gfvm_pageindex *idx)
{
    pthread_mutex_lock(&idx->lock);
    for (uint64_t i = 0; i < idx->cap; i++)
        idx->table[i].vpn = EMPTY;
    idx->count = 0;
    log_change(idx, 0, UINT64_MAX);
    pthread_mutex_unlock(&idx->lock);
}

uint64_t gfvm_pageindex_count(struct gfvm_pageindex *idx)
{
    pthread_mutex_lock(&idx->lock);
    uint64_t n = idx->count;
    pthread_mutex_unlock(&idx->lock);
    return n;
}

/* Sets n entries at once, with checksums crcs[i] (crcs NULL: none); all or nothing (EINVAL/ENOMEM
 * leave the index unchanged). */
int gfvm_pageindex_set_many(struct gfvm_pageindex *idx, const uint64_t *addrs, const uint64_t *slots,
                            const uint32_t *crcs, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        if (check_addr(addrs[i]) || slots[i] > MAX_SLOT)
            return -EINVAL;
    pthread_mutex_lock(&idx->lock);
    int rc = grow(idx, idx->count + n);
    for (uint64_t i = 0; rc == 0 && i < n; i++)
        rc = put(idx, addrs[i] >> PAGE_SHIFT_, slots[i], crcs ? (int64_t)crcs[i] : -1);
    pthread_mutex_unlock(&idx->lock);
    return rc;
}

uint64_t gfvm_pageindex_seq(struct gfvm_pageindex *idx)
{
    pthread_mutex_lock(&idx->lock);
    uint64_t seq = idx->seq;
    pthread_mutex_unlock(&idx->lock);
    return seq;
}

/* Like set_many, but skips (skipped[i] = 1) every address that a change logged after sequence
 * number `since` removed or moved. Returns how many were skipped; -ESTALE (nothing set) when
 * more changes happened since than the log remembers. */
int64_t gfvm_pageindex_set_many_if(struct gfvm_pageindex *idx, const uint64_t *addrs, const uint64_t *slots,
                                   const uint32_t *crcs, uint64_t n, uint64_t since, uint8_t *skipped)
{
    for (uint64_t i = 0; i < n; i++)
        if (check_addr(addrs[i]) || slots[i] > MAX_SLOT)
            return -EINVAL;
    pthread_mutex_lock(&idx->lock);
    int64_t rc = 0;
    if (since > idx->seq)
        rc = -EINVAL;
    else if (idx->seq - since > CHANGE_LOG)
        rc = -ESTALE;
    else
        rc = grow(idx, idx->count + n);
    int64_t nskipped = 0;
    for (uint64_t i = 0; rc == 0 && i < n; i++) {
        int hit = 0;
        for (uint64_t s = since + 1; s <= idx->seq && !hit; s++) {
            const struct change *c = &idx->log[s % CHANGE_LOG];
            hit = addrs[i] >= c->start && addrs[i] < c->end;
        }
        skipped[i] = (uint8_t)hit;
        nskipped += hit;
        if (!hit)
            rc = put(idx, addrs[i] >> PAGE_SHIFT_, slots[i], crcs ? (int64_t)crcs[i] : -1);
    }
    pthread_mutex_unlock(&idx->lock);
    return rc < 0 ? rc : nskipped;
}

/* slots[i] = slot of addrs[i], or -1. Returns how many were found. */
int64_t gfvm_pageindex_get_many(struct gfvm_pageindex *idx, const uint64_t *addrs, uint64_t n,
                                int64_t *slots)
{
    int64_t found = 0;
    pthread_mutex_lock(&idx->lock);
    for (uint64_t i = 0; i < n; i++) {
        struct entry *e = (addrs[i] & PAGE_MASK_) ? NULL : find(idx, addrs[i] >> PAGE_SHIFT_);
        slots[i] = e ? (int64_t)e->slot : -1;
        found += e != NULL;
    }
    pthread_mutex_unlock(&idx->lock);
    return found;
}

/* slots[i] = slot of page start + i * 4096, or -1, for npages consecutive pages (the fault
 * loop's window lookup); crcs[i] (crcs may be NULL) = its checksum or -1. Returns how many were
 * found. */
int64_t gfvm_pageindex_lookup_run(struct gfvm_pageindex *idx, uint64_t start, uint64_t npages,
                                  int64_t *slots, int64_t *crcs)
{
    int64_t found = 0;
    uint64_t vpn = start >> PAGE_SHIFT_;
    pthread_mutex_lock(&idx->lock);
    for (uint64_t i = 0; i < npages; i++) {
        struct entry *e = idx->count ? find(idx, vpn + i) : NULL;
        slots[i] = e ? (int64_t)e->slot : -1;
        if (crcs)
            crcs[i] = e ? crc_of(e) : -1;
        found += e != NULL;
    }
    pthread_mutex_unlock(&idx->lock);
    return found;
}

/* Copies the entries in [start, end), sorted by address, into addrs/slots and, unless NULL, crcs
 * (-1: none), at most cap of them. Returns how many there are in total: call again with a bigger
 * buffer if that is > cap. */
int64_t gfvm_pageindex_export(struct gfvm_pageindex *idx, uint64_t start, uint64_t end,
                              uint64_t *addrs, uint64_t *slots, int64_t *crcs, uint64_t cap)
{
    pthread_mutex_lock(&idx->lock);
    struct entry *v;
    int64_t n = collect(idx, start & ~PAGE_MASK_, end, &v);
    if (n >= 0) {
        for (int64_t i = 0; i < n && (uint64_t)i < cap; i++) {
            addrs[i] = v[i].vpn << PAGE_SHIFT_;
            slots[i] = v[i].slot;
            if (crcs)
                crcs[i] = crc_of(&v[i]);
        }
        free(v);
    }
    pthread_mutex_unlock(&idx->lock);
    return n;
}
