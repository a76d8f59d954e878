"""The store's checks of class names, before any weight is read (app/models/kinds.py), and its short errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.models import ModelStoreError, UnsupportedModel, check_folder, discover, load_model, supported
from tests.conftest import pipeline_configs


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_an_unsupported_pipeline_is_named_with_the_supported_list(tmp_path: Path) -> None:
    root = pipeline_configs(tmp_path / "kandinsky", "KandinskyV22Pipeline",
                     {"unet": ("diffusers", "UNet2DConditionModel"), "scheduler": ("diffusers", "DDPMScheduler")})
    with pytest.raises(UnsupportedModel) as e:
        check_folder(root)
    message = str(e.value)
    assert "KandinskyV22Pipeline" in message and "DDPMPipeline" in message and "\n" not in message
    assert message.endswith(supported())


def test_an_unsupported_network_in_a_known_pipeline_is_refused_before_its_weights(tmp_path: Path) -> None:
    root = pipeline_configs(tmp_path / "odd", "DDPMPipeline",
                     {"unet": ("diffusers", "UNet2DConditionModel"), "scheduler": ("diffusers", "DDIMScheduler")})
    with pytest.raises(UnsupportedModel, match="unet class 'UNet2DConditionModel' is not supported in a DDPMPipeline"):
        load_model(root)  # no weights file exists: the class check comes first


def test_a_component_config_that_disagrees_with_the_index_is_refused(tmp_path: Path) -> None:
    root = pipeline_configs(tmp_path / "mixed", "DDPMPipeline",
                     {"unet": ("diffusers", "UNet2DModel"), "scheduler": ("diffusers", "DDPMScheduler")})
    _write(root / "unet" / "config.json", {"_class_name": "DiTTransformer2DModel"})
    with pytest.raises(UnsupportedModel, match=r"unet/config.json: class 'DiTTransformer2DModel'"):
        check_folder(root)


def test_unused_components_are_ignored(tmp_path: Path, tiny_store: Path) -> None:
    root = tmp_path / "with-extras"
    shutil.copytree(tiny_store / "tiny", root)
    index = json.loads((root / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = [None, None]
    (root / "model_index.json").write_text(json.dumps(index))
    assert check_folder(root).ignored == ("safety_checker",)
    assert load_model(root).kind == "vp"


def test_a_store_pointed_at_a_pipeline_root_says_so(tmp_path: Path, tiny_store: Path) -> None:
    with pytest.raises(ModelStoreError, match="is itself a model folder"):
        discover(tiny_store / "tiny")


def test_a_transformers_component_is_not_taken_for_a_flat_folder(tmp_path: Path) -> None:
    _write(tmp_path / "text_encoder" / "config.json", {"architectures": ["CLIPTextModel"], "model_type": "clip"})
    with pytest.raises(UnsupportedModel, match="a transformers 'CLIPTextModel' config"):
        check_folder(tmp_path / "text_encoder")


def test_weights_that_do_not_fit_get_a_short_error(tmp_path: Path, tiny_store: Path) -> None:
    root = tmp_path / "broken"
    shutil.copytree(tiny_store / "tiny", root)
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    kept = dict(list(state.items())[:3])  # drops all but three tensors
    kept["extra.weight"] = torch.zeros(2)
    save_file(kept, weights)
    with pytest.raises(ModelStoreError) as e:
        load_model(root)
    message = str(e.value)
    missing = len(state) - 3
    assert f"{missing} keys missing (" in message and f"and {missing - 3} more)" in message
    assert "1 key unexpected (extra.weight)" in message
    assert len(message) < 600 and "\n" not in message
