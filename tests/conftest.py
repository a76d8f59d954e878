"""Shared fixtures: tiny random UNet2DModels in temporary model stores; the dataset marker."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from app.models.folder import random_model_folder
from app.train.data import FASHION_MNIST_DIR

torch.set_num_threads(1)  # tiny models gain nothing from threads; keeps runs steady on 2 cores

TINY_UNET = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
    "layers_per_block": 1, "norm_num_groups": 4,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}
TINY_RGB_UNET = {**TINY_UNET, "in_channels": 3, "out_channels": 3}
LINEAR_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001,
                    "beta_end": 0.02, "clip_sample": False, "prediction_type": "epsilon"}


@pytest.fixture(scope="session", autouse=True)
def layout_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The layout choices of this test session (servers and CLI runs inherit it), never the user's own cache."""
    path = tmp_path_factory.mktemp("cache") / "layouts.json"
    os.environ["DDIM_LAYOUT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store with 'tiny' (1 channel, nested layout) and 'tiny-rgb' (3 channels, flat layout)."""
    store = tmp_path_factory.mktemp("model_store")
    random_model_folder(store / "tiny", TINY_UNET, LINEAR_SCHEDULER, seed=0)
    random_model_folder(store / "tiny-rgb", TINY_RGB_UNET, {**LINEAR_SCHEDULER, "clip_sample": True},
                        seed=1, layout="flat")
    return store


DATASETS = {"fashion-mnist": FASHION_MNIST_DIR}


def pytest_runtest_setup(item: pytest.Item) -> None:
    """@pytest.mark.dataset("fashion-mnist"): a test that reads the data set skips where it is missing, with the
    reason, so that `make test` passes on a fresh machine; DDIM_REQUIRE_DATASETS=1 (CI) makes that a failure."""
    for mark in item.iter_markers("dataset"):
        folder = DATASETS[mark.args[0]]
        if not folder.is_dir() or not any(folder.iterdir()):
            reason = (f"data set {mark.args[0]} not found in {folder}: apt-get install dataset-{mark.args[0]} "
                      "(Debian/Ubuntu), or set DDIM_FASHION_MNIST_DIR")
            if os.environ.get("DDIM_REQUIRE_DATASETS") == "1":
                pytest.fail(f"DDIM_REQUIRE_DATASETS=1 but the {reason}", pytrace=False)
            pytest.skip(reason)


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


def pipeline_configs(root: Path, cls: str, components: dict[str, tuple[str, str]]) -> Path:
    """A pipeline folder of configs only, as diffusers lays one out (no weights: nothing may be read)."""
    def write(path: Path, data: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))

    write(root / "model_index.json", {"_class_name": cls, "_diffusers_version": "0.42.1",
                                      **{slot: list(spec) for slot, spec in components.items()}})
    for slot, (_, klass) in components.items():
        write(root / slot / ("scheduler_config.json" if slot == "scheduler" else "config.json"), {"_class_name": klass})
    return root


FAILED = ("kandinsky", "sd-configs", "truncated")


@pytest.fixture(scope="session")
def mixed_store(tmp_path_factory: pytest.TempPathFactory, tiny_store: Path, cond_store: Path) -> Path:
    """tiny (healthy), tiny-cond (healthy, conditional), an SD-layout folder of configs only, a pipeline class that
    is not supported, and a copy of tiny whose weights file is cut short."""
    store = tmp_path_factory.mktemp("mixed_store")
    shutil.copytree(tiny_store / "tiny", store / "tiny")
    shutil.copytree(cond_store / "tiny-cond", store / "tiny-cond")
    pipeline_configs(store / "sd-configs", "StableDiffusionPipeline",
              {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
               "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
               "scheduler": ("diffusers", "PNDMScheduler")})
    pipeline_configs(store / "kandinsky", "KandinskyV22Pipeline",
              {"unet": ("diffusers", "UNet2DConditionModel"), "scheduler": ("diffusers", "DDPMScheduler")})
    shutil.copytree(tiny_store / "tiny", store / "truncated")
    weights = store / "truncated" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return store


def needs_open_clip() -> None:
    """CLIP's tokenizer is built from open_clip_torch's BPE file (harness/pipelines.py): skip where it is missing,
    unless DDIM_REQUIRE_OPEN_CLIP=1 (CI), which fails instead."""
    import importlib.util

    if importlib.util.find_spec("open_clip") is not None:
        return
    reason = "open_clip_torch is not installed: pip install --no-deps open_clip_torch (make install does this)"
    if os.environ.get("DDIM_REQUIRE_OPEN_CLIP") == "1":
        pytest.fail(f"DDIM_REQUIRE_OPEN_CLIP=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pipeline_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random-weight latent pipelines written by diffusers' save_pretrained (harness/pipelines.py), 32x32
    pixels through a factor-4 VAE: 'sd' (StableDiffusionPipeline, epsilon, DDIM config), 'sd-v' (v_prediction,
    DDIM config), 'sd3' (StableDiffusion3Pipeline without T5, FlowMatch shift 3) and 'dit' (DiTPipeline)."""
    needs_open_clip()
    from harness.pipelines import tiny_dit, tiny_sd, tiny_sd3

    store = tmp_path_factory.mktemp("pipeline_store")
    tiny_sd(store / "sd", seed=0)
    tiny_sd(store / "sd-v", prediction_type="v_prediction", seed=1)
    tiny_sd3(store / "sd3", seed=2)
    tiny_dit(store / "dit", seed=3)
    return store
