/* Page checksums (csrc/checksum.c). */
#ifndef GFVM_CHECKSUM_H
#define GFVM_CHECKSUM_H
#include <stdint.h>

/* CRC-32 implementations, slowest first (gfvm_crc32_page uses the best the CPU has) */
#define GFVM_CRC32_ZLIB 0
#define GFVM_CRC32_PCLMUL 1
#define GFVM_CRC32_VPCLMUL512 2

uint32_t gfvm_crc32_page(const void *page);
int gfvm_crc32_best_impl(void);
int gfvm_crc32_page_using(const void *page, int impl, uint32_t *out);
int gfvm_crc32_pages(const void *buf, uint64_t n, uint32_t *out);
int gfvm_page_matches(const void *buf, uint64_t len, uint32_t want);

#endif
