/* pidfd syscalls (csrc/pidfd.c). */
#ifndef GFVM_PIDFD_H
#define GFVM_PIDFD_H
#include <stdint.h>

int gfvm_pidfd_open(int pid, unsigned int flags);
int gfvm_pidfd_getfd(int pidfd, int targetfd);
int gfvm_pidfd_send_signal(int pidfd, int sig);

#endif
