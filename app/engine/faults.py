"""Telling faults apart, so that each fails only what it touched: an out-of-memory forward is retried in halves,
a forward that raises fails its rows, a row whose update is not finite fails its request."""

from __future__ import annotations

import torch

from app.models.memory import free_cached, is_out_of_memory

__all__ = ["free_cached", "is_out_of_memory", "nonfinite_rows"]


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows of x holding NaN or inf, or None when every row is finite (one reduction, the rows
    sought only when it finds one)."""
    if bool(torch.isfinite(x).all()):
        return None
    return (~torch.isfinite(x.flatten(1)).all(1)).nonzero().squeeze(1)
