/* Many scattered 4 KiB pages of one file in one call: a pread each, checked against the File
 * Manager's page sums when they are given. One call into C for a whole batch is what makes a
 * verified read as cheap as a plain one (a Python call per page costs more than the check).
 * The caller handles whatever this stops at (see the return value): a page that does not match
 * (retried under its file's lock, or reported as damage) and the end of the file (zeros). */

#include "pageread.h"

#include <errno.h>
#include <unistd.h>

#include "checksum.h"

#define PAGE 4096

/* Reads page pages[i] (byte offset pages[i] * 4096) of `fd` into out + i * 4096, for i from 0,
 * and checks it against wants[i] (a page sum: 0 = a hole, all zeros; else the page's CRC-32
 * with 0 stored as 0xFFFFFFFF) unless `wants` is NULL. Returns n when every page was read whole
 * and matched; else the index of the first page that was short (end of file) or did not match
 * (the pages before it are in `out`); or -errno when a pread failed. Blocks on disk I/O; holds
 * no lock and no GIL. */
int64_t gfvm_pread_pages(int fd, const uint64_t *pages, uint64_t n, const uint32_t *wants, void *out)
{
    unsigned char *dst = out;
    for (uint64_t i = 0; i < n; i++) {
        if (pages[i] > (uint64_t)INT64_MAX / PAGE)
            return -EINVAL;
        ssize_t got;
        do
            got = pread(fd, dst + i * PAGE, PAGE, (off_t)(pages[i] * PAGE));
        while (got < 0 && errno == EINTR);
        if (got < 0)
            return -errno;
        if (got < PAGE)
            return (int64_t)i;
        if (wants && !gfvm_page_matches(dst + i * PAGE, PAGE, wants[i]))
            return (int64_t)i;
    }
    return (int64_t)n;
}
