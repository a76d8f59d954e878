"""The peer: diffusers' DDIMPipeline, offline, as its users run it."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from app.models import load_model


def ddim_pipeline(folder: Path, batch: int, steps: int) -> float:
    """image-steps/s of DDIMPipeline (fp32, eta = 0) with the same UNet, S and batch, after a 2-step warm-up."""
    from diffusers import DDIMPipeline, DDIMScheduler

    m = load_model(folder)
    pipe = DDIMPipeline(unet=m.unet, scheduler=DDIMScheduler.from_config(m.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=batch, num_inference_steps=2, output_type="np")
    start = time.perf_counter()
    with torch.inference_mode():
        pipe(batch_size=batch, num_inference_steps=steps, output_type="np", eta=0.0)
    return batch * steps / (time.perf_counter() - start)
