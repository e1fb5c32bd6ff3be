/* Page checksums (csrc/checksum.c). */
#ifndef GFVM_CHECKSUM_H
#define GFVM_CHECKSUM_H
#include <stdint.h>

uint32_t gfvm_crc32_page(const void *page);
int gfvm_crc32_pages(const void *buf, uint64_t n, uint32_t *out);

#endif
