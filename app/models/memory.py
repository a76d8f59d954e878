"""Keep freed memory in the process: a CPU fast path of the eps-network forward (glibc only).

A forward allocates and frees the same activations every step. glibc serves a block above its
mmap threshold as a mapping of its own, unmapped when freed, and gives the free top of its heap
back to the OS once that passes the trim threshold. Both thresholds adapt (up to 32 MiB, and twice
that) to the largest block freed so far, but the activations of one forward, all freed at its
end, still leave a free heap top past the trim threshold, so every step faults its whole working
set in again as fresh zeroed pages (tests/models/test_memory.py counts them). Fixing the mmap
threshold at its cap and the trim threshold at 1 GiB once keeps that memory mapped and reused,
the way torch's CUDA caching allocator keeps device memory. RSS then stays at the largest
forward's working set instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc refuses more on 64-bit (half of its heap size)
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; False where that is not possible."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    refused = [name for name, param, value in (("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                               ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX))
               if mallopt(param, value) != 1]
    if refused:
        log.warning("mallopt refused %s; freed memory may still go back to the OS", ", ".join(refused))
    return not refused
