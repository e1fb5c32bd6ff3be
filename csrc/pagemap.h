/* PAGEMAP_SCAN on /proc/PID/pagemap (csrc/pagemap.c). */
#ifndef GFVM_PAGEMAP_H
#define GFVM_PAGEMAP_H
#include <stdint.h>

/* The filter of one scan, as in struct pm_scan_arg (see the kernel's pagemap documentation). */
struct gfvm_scan_spec {
    uint64_t flags;               /* PM_SCAN_WP_MATCHING, PM_SCAN_CHECK_WPASYNC */
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
    uint64_t max_pages;           /* 0: no limit */
};

int gfvm_pagemap_open(int pid);
int64_t gfvm_pagemap_scan(int fd, uint64_t start, uint64_t end, const struct gfvm_scan_spec *spec,
                          struct page_region **out, uint64_t *walk_end);
void gfvm_free(void *p);

#endif
