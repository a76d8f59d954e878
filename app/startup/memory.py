"""Keep freed memory in the process: a CPU fast path of the eps-network forward (glibc only).

A forward allocates and frees the same activations every step. glibc serves a block above its
mmap threshold as a mapping of its own, unmapped when freed, and gives the free top of its heap
back to the OS once that passes the trim threshold. Both thresholds adapt (up to 32 MiB, and twice
that) to the largest block freed so far, but the activations of one forward, all freed at its
end, often still leave a free heap top past the trim threshold (how often depends on where they
land in the heap), and then the next step faults its whole working set in again as fresh zeroed
pages (9-16 % of the bundled model's forward rate here: docs/benchmarks.md). Fixing the mmap
threshold at its cap and the trim threshold at 1 GiB once keeps that memory mapped and reused,
the way torch's CUDA caching allocator keeps device memory. RSS then stays at the largest
forward's working set instead of shrinking between steps (tests/models/test_memory.py). With
another malloc preloaded (jemalloc, tcmalloc) glibc's settings would change nothing, and this says so.

The trim threshold does not cover one case. Forwards run in a model's worker thread, whose memory
comes from a thread arena: a chain of 64 MiB heaps. glibc unmaps a whole heap of the chain as soon
as a free leaves it empty, unless the top pad is at least that size (heap_trim in glibc's arena.c;
the trim threshold only governs shrinking a heap's top). A forward's activations span several
heaps, so without the pad a process can fall into unmapping and faulting in one heap every step:
thousands to tens of thousands of page faults per forward, at up to a fifth less speed, in some
processes for their whole measured life and in others never (benchmarks/top_pad.py,
docs/benchmarks.md). Side effects of the 64 MiB pad: each new thread arena maps a whole heap
read-write at once (address space, not RSS; it counts under overcommit_memory=2 or RLIMIT_DATA),
the main heap grows and trims in steps of it, and no thread arena ever gives a heap back, so RSS
is the sum of each arena's peak.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger(__name__)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc refuses more on 64-bit (half of its heap size)
HEAP_MAX = 2 * MMAP_THRESHOLD_MAX  # the size of one heap of a thread arena (HEAP_MAX_SIZE)
GLIBC_TOP_PAD = 128 * 1024  # glibc's own top pad (DEFAULT_TOP_PAD), for comparisons
TRIM_THRESHOLD = 1 << 30
GLIBC = "libc.so.6"  # glibc's soname on every Linux it runs on


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds and its top pad for this process; False where that would change
    nothing."""
    try:
        glibc = ctypes.CDLL(GLIBC)
        process = ctypes.CDLL(None)  # the symbols this process resolves, an LD_PRELOADed malloc first
    except OSError:  # not glibc (musl, macOS, Windows): nothing to tune
        return False
    if _address(process.malloc) != _address(glibc.malloc):
        log.warning("malloc here is not glibc's (LD_PRELOAD?); DDIM_KEEP_FREED_MEMORY has no effect")
        return False
    mallopt = glibc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    refused = [name for name, param, value in (("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                               ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
                                               ("M_TOP_PAD", M_TOP_PAD, HEAP_MAX))
               if mallopt(param, value) != 1]
    if refused:
        log.warning("mallopt refused %s; freed memory may still go back to the OS", ", ".join(refused))
    return not refused


def _address(function: Any) -> int | None:  # a ctypes function pointer
    return ctypes.cast(function, ctypes.c_void_p).value
