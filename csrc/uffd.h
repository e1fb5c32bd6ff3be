/* userfaultfd primitives (csrc/uffd.c). All return >= 0 or -errno. */
#ifndef GFVM_UFFD_H
#define GFVM_UFFD_H
#include <stdint.h>

/* One decoded uffd message. Which fields are set depends on `event` (a UFFD_EVENT_* value):
 *   PAGEFAULT: address, flags (UFFD_PAGEFAULT_FLAG_*), tid (0 without UFFD_FEATURE_THREAD_ID)
 *   FORK:      fd = the child's new uffd, now open in this process (O_NONBLOCK|O_CLOEXEC)
 *   REMAP:     start = old address, end = start + len, to = new address
 *   REMOVE, UNMAP: [start, end) */
struct gfvm_uffd_event {
    uint32_t event;
    uint32_t tid;
    uint64_t flags;
    uint64_t address;
    uint64_t start;
    uint64_t end;
    uint64_t to;
    int64_t fd;
};

int gfvm_uffd_create(void);
int gfvm_uffd_api(int fd, uint64_t features, uint64_t *granted, uint64_t *ioctls);
int gfvm_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls);
int gfvm_uffd_unregister(int fd, uint64_t start, uint64_t len);
int gfvm_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
int gfvm_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode, int64_t *done);
int gfvm_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);
int gfvm_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);
int gfvm_uffd_wake(int fd, uint64_t start, uint64_t len);
int gfvm_uffd_read_events(int fd, struct gfvm_uffd_event *out, int max);
int gfvm_uffd_decode(const void *msg, struct gfvm_uffd_event *out);

#endif
