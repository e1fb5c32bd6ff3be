#ifndef GFVM_PAGEREAD_H
#define GFVM_PAGEREAD_H
#include <stdint.h>

int64_t gfvm_pread_pages(int fd, const uint64_t *pages, uint64_t n, const uint32_t *wants, void *out);

#endif
