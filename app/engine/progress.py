"""Progress of the jobs in a batch: after each step, how far each job's slowest stepped sample is, with previews."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from app.engine.batch import ActiveBatch
from app.engine.jobs import SampleJob

log = logging.getLogger(__name__)


def report_progress(b: ActiveBatch, idx: torch.Tensor | None, x0: torch.Tensor,
                    decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Tell each stepped job that wants progress how many steps its slowest stepped sample has done, with
    its x0 predictions every preview_every steps (x0 [B, width] flattened rows; decoded into images where the
    model has a codec)."""
    rows = b.rows if idx is None else [b.rows[i] for i in idx.tolist()]
    if not any(r.job.on_progress is not None for r in rows):
        return
    pos = (b.pos if idx is None else b.pos.index_select(0, idx)).tolist()
    done: dict[SampleJob, int] = {}
    at: dict[SampleJob, list[int]] = {}
    for k, (r, p) in enumerate(zip(rows, pos)):
        if r.job.on_progress is not None:
            done[r.job] = min(done.get(r.job, p + 1), p + 1)
            at.setdefault(r.job, []).append(k)
    for job, steps in done.items():
        if steps <= job.reported:
            continue
        job.reported = steps
        every = job.preview_every
        preview = None
        if every and (steps % every == 0 or steps == job.steps):
            shape = tuple(job.x.shape[1:])
            preview = x0[at[job], :job.x[0].numel()].float().reshape(-1, *shape)
            preview = (preview if decode is None else decode(preview)).cpu()
        try:
            job.on_progress(steps, preview)  # type: ignore[misc]
        except Exception:  # a listener's failure is not the step's
            log.exception("progress listener failed for job %d", job.id)
