"""Writing model folders in the diffusers layout (training export, tests, benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

DIFFUSERS_VERSION = "0.42.1"
# google/ddpm-cifar10-32's published UNet config (35.7 M parameters).
DDPM_CIFAR10_UNET: dict[str, Any] = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "act_fn": "silu", "attention_head_dim": None, "center_input_sample": False, "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-06,
    "norm_num_groups": 32, "time_embedding_type": "positional",
}
DDPM_CIFAR10_SCHEDULER: dict[str, Any] = {
    "_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_small",
}


def write_model_folder(root: Path, unet: UNet2DModel, scheduler_config: dict[str, Any],
                       layout: str = "nested", class_names: list[str] | None = None) -> Path:
    """Save unet (safetensors) and its scheduler config as a diffusers pipeline folder.

    The scheduler's _class_name defaults to DDPMScheduler. class_names (nested layout only) go into
    model_index.json as id2label, the key diffusers' DiTPipeline uses for a class-conditional model.
    """
    root.mkdir(parents=True, exist_ok=True)
    sched = {"_class_name": "DDPMScheduler", **scheduler_config, "_diffusers_version": DIFFUSERS_VERSION}
    if layout == "flat":
        unet.save_pretrained(root, safe_serialization=True)
        (root / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
        return root
    unet.save_pretrained(root / "unet", safe_serialization=True)
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    index: dict[str, Any] = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                             "scheduler": ["diffusers", sched["_class_name"]], "unet": ["diffusers", "UNet2DModel"]}
    if class_names:
        index["id2label"] = {str(i): name for i, name in enumerate(class_names)}
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return root


def random_model_folder(root: Path, unet_config: dict[str, Any], scheduler_config: dict[str, Any],
                        seed: int = 0, layout: str = "nested", class_names: list[str] | None = None) -> Path:
    """A model folder with randomly initialised weights (no download needed)."""
    torch.manual_seed(seed)
    unet = UNet2DModel(**unet_config)
    return write_model_folder(root, unet, scheduler_config, layout, class_names)
