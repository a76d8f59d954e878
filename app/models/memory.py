"""Out-of-memory errors, told apart from other failures (the engine retries a forward in halves on one; a trace
that hits one is not given up for good)."""

from __future__ import annotations

import torch


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or an allocator's failure on another device."""
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def free_cached(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
