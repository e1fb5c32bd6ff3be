/* Page checksums: CRC-32 exactly as zlib computes it (crc32(0, page, 4096): IEEE 802.3
 * polynomial, reflected, initial and final XOR 0xFFFFFFFF), which is what Python's zlib.crc32
 * returns and what the paging file stores per page (gfvm/pager/pagefile.py). zlib itself does
 * the work (about 6 GB/s here); from Python these run without the GIL (cffi releases it). */
#include "kernel_abi.h"
#include "checksum.h"

#include <zlib.h>

#define PAGE 4096u

uint32_t gfvm_crc32_page(const void *page)
{
    return (uint32_t)crc32(0L, (const Bytef *)page, PAGE);
}

/* out[i] = CRC-32 of the i-th 4 KiB page of buf (n pages). */
int gfvm_crc32_pages(const void *buf, uint64_t n, uint32_t *out)
{
    const unsigned char *p = buf;
    for (uint64_t i = 0; i < n; i++)
        out[i] = gfvm_crc32_page(p + i * PAGE);
    return 0;
}
