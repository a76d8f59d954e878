"""DDIM_KEEP_FREED_MEMORY: the memory a forward-like step frees stays in the process and is reused."""

from __future__ import annotations

import ctypes.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from app.models import memory

# One "step" mallocs 4 blocks of 8 MiB, touches them and frees them all, as a forward does with its
# activations (torch's CPU allocator is malloc). The probe prints what RSS keeps after the first step,
# what it has grown by after 10 more, and the minor page faults of those 10. The control,
# "give-back", fixes glibc's documented static thresholds (128 KiB): each block is a mapping of its
# own, unmapped when freed. glibc's adaptive defaults are no control: whether they give a step's
# memory back depends on where its blocks land in the heap (torch's tensors, with small allocations
# between them, sometimes kept it in a CI run).
PROBE = """
import ctypes, resource, sys
from app.models.memory import GLIBC, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory

libc = ctypes.CDLL(GLIBC)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert keep_freed_memory()
else:
    assert libc.mallopt(M_MMAP_THRESHOLD, 128 << 10) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 128 << 10) == 1

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

def step():
    blocks = [libc.malloc(8 << 20) for _ in range(4)]
    for block in blocks:
        ctypes.memset(block, 1, 8 << 20)
    for block in blocks:
        libc.free(block)

before = rss()
step()
kept = rss() - before
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(kept, rss() - before, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""
STEP = 4 * (8 << 20)
JEMALLOC = ctypes.util.find_library("jemalloc")


def probe(mode: str, env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(bytes kept after one step, bytes grown after 11, page faults of the last 10) in a fresh process."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}, cwd=Path(__file__).parents[2])
    kept, grown, faults = map(int, out.stdout.split())
    return kept, grown, faults


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_stays_and_is_reused_instead_of_going_back_to_the_os() -> None:
    kept, _, _ = probe("give-back")
    assert kept < STEP // 8  # control: the probe sees memory go back to the OS
    kept, grown, faults = probe("keep")
    assert kept > STEP * 7 // 8  # the step's memory stays in the process...
    assert grown - kept < STEP // 8  # ...and the next 10 steps reuse it instead of growing
    assert faults < 10 * STEP // 4096 // 100  # < 1 % of their pages faulted in (give-back: every page)


@pytest.mark.skipif(JEMALLOC is None, reason="needs libjemalloc2 (installed by .ci/run)")
def test_with_another_malloc_preloaded_it_reports_false() -> None:
    code = "from app.models.memory import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "LD_PRELOAD": JEMALLOC}, cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "False"
    assert "not glibc's" in out.stderr


def test_without_glibc_it_reports_false(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc(name: object) -> None:
        raise OSError("no C library here")

    monkeypatch.setattr(memory.ctypes, "CDLL", no_libc)
    assert memory.keep_freed_memory() is False
