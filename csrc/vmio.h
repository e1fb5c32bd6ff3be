/* Batched process_vm_readv / process_vm_writev (csrc/vmio.c). */
#ifndef GFVM_VMIO_H
#define GFVM_VMIO_H
#include <stdint.h>

struct page_region;
int64_t gfvm_vm_read_pages(int pid, const uint64_t *addrs, uint64_t n, uint64_t page_size, void *buf);
int64_t gfvm_vm_write_pages(int pid, const uint64_t *addrs, uint64_t n, uint64_t page_size,
                            const void *buf);
int64_t gfvm_vm_transfer_ranges(int pid, int write, const uint64_t *starts, const uint64_t *lens,
                                uint64_t n, void *buf);
int64_t gfvm_vm_read_regions(int pid, const struct page_region *regions, uint64_t n, void *buf);

#endif
