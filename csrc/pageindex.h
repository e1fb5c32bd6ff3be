/* Virtual page -> paging-file slot index, shared by Python and the fault loop (csrc/pageindex.c). */
#ifndef GFVM_PAGEINDEX_H
#define GFVM_PAGEINDEX_H
#include <stdint.h>

struct gfvm_pageindex;

struct gfvm_pageindex *gfvm_pageindex_new(uint64_t capacity_hint);
struct gfvm_pageindex *gfvm_pageindex_clone(struct gfvm_pageindex *src);
void gfvm_pageindex_ref(struct gfvm_pageindex *idx);
void gfvm_pageindex_unref(struct gfvm_pageindex *idx);
int gfvm_pageindex_set(struct gfvm_pageindex *idx, uint64_t addr, uint64_t slot, int64_t crc);
int gfvm_pageindex_get(struct gfvm_pageindex *idx, uint64_t addr, uint64_t *slot, int64_t *crc);
int gfvm_pageindex_remove(struct gfvm_pageindex *idx, uint64_t addr);
int64_t gfvm_pageindex_remove_range(struct gfvm_pageindex *idx, uint64_t start, uint64_t end);
int64_t gfvm_pageindex_move_range(struct gfvm_pageindex *idx, uint64_t from, uint64_t to, uint64_t len);
void gfvm_pageindex_clear(struct gfvm_pageindex *idx);
uint64_t gfvm_pageindex_count(struct gfvm_pageindex *idx);
int gfvm_pageindex_set_many(struct gfvm_pageindex *idx, const uint64_t *addrs, const uint64_t *slots,
                            const uint32_t *crcs, uint64_t n);
uint64_t gfvm_pageindex_seq(struct gfvm_pageindex *idx);
int64_t gfvm_pageindex_set_many_if(struct gfvm_pageindex *idx, const uint64_t *addrs, const uint64_t *slots,
                                   const uint32_t *crcs, uint64_t n, uint64_t since, uint8_t *skipped);
int64_t gfvm_pageindex_get_many(struct gfvm_pageindex *idx, const uint64_t *addrs, uint64_t n,
                                int64_t *slots);
int64_t gfvm_pageindex_lookup_run(struct gfvm_pageindex *idx, uint64_t start, uint64_t npages,
                                  int64_t *slots, int64_t *crcs);
int64_t gfvm_pageindex_export(struct gfvm_pageindex *idx, uint64_t start, uint64_t end,
                              uint64_t *addrs, uint64_t *slots, int64_t *crcs, uint64_t cap);

#endif
