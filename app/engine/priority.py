"""Short jobs first: which active rows the next forward steps, and which waiting samples may pass a full batch.

On a compute-bound device a forward costs about as much per sample at batch 16 as at 64, so a short
request that shares every forward with long ones waits as long as they make it. While the batch
holds jobs of very different lengths (S more than SHORT_RATIO times the shortest S), only the
short class is stepped; the long rows keep their place and state, and get one forward of their
own at least every max_defer_steps forwards, so they are never starved. Batches of similar jobs
(the common case) are always stepped whole. No forward is larger than max_batch_size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from app.engine.batch import Row

SHORT_RATIO = 4  # jobs with S above this many times the shortest S in the batch wait for the short ones


@dataclass
class ShortFirst:
    max_batch_size: int
    max_defer_steps: int = 32
    deferred: int = 0  # forwards in a row that skipped the long rows

    def rows_to_step(self, n_steps: torch.Tensor) -> torch.Tensor | None:
        """Indices of the rows to step (None: all), given each active row's S."""
        if len(n_steps) < 2:
            return None
        short = n_steps <= SHORT_RATIO * n_steps.min()
        if bool(short.all()):
            self.deferred = 0
            if len(n_steps) <= self.max_batch_size:
                return None
            return torch.arange(self.max_batch_size, device=n_steps.device)
        if self.deferred >= self.max_defer_steps:
            self.deferred = 0
            return (~short).nonzero().squeeze(1)[:self.max_batch_size]
        self.deferred += 1
        return short.nonzero().squeeze(1)[:self.max_batch_size]

    def overtakers(self, waiting: Iterable[Row], active: int, longest: int) -> list[Row]:
        """With the batch full (active rows, the longest of S longest): the waiting samples of jobs far
        shorter than it, up to max_batch_size beyond the batch. They would be stepped alone anyway, so
        admitting them now costs the long rows nothing but the short ones' own forwards."""
        room = 2 * self.max_batch_size - active
        return [r for r in waiting if SHORT_RATIO * r.job.steps < longest][:max(0, room)]
