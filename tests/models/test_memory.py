"""DDIM_KEEP_FREED_MEMORY: a forward-like loop of big allocations stops faulting its pages in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from app.models import memory

# Each "step" allocates 4 blocks of 8 MiB and frees them all, as a forward does with its activations.
PROBE = """
import resource, sys, torch
from app.models.memory import keep_freed_memory

if sys.argv[1] == "keep":
    assert keep_freed_memory()

def step():
    blocks = [torch.ones(8 << 20, dtype=torch.uint8) for _ in range(4)]
    del blocks

step(); step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def page_faults(mode: str) -> int:
    """Minor page faults of 10 steps in a fresh process (the setting is process-wide)."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_memory_is_reused_instead_of_faulted_in_every_step() -> None:
    pages = 10 * 4 * (8 << 20) // 4096
    assert page_faults("default") > pages // 2  # glibc's defaults: most of each step's memory is new pages
    assert page_faults("keep") < pages // 100  # kept: the same pages, step after step


def test_without_glibc_it_reports_false(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc(name: object) -> None:
        raise OSError("no C library here")

    monkeypatch.setattr(memory.ctypes, "CDLL", no_libc)
    assert memory.keep_freed_memory() is False
