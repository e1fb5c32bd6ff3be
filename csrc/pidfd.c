/* pidfd syscalls: a stable handle on a process (no PID reuse races), copying an fd out of it
 * (root may copy any fd; this is how the pager obtains a uffd created inside the target), and
 * signalling it. Every pidfd/fd made here is close-on-exec. */
#include "kernel_abi.h"
#include "pidfd.h"

#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

_Static_assert(PIDFD_THREAD == O_EXCL, "PIDFD_THREAD");

int gfvm_pidfd_open(int pid, unsigned int flags)
{
    int fd = (int)syscall(SYS_pidfd_open, pid, flags);
    return fd < 0 ? -errno : fd;
}

/* The new fd is always O_CLOEXEC (pidfd_getfd sets it). */
int gfvm_pidfd_getfd(int pidfd, int targetfd)
{
    int fd = (int)syscall(SYS_pidfd_getfd, pidfd, targetfd, 0);
    return fd < 0 ? -errno : fd;
}

int gfvm_pidfd_send_signal(int pidfd, int sig)
{
    return syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0) < 0 ? -errno : 0;
}
