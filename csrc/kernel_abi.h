/* Kernel ABI that bookworm's 6.1 headers lack, defined once here and checked with static asserts
 * against the sizes and numbers the kernel ABI fixes. Every csrc/ module includes this first.
 * Convention for all of csrc/: functions return >= 0 on success or -errno; nothing prints or exits. */
#ifndef GFVM_KERNEL_ABI_H
#define GFVM_KERNEL_ABI_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/userfaultfd.h>
#include <linux/fs.h>

/* --- userfaultfd features newer than 6.1 (include/uapi/linux/userfaultfd.h) --- */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif

/* --- PAGEMAP_SCAN (include/uapi/linux/fs.h, 6.7+) --- */
#ifndef PAGEMAP_SCAN
struct page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
};

struct pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};

#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#endif

_Static_assert(sizeof(struct pm_scan_arg) == 96, "pm_scan_arg is 12 x u64");
_Static_assert(sizeof(struct page_region) == 24, "page_region is 3 x u64");
_Static_assert(PAGEMAP_SCAN == 0xC0606610, "PAGEMAP_SCAN ioctl number");

/* --- UFFDIO_POISON (6.6+): the pager poisons a page it cannot serve truthfully, so the process
 * gets SIGBUS on access instead of waiting forever or reading wrong data. --- */
#ifndef UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
struct uffdio_poison {
    struct uffdio_range range;
    uint64_t mode;
    int64_t updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#define UFFDIO_POISON_MODE_DONTWAKE ((uint64_t)1 << 0)
#endif
_Static_assert(sizeof(struct uffdio_poison) == 32, "uffdio_poison is range + mode + updated");
_Static_assert(UFFDIO_POISON == 0xC020AA08, "UFFDIO_POISON ioctl number");
_Static_assert(sizeof(struct uffd_msg) == 32, "uffd_msg is 32 bytes");

/* --- PROCMAP_QUERY on /proc/PID/maps (6.11+): the VMA that contains an address, in one ioctl.
 * The fault loop uses it to keep a UFFDIO_COPY window inside one VMA. --- */
#ifndef PROCMAP_QUERY
struct procmap_query {
    uint64_t size;
    uint64_t query_flags;
    uint64_t query_addr;
    uint64_t vma_start;
    uint64_t vma_end;
    uint64_t vma_flags;
    uint64_t vma_page_size;
    uint64_t vma_offset;
    uint64_t inode;
    uint32_t dev_major;
    uint32_t dev_minor;
    uint32_t vma_name_size;
    uint32_t build_id_size;
    uint64_t vma_name_addr;
    uint64_t build_id_addr;
};
#define PROCMAP_QUERY _IOWR('f', 17, struct procmap_query)
#define PROCMAP_QUERY_VMA_READABLE 0x01
#define PROCMAP_QUERY_VMA_WRITABLE 0x02
#define PROCMAP_QUERY_VMA_EXECUTABLE 0x04
#define PROCMAP_QUERY_VMA_SHARED 0x08
#define PROCMAP_QUERY_COVERING_OR_NEXT_VMA 0x10
#define PROCMAP_QUERY_FILE_BACKED_VMA 0x20
#endif
_Static_assert(sizeof(struct procmap_query) == 104, "procmap_query is 104 bytes");
_Static_assert(PROCMAP_QUERY == 0xC0686611, "PROCMAP_QUERY ioctl number");

/* --- syscalls newer than some libcs --- */
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
/* pidfd_open flag (6.9+): a pidfd for one thread rather than a thread-group leader. */
#ifndef PIDFD_THREAD
#define PIDFD_THREAD 0x80 /* O_EXCL */
#endif
_Static_assert(PIDFD_THREAD == 0x80, "PIDFD_THREAD is O_EXCL on x86_64");
_Static_assert(SYS_pidfd_open == 434 && SYS_pidfd_getfd == 438 && SYS_pidfd_send_signal == 424,
               "x86_64 pidfd syscall numbers");

#endif
