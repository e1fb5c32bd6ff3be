#ifndef GFVM_PROBE_H
#define GFVM_PROBE_H
#include <stdint.h>

int gfvm_probe_uffd_features(uint64_t *features);
int gfvm_probe_pagemap_scan(void);
int gfvm_probe_pidfd_getfd(void);

#endif
