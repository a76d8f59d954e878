"""The peer: diffusers' DDIMPipeline, offline, as its users run it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from app.models import load_model


def ddim_pipeline(folder: Path, batch: int, steps: int) -> Callable[[object], float]:
    """Setup for benchmarks.isolated.Resident: DDIMPipeline (fp32) with the same UNet, warmed up with 2 steps;
    the measure is image-steps/s of one run at S = steps, eta = 0, with the same batch."""
    from diffusers import DDIMPipeline, DDIMScheduler

    m = load_model(folder)
    pipe = DDIMPipeline(unet=m.unet, scheduler=DDIMScheduler.from_config(m.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=batch, num_inference_steps=2, output_type="np")

    def run(_: object) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(batch_size=batch, num_inference_steps=steps, output_type="np", eta=0.0)
        return batch * steps / (time.perf_counter() - start)

    return run
