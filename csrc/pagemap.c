/* PAGEMAP_SCAN: one call scans a whole range and hands back every matching region.
 *
 * The kernel stops early at `walk_end` when the result vector fills (or max_pages is reached);
 * we grow the vector and continue from there, merging a region split across two calls, so the
 * caller gets one compact array of (start, end, categories). With PM_SCAN_WP_MATCHING every page
 * reported has been write-protected again atomically, including pages of calls that came before
 * a later failure: on error the pages already reported are lost to the caller, so callers that
 * re-protect must treat an error as "everything in the range may be dirty". */
#include "kernel_abi.h"
#include "pagemap.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int gfvm_pagemap_open(int pid)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/pagemap", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

void gfvm_free(void *p)
{
    free(p);
}

/* Returns the number of regions in *out (malloc'd; free with gfvm_free, also when 0) and sets
 * *walk_end to where the walk stopped (== end unless max_pages cut it short). */
int64_t gfvm_pagemap_scan(int fd, uint64_t start, uint64_t end, const struct gfvm_scan_spec *spec,
                          struct page_region **out, uint64_t *walk_end)
{
    uint64_t cap = 256, count = 0, pages_left = spec->max_pages;
    struct page_region *vec = malloc(cap * sizeof(*vec));
    if (!vec)
        return -ENOMEM;
    *out = NULL;
    *walk_end = start;
    uint64_t pos = start;
    while (pos < end) {
        if (count == cap) {
            struct page_region *bigger = realloc(vec, 2 * cap * sizeof(*vec));
            if (!bigger) {
                free(vec);
                return -ENOMEM;
            }
            vec = bigger;
            cap *= 2;
        }
        struct page_region *slot = vec + count;
        uint64_t space = cap - count;
        struct pm_scan_arg arg = {
            .size = sizeof(arg),
            .flags = spec->flags,
            .start = pos,
            .end = end,
            .vec = (uint64_t)(uintptr_t)slot,
            .vec_len = space,
            .max_pages = pages_left,
            .category_inverted = spec->category_inverted,
            .category_mask = spec->category_mask,
            .category_anyof_mask = spec->category_anyof_mask,
            .return_mask = spec->return_mask,
        };
        long n = ioctl(fd, PAGEMAP_SCAN, &arg);
        if (n < 0) {
            int err = errno;
            free(vec);
            return -err;
        }
        uint64_t filled = (uint64_t)n, found = 0;
        for (long i = 0; i < n; i++)
            found += (slot[i].end - slot[i].start) / 4096;
        /* A region cut by the previous call continues in this one: join them. */
        if (n > 0 && count > 0 && vec[count - 1].end == slot[0].start &&
            vec[count - 1].categories == slot[0].categories) {
            vec[count - 1].end = slot[0].end;
            for (long i = 1; i < n; i++)
                slot[i - 1] = slot[i];
            n--;
        }
        count += (uint64_t)n;
        uint64_t previous = pos;
        pos = arg.walk_end;
        if (spec->max_pages) {
            pages_left = pages_left > found ? pages_left - found : 0;
            if (pages_left == 0)
                break;
        }
        /* The walk stops early only for a full vector or max_pages; anything else (or no
         * progress at all) means the kernel got no further, and looping would spin. */
        if (filled < space || pos <= previous)
            break;
    }
    *walk_end = pos;
    *out = vec;
    return (int64_t)count;
}
