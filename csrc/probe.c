/* Feature probes for `gfvm doctor`: each asks the running kernel directly (no version guessing)
 * and returns 0 when the feature works, -errno otherwise. */
#include "kernel_abi.h"
#include "probe.h"

#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Reports every userfaultfd feature the kernel offers (UFFDIO_API with features = 0). */
int gfvm_probe_uffd_features(uint64_t *features)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return -errno;
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    int rc = ioctl(fd, UFFDIO_API, &api) < 0 ? -errno : 0;
    close(fd);
    if (rc == 0)
        *features = api.features;
    return rc;
}

/* PAGEMAP_SCAN on our own stack page: ENOTTY on kernels without it. */
int gfvm_probe_pagemap_scan(void)
{
    static char probe_page[4096] __attribute__((aligned(4096)));
    struct page_region regions[4];
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    probe_page[0] = 1;
    struct pm_scan_arg arg = {
        .size = sizeof(arg),
        .start = (uint64_t)(uintptr_t)probe_page,
        .end = (uint64_t)(uintptr_t)probe_page + sizeof(probe_page),
        .vec = (uint64_t)(uintptr_t)regions,
        .vec_len = 4,
        .category_anyof_mask = PAGE_IS_PRESENT,
        .return_mask = PAGE_IS_PRESENT,
    };
    int rc = ioctl(fd, PAGEMAP_SCAN, &arg) < 0 ? -errno : 0;
    close(fd);
    return rc;
}

/* pidfd_open + pidfd_getfd on ourselves, copying our own stdin-or-any fd. */
int gfvm_probe_pidfd_getfd(void)
{
    int pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
    if (pidfd < 0)
        return -errno;
    int fd = (int)syscall(SYS_pidfd_getfd, pidfd, pidfd, 0);
    int rc = fd < 0 ? -errno : 0;
    if (fd >= 0)
        close(fd);
    close(pidfd);
    return rc;
}
