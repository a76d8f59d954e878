"""Keep freed memory in the process: a CPU fast path of the eps-network forward (glibc only).

glibc hands big freed blocks back to the operating system: a block above the mmap threshold is a
mapping of its own, unmapped when freed, and free memory at the top of the heap is trimmed once
it passes the trim threshold. A forward allocates and frees the same activations every step, so
every step faults them in again as fresh zeroed pages. Raising both thresholds once keeps the
working set mapped and reused, the way torch's CUDA caching allocator keeps device memory. RSS
then stays at the largest forward's working set instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc refuses more on 64-bit (half of its heap size)
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where that is not possible."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the thresholds; freed memory goes back to the OS as before")
    return ok
