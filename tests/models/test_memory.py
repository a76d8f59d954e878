"""DDIM_KEEP_FREED_MEMORY: big tensors come from the reused heap instead of a fresh mapping each time."""

from __future__ import annotations

import ctypes.util
import platform
import subprocess
import sys

import pytest

from app.models.memory import MMAP_THRESHOLD_MAX, keep_freed_memory

PROBE = """
import ctypes, sys, torch
from app.models.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
mapped = libc.mallinfo2().hblkhd
x = torch.empty(int(sys.argv[2]), dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - mapped)
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and mallinfo2 are glibc's")


def mapped_bytes(mode: str, size: int) -> int:
    """Bytes of new mmap'd blocks after allocating one tensor of size bytes in a fresh process."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(size)], capture_output=True, text=True, check=True)
    return int(out.stdout)


@glibc
def test_a_big_tensor_comes_from_the_heap_once_freed_memory_is_kept() -> None:
    size = 20 << 20
    assert mapped_bytes("default", size) >= size  # glibc's default: a mapping of its own, unmapped on free
    assert mapped_bytes("keep", size) == 0  # kept: from the heap, reused by the next forward
    assert mapped_bytes("keep", MMAP_THRESHOLD_MAX + (1 << 20)) > MMAP_THRESHOLD_MAX  # past the cap: mapped


@glibc
def test_keep_freed_memory_reports_success_on_glibc() -> None:
    assert ctypes.util.find_library("c")
    assert keep_freed_memory() is True
