"""Shared fixtures: tiny random UNet2DModels in temporary model stores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.models.folder import random_model_folder

torch.set_num_threads(1)  # tiny models gain nothing from threads; keeps runs steady on 2 cores

TINY_UNET = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
    "layers_per_block": 1, "norm_num_groups": 4,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}
TINY_RGB_UNET = {**TINY_UNET, "in_channels": 3, "out_channels": 3}
LINEAR_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001,
                    "beta_end": 0.02, "clip_sample": False, "prediction_type": "epsilon"}


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store with 'tiny' (1 channel, nested layout) and 'tiny-rgb' (3 channels, flat layout)."""
    store = tmp_path_factory.mktemp("model_store")
    random_model_folder(store / "tiny", TINY_UNET, LINEAR_SCHEDULER, seed=0)
    random_model_folder(store / "tiny-rgb", TINY_RGB_UNET, {**LINEAR_SCHEDULER, "clip_sample": True},
                        seed=1, layout="flat")
    return store


FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
TINY_CLASSES = ["cat", "dog", "ankle boot"]


@pytest.fixture(scope="session")
def cond_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of class-conditional models, 'tiny-flow' (rectified flow, shift 3) and 'tiny-cond' (VP, eps), each
    with three named classes plus the null label, and an unconditional flow model, 'tiny-plain-flow'."""
    store = tmp_path_factory.mktemp("cond_store")
    unet = {**TINY_UNET, "num_class_embeds": len(TINY_CLASSES) + 1}
    random_model_folder(store / "tiny-flow", unet, FLOW_SCHEDULER, seed=2, class_names=TINY_CLASSES)
    random_model_folder(store / "tiny-cond", unet, LINEAR_SCHEDULER, seed=3, class_names=TINY_CLASSES)
    random_model_folder(store / "tiny-plain-flow", TINY_UNET, FLOW_SCHEDULER, seed=4)
    return store
