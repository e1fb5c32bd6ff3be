/* userfaultfd primitives: thin, checked wrappers around the uffd ioctls plus message decoding.
 *
 * Invariants: every uffd made or received here is O_NONBLOCK|O_CLOEXEC (poll() on a blocking
 * uffd reports POLLERR at once) and never UFFD_USER_MODE_ONLY (kernel-mode accesses such as
 * read(2) into a missing page would then fail with EFAULT instead of waiting for the pager).
 *
 * Dirty tracking and zero pages (measured on 6.18 with WP_ASYNC|WP_UNPOPULATED, range registered
 * MISSING|WP, scanned with PAGEMAP_SCAN):
 *   - UFFDIO_COPY with MODE_WP          -> PRESENT|WPALLOWED           (clean: exact)
 *   - UFFDIO_COPY without MODE_WP       -> PRESENT|WPALLOWED|WRITTEN   (counts as written at once)
 *   - UFFDIO_ZEROPAGE (has no WP mode)  -> PRESENT|PFNZERO|WRITTEN     (counts as written)
 *   - ZEROPAGE then WRITEPROTECT(WP)    -> PRESENT|PFNZERO             (clean, but between the two
 *     ioctls another thread of the process may write the page unseen: a lost dirty bit)
 *   - freshly registered, never protected pages also count as WRITTEN until the first
 *     UFFDIO_WRITEPROTECT or PM_SCAN_WP_MATCHING scan installs the markers.
 * So where dirty tracking matters (WP-registered ranges) zero pages are installed with
 * UFFDIO_COPY of a zero buffer with MODE_WP (exact, costs one real page); UFFDIO_ZEROPAGE is only
 * used for ranges without WP tracking (e.g. the uffd CRIU hands over on restore). */
#include "kernel_abi.h"
#include "uffd.h"

#include <fcntl.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int gfvm_uffd_create(void)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    return fd < 0 ? -errno : fd;
}

/* UFFDIO_API may be called once per uffd; a second call fails with EINVAL. */
int gfvm_uffd_api(int fd, uint64_t features, uint64_t *granted, uint64_t *ioctls)
{
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -errno;
    *granted = api.features;
    *ioctls = api.ioctls;
    return 0;
}

int gfvm_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls)
{
    struct uffdio_register reg = {.range = {.start = start, .len = len}, .mode = mode};
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    *ioctls = reg.ioctls;
    return 0;
}

int gfvm_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = {.start = start, .len = len};
    return ioctl(fd, UFFDIO_UNREGISTER, &range) < 0 ? -errno : 0;
}

int gfvm_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
    struct uffdio_writeprotect wp = {.range = {.start = start, .len = len}, .mode = mode};
    return ioctl(fd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0;
}

/* The kernel reports progress in the struct: bytes done (> 0) with EAGAIN for a partial copy, or
 * a negative errno. *done is always the number of bytes installed (>= 0). A copy whose first page
 * already exists fails with EEXIST; one that stops at a later existing page is partial (EAGAIN).
 * EAGAIN with *done == 0 means the mm is changing (an event is waiting to be read). */
int gfvm_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, int64_t *done)
{
    struct uffdio_copy copy = {.dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len, .mode = mode};
    int rc = ioctl(fd, UFFDIO_COPY, &copy) < 0 ? -errno : 0;
    *done = copy.copy > 0 ? copy.copy : 0;
    return rc;
}

int gfvm_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
    struct uffdio_zeropage zp = {.range = {.start = start, .len = len}, .mode = mode};
    int rc = ioctl(fd, UFFDIO_ZEROPAGE, &zp) < 0 ? -errno : 0;
    *done = zp.zeropage > 0 ? zp.zeropage : 0;
    return rc;
}

int gfvm_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
    struct uffdio_poison p = {.range = {.start = start, .len = len}, .mode = mode};
    int rc = ioctl(fd, UFFDIO_POISON, &p) < 0 ? -errno : 0;
    *done = p.updated > 0 ? p.updated : 0;
    return rc;
}

int gfvm_uffd_wake(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = {.start = start, .len = len};
    return ioctl(fd, UFFDIO_WAKE, &range) < 0 ? -errno : 0;
}

/* Decodes one raw uffd_msg. A fork message's fd is already open in this process (the kernel
 * installs it when the message is read); make sure it is non-blocking and close-on-exec. */
int gfvm_uffd_decode(const void *raw, struct gfvm_uffd_event *out)
{
    const struct uffd_msg *msg = raw;
    memset(out, 0, sizeof(*out));
    out->event = msg->event;
    out->fd = -1;
    switch (msg->event) {
    case UFFD_EVENT_PAGEFAULT:
        out->address = msg->arg.pagefault.address;
        out->flags = msg->arg.pagefault.flags;
        out->tid = msg->arg.pagefault.feat.ptid;
        break;
    case UFFD_EVENT_FORK: {
        int nfd = (int)msg->arg.fork.ufd;
        int fl = fcntl(nfd, F_GETFL);
        if (fl >= 0 && !(fl & O_NONBLOCK))
            fcntl(nfd, F_SETFL, fl | O_NONBLOCK);
        fcntl(nfd, F_SETFD, FD_CLOEXEC);
        out->fd = nfd;
        break;
    }
    case UFFD_EVENT_REMAP:
        out->start = msg->arg.remap.from;
        out->end = msg->arg.remap.from + msg->arg.remap.len;
        out->to = msg->arg.remap.to;
        break;
    case UFFD_EVENT_REMOVE:
    case UFFD_EVENT_UNMAP:
        out->start = msg->arg.remove.start;
        out->end = msg->arg.remove.end;
        break;
    default:
        return -EPROTO;
    }
    return 0;
}

/* Reads up to `max` messages without blocking. Returns how many were decoded (0 when none is
 * pending). Messages that fail to decode are still returned (event set, fields zero) so that no
 * fork fd goes unnoticed; an unknown event type is not an error here. */
int gfvm_uffd_read_events(int fd, struct gfvm_uffd_event *out, int max)
{
    struct uffd_msg msgs[64];
    if (max <= 0)
        return -EINVAL;
    if (max > 64)
        max = 64;
    ssize_t n = read(fd, msgs, sizeof(msgs[0]) * (size_t)max);
    if (n < 0)
        return errno == EAGAIN ? 0 : -errno;
    int count = (int)(n / (ssize_t)sizeof(msgs[0]));
    for (int i = 0; i < count; i++)
        gfvm_uffd_decode(&msgs[i], &out[i]);
    return count;
}
