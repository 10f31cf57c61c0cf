"""glibc malloc settings that keep a process's freed memory for its next allocations.

A training step allocates the same large blocks at every step (torch's loss and gradient tensors:
25.6 MB for 100k nodes x 64 float32 features). With glibc's defaults, freeing them can leave more
free memory at the top of the heap than its trim threshold (twice the largest block freed from
``mmap``), and malloc gives those pages back to the kernel: the next step faults them in again, at
about 2 us a page on the project's machine (12.7 ms per 25.6 MB), and whether that happens depends
on where the heap's other blocks lie, so processes running the same step settle at different
speeds. ``keep_freed_memory`` (run when mpdsl is imported) serves blocks of up to 32 MB (glibc's
largest threshold) from the heap and keeps up to ``KEEP_FREED_BYTES`` of free memory there.

Left alone: a process whose allocator is not glibc's, one where the user set any ``MALLOC_*_``
tuning variable, and ``MPDSL_MALLOC=default``.
"""

from __future__ import annotations

import ctypes
import os

ENV_VAR = "MPDSL_MALLOC"
KEEP_FREED_BYTES = 512 << 20  # free memory at the heap's top kept for reuse (M_TRIM_THRESHOLD)
HEAP_BLOCK_BYTES = 32 << 20  # blocks up to this size come from the heap (M_MMAP_THRESHOLD; glibc's maximum)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
USER_TUNING = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> bool:
    """Set glibc's thresholds as the module docstring says; whether they were set."""
    if os.environ.get(ENV_VAR, "").lower() == "default" or any(name in os.environ for name in USER_TUNING):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl and macOS have mallopt with other options)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.restype, mallopt.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
