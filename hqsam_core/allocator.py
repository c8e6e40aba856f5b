"""Keep freed memory in the process on CPU.

glibc's malloc hands each large block (a CPU tensor of more than a few hundred kB) back to the
kernel when it is freed, and the next forward pass faults the same pages in again: on a 2-core VM
a vit_tiny refine of 4 images took 2.3 M page faults and spent ~40% of its CPU time in the
kernel. Serving large blocks from malloc's heap and never trimming it removes that (the same batch:
6.5 s -> 4.1 s); the price is that the process keeps its peak memory, which a refine or training
worker reaches on its first batch anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_MAX = -4
OPT_OUT = "HQSAM_RETAIN_FREED_MEMORY"


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (process-wide). False where it cannot: not
    glibc, or HQSAM_RETAIN_FREED_MEMORY=0."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (macOS, musl without mallopt): nothing to tune
    applied = mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1 and mallopt(M_MMAP_MAX, 0) == 1
    if not applied:
        log.debug("mallopt refused; freed memory goes back to the kernel as usual")
    return applied
