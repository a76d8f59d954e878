"""Startup tuning: what the process and each model's thread do before serving, apart from loading networks.

- tune_process: glibc malloc keeps freed memory (memory.py), once per process, before any model loads;
- layouts_for: the memory layout each model loads in, chosen once per model and machine (layout.py);
- warm_up: in the model's own thread, its torch threads, torch.compile within its budget, and warm-up forwards.

main.py and the CLI call tune_process; the engine calls layouts_for and warm_up as it loads each model.
"""

from __future__ import annotations

import logging
import time

import torch

from app.config import Settings
from app.models import LoadedModel
from app.startup.layout import layouts_for
from app.startup.memory import MMAP_THRESHOLD_MAX, keep_freed_memory

__all__ = ["layouts_for", "tune_process", "warm_up"]
log = logging.getLogger(__name__)


_tuned: list[bool] = []


def tune_process(settings: Settings) -> None:
    """Process-wide tuning, before any model loads (DDIM_KEEP_FREED_MEMORY); once per process."""
    if settings.keep_freed_memory and not _tuned and keep_freed_memory():
        _tuned.append(True)
        log.info("malloc keeps freed memory (mmap threshold %d MiB)", MMAP_THRESHOLD_MAX >> 20)


def warm_up(model: LoadedModel, settings: Settings, budget_from: float) -> None:
    """Threads, compiling and warm-up forwards, in the model's own thread (torch's thread settings are per thread
    under OpenMP: they are set where the forwards run)."""
    s = settings
    if s.threads:
        torch.set_num_threads(s.threads)
    if s.compile:
        budget = max(0.0, s.compile_budget_seconds - (time.monotonic() - budget_from))
        model.forward.compile(s.max_batch_size, budget, model.sample_shape)
    if s.warmup:
        for b in sorted({1, s.max_batch_size}):
            model.eps(torch.zeros(b, *model.sample_shape, device=model.device), torch.full((b,), 500.0),
                      model.null_cond(b))
        if model.codec is not None:  # a latent model's VAE decoder too (traced here, with DDIM_TRACE)
            model.codec.decode(torch.zeros(1, *model.sample_shape, device=model.device))
