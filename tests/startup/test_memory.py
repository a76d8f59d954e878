"""DDIM_KEEP_FREED_MEMORY: the memory a forward-like step frees stays in the process and is reused."""

from __future__ import annotations

import ctypes.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from app.startup import memory

# One "step" mallocs `blocks` blocks of 8 MiB, touches them and frees them all, as a forward does with
# its activations (torch's CPU allocator is malloc). The probe prints what RSS keeps after the first
# step, what it has grown by after 10 more, and the minor page faults of those 10. "main" steps in
# the main thread (glibc's main heap), "thread" in another thread, as a model's worker does: its
# memory comes from a thread arena, a chain of 64 MiB heaps, and 12 blocks need two of them.
# Controls: "give-back" fixes glibc's documented static thresholds (128 KiB): each block is a mapping
# of its own, unmapped when freed; glibc's adaptive defaults are no control, as whether they give a
# step's memory back depends on where its blocks land in the heap (torch's tensors, with small
# allocations between them, sometimes kept it in a CI run). "thresholds" raises the mmap and trim
# thresholds without the top pad: enough in the main thread, not in another.
PROBE = """
import ctypes, resource, sys, threading
from app.startup.memory import (GLIBC, GLIBC_TOP_PAD, M_MMAP_THRESHOLD, M_TOP_PAD, M_TRIM_THRESHOLD,
                               MMAP_THRESHOLD_MAX, TRIM_THRESHOLD, keep_freed_memory)

M_ARENA_MAX = -8

libc = ctypes.CDLL(GLIBC)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
mode, where, blocks = sys.argv[1], sys.argv[2], int(sys.argv[3])
assert libc.mallopt(M_ARENA_MAX, 8) == 1  # the thread gets an arena of its own, whatever MALLOC_ARENA_MAX says
if mode == "keep":
    assert keep_freed_memory()
elif mode == "thresholds":
    assert libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    assert libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    assert libc.mallopt(M_TOP_PAD, GLIBC_TOP_PAD) == 1  # whatever MALLOC_TOP_PAD_ says
else:
    assert libc.mallopt(M_MMAP_THRESHOLD, 128 << 10) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 128 << 10) == 1

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

def step():
    taken = [libc.malloc(8 << 20) for _ in range(blocks)]
    for block in taken:
        ctypes.memset(block, 1, 8 << 20)
    for block in taken:
        libc.free(block)

def steps():
    before = rss()
    step()
    kept = rss() - before
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(kept, rss() - before, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)

if where == "thread":
    worker = threading.Thread(target=steps)
    worker.start()
    worker.join()
else:
    steps()
"""
JEMALLOC = ctypes.util.find_library("jemalloc")
GLIBC_ONLY = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def probe(mode: str, where: str = "main", blocks: int = 4,
          env: dict[str, str] | None = None) -> tuple[int, int, int, int]:
    """(step bytes, bytes kept after one step, bytes grown after 11, page faults of the last 10), in a fresh
    process."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode, where, str(blocks)], capture_output=True, text=True,
                         check=True, env={**os.environ, **(env or {})}, cwd=Path(__file__).parents[2])
    kept, grown, faults = map(int, out.stdout.split())
    return blocks * (8 << 20), kept, grown, faults


def assert_kept_and_reused(step: int, kept: int, grown: int, faults: int) -> None:
    assert kept > step * 7 // 8  # the step's memory stays in the process...
    assert grown - kept < step // 8  # ...and the next 10 steps reuse it instead of growing
    assert faults < 10 * step // 4096 // 100  # < 1 % of their pages faulted in (give-back: every page)


@GLIBC_ONLY
def test_freed_memory_stays_and_is_reused_instead_of_going_back_to_the_os() -> None:
    step, kept, _, _ = probe("give-back")
    assert kept < step // 8  # control: the probe sees memory go back to the OS
    assert_kept_and_reused(*probe("keep"))


@GLIBC_ONLY
def test_a_worker_threads_arena_keeps_its_heaps() -> None:
    step, _, _, faults = probe("thresholds", "thread", 12)
    assert faults > 10 * step // 4096 // 5  # control: every step unmaps and faults in a heap again
    assert_kept_and_reused(*probe("keep", "thread", 12))


@pytest.mark.skipif(JEMALLOC is None, reason="needs libjemalloc2 (installed by .ci/run)")
def test_with_another_malloc_preloaded_it_reports_false() -> None:
    code = "from app.startup.memory import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "LD_PRELOAD": JEMALLOC}, cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "False"
    assert "not glibc's" in out.stderr


def test_without_glibc_it_reports_false(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc(name: object) -> None:
        raise OSError("no C library here")

    monkeypatch.setattr(memory.ctypes, "CDLL", no_libc)
    assert memory.keep_freed_memory() is False
