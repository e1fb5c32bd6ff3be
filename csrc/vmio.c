/* Batched process_vm_readv / process_vm_writev between a caller buffer and another process.
 *
 * The remote side is a list of ranges (page addresses, (start, len) pairs or PAGEMAP_SCAN
 * regions); the local side is one contiguous buffer filled in order. Up to IOV_MAX remote iovecs
 * go into each call (scattered 4 KiB pages: ~3 GB/s batched vs 2 GB/s one page per call), and
 * adjacent remote ranges are joined into one iovec.
 *
 * Partial transfers: the kernel stops at the first remote range it cannot access. We return the
 * bytes moved so far (the caller knows which ranges they cover: they are filled in order) and
 * stop; -errno only when nothing at all was moved. Reading a page that is *missing* in a
 * uffd-registered range makes this call wait for the fault to be served, so callers read present
 * pages only or make sure the fault-service loop is running on another thread. */
#include "kernel_abi.h"
#include "vmio.h"

#include <limits.h>
#include <sys/uio.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif
#define BATCH 1024

/* Produces the i-th remote range. */
typedef void (*range_fn)(const void *ctx, uint64_t i, uint64_t *start, uint64_t *len);

static int64_t transfer(int pid, int write, range_fn get, const void *ctx, uint64_t n, char *buf)
{
    struct iovec remote[BATCH];
    uint64_t done = 0, i = 0;
    while (i < n) {
        int k = 0;
        uint64_t batch_bytes = 0;
        while (i < n) {
            uint64_t start, len;
            get(ctx, i, &start, &len);
            if (len == 0) {
                i++;
                continue;
            }
            if (k > 0 && (uint64_t)(uintptr_t)remote[k - 1].iov_base + remote[k - 1].iov_len == start) {
                remote[k - 1].iov_len += len;
            } else {
                if (k == BATCH)
                    break;
                remote[k].iov_base = (void *)(uintptr_t)start;
                remote[k].iov_len = len;
                k++;
            }
            batch_bytes += len;
            i++;
        }
        if (k == 0)
            break;
        struct iovec local = {.iov_base = buf + done, .iov_len = batch_bytes};
        ssize_t got = write ? process_vm_writev(pid, &local, 1, remote, (unsigned long)k, 0)
                            : process_vm_readv(pid, &local, 1, remote, (unsigned long)k, 0);
        if (got < 0)
            return done > 0 ? (int64_t)done : -errno;
        done += (uint64_t)got;
        if ((uint64_t)got < batch_bytes)
            break;
    }
    return (int64_t)done;
}

struct pages_ctx {
    const uint64_t *addrs;
    uint64_t page_size;
};

static void pages_range(const void *ctx, uint64_t i, uint64_t *start, uint64_t *len)
{
    const struct pages_ctx *c = ctx;
    *start = c->addrs[i];
    *len = c->page_size;
}

int64_t gfvm_vm_read_pages(int pid, const uint64_t *addrs, uint64_t n, uint64_t page_size, void *buf)
{
    struct pages_ctx c = {addrs, page_size};
    return transfer(pid, 0, pages_range, &c, n, buf);
}

int64_t gfvm_vm_write_pages(int pid, const uint64_t *addrs, uint64_t n, uint64_t page_size,
                            const void *buf)
{
    struct pages_ctx c = {addrs, page_size};
    return transfer(pid, 1, pages_range, &c, n, (char *)buf);
}

struct ranges_ctx {
    const uint64_t *starts;
    const uint64_t *lens;
};

static void ranges_range(const void *ctx, uint64_t i, uint64_t *start, uint64_t *len)
{
    const struct ranges_ctx *c = ctx;
    *start = c->starts[i];
    *len = c->lens[i];
}

int64_t gfvm_vm_transfer_ranges(int pid, int write, const uint64_t *starts, const uint64_t *lens,
                                uint64_t n, void *buf)
{
    struct ranges_ctx c = {starts, lens};
    return transfer(pid, write, ranges_range, &c, n, buf);
}

static void regions_range(const void *ctx, uint64_t i, uint64_t *start, uint64_t *len)
{
    const struct page_region *r = (const struct page_region *)ctx + i;
    *start = r->start;
    *len = r->end - r->start;
}

int64_t gfvm_vm_read_regions(int pid, const struct page_region *regions, uint64_t n, void *buf)
{
    return transfer(pid, 0, regions_range, regions, n, buf);
}
