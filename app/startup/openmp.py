"""An idle model's OpenMP threads are given back, so that they do not slow the busy models (GNU libgomp).

Why (issue 24: with both bundled models loaded, the busy one ran at 0.74-0.77 of its raw forward, with one model at
1.04): under libgomp each thread that runs torch's CPU kernels keeps a thread team of its own, and every thread of
every team counts towards libgomp's "managed threads". Once they outnumber the CPUs, libgomp cuts the time each
thread spins at a barrier before it sleeps from about 300,000 spins to 100 (gomp_throttled_spin_count_var in its
env.c; OMP_WAIT_POLICY=active only raises that to 1,000). Every parallel region of the busy model then ends in futex
sleeps and wake-ups instead of a short spin: its two compute threads ran at 87 % and 67 % of a core instead of 99 %.
One model on a 2-core machine has 2 managed threads (the initial thread, and its team's second thread); a second
model's team, idle since its warm-up, makes 3.

The worker of a model that has been idle for a moment calls omp_pause_resource_all (OpenMP 5.0) from its own
thread: libgomp ends that thread's team and lowers the count. Its next forward starts a new team (a pthread_create
per thread, microseconds against a forward's milliseconds).
"""

from __future__ import annotations

import ctypes
import logging
from functools import cache

log = logging.getLogger(__name__)
OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: soft pause frees the threads, keeps nothing that needs restoring


@cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp this process has loaded (torch ships its own), or None (another OpenMP, or none)."""
    try:
        with open("/proc/self/maps") as f:
            path = next((line.split()[-1] for line in f if "libgomp" in line.rsplit("/", 1)[-1]), None)
    except OSError:
        return None
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
        lib.omp_pause_resource_all.argtypes, lib.omp_pause_resource_all.restype = [ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):  # a libgomp before OpenMP 5.0
        return None
    return lib


def release_thread_team() -> bool:
    """End the calling thread's OpenMP team (libgomp only); True if one was released."""
    lib = _libgomp()
    if lib is None:
        return False
    return lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
