"""glibc's malloc policy for CPU training."""
from __future__ import annotations

import sys

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def retain_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A CPU training step allocates and frees the same activation buffers thousands of times. By
    default glibc maps buffers over its (adaptive) threshold fresh from the kernel and trims the
    heap top as soon as enough is free, so the next step faults those pages in again; with these
    settings the memory is reused (already touched, so the peak RSS does not grow). Buffers of
    ``mmap_threshold`` bytes and more are still mapped and unmapped.
    Returns False (and changes nothing) where the C library is not glibc.
    """
    import ctypes
    import platform

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
                and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
