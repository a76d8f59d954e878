"""The model store: both Hub layouts load; every broken folder names its file and problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file

from app.models import ModelStoreError, discover, load_model, pick_device
from app.models.folder import random_model_folder
from tests.conftest import LINEAR_SCHEDULER, TINY_UNET


@pytest.fixture
def folder(tmp_path: Path, tiny_store: Path) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(tiny_store / "tiny", dst)
    return dst


def test_both_layouts_load_and_match_diffusers(tiny_store: Path) -> None:
    assert discover(tiny_store) == ["tiny", "tiny-rgb"]
    nested, flat = load_model(tiny_store / "tiny"), load_model(tiny_store / "tiny-rgb")
    assert nested.sample_shape == (1, 8, 8) and flat.sample_shape == (3, 8, 8)
    assert flat.clip_sample and not nested.clip_sample
    ref = UNet2DModel.from_pretrained(tiny_store / "tiny", subfolder="unet").eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 900])
    with torch.no_grad():
        torch.testing.assert_close(nested.eps(x, t), ref(x, t).sample)
    info = nested.info()
    assert info["num_train_timesteps"] == 1000 and info["beta_schedule"] == "linear"
    assert info["prediction_type"] == "epsilon" and info["device"] == "cpu" and info["dtype"] == "float32"


def test_plans_are_made_once_and_equal_fresh_ones(tiny_store: Path) -> None:
    """A request's plan comes from the model's cache: the same object for the same (S, spacing, direction), equal to
    one made afresh, distinct for another direction; a bad spacing is refused before the cache."""
    from app.models.store import PLANS_KEPT
    from app.sampling import ScheduleError

    m = load_model(tiny_store / "tiny")
    gen, inv = m.plan(20, "uniform", "generate"), m.plan(20, "uniform", "invert")
    assert m.plan(20, "uniform", "generate") is gen and gen is not inv
    for cached, direction in ((gen, "generate"), (inv, "invert")):
        fresh = m._make_plan(20, "uniform", direction)  # type: ignore[arg-type]
        for field in ("a", "s", "model_t"):
            torch.testing.assert_close(getattr(cached, field), getattr(fresh, field), rtol=0, atol=0)
    with pytest.raises(ScheduleError):
        m.plan(20, "nope", "generate")
    for steps in range(1, PLANS_KEPT + 2):  # bounded: past PLANS_KEPT it starts afresh
        m.plan(steps, "uniform", "generate")
    assert 1 <= len(m._plans) <= PLANS_KEPT
    again = m.plan(20, "uniform", "generate")  # made afresh after the clear, cached again, equal to the first
    assert again is not gen and m.plan(20, "uniform", "generate") is again
    torch.testing.assert_close(again.a, gen.a, rtol=0, atol=0)


def test_dtype_and_device_settings(tiny_store: Path) -> None:
    m = load_model(tiny_store / "tiny", dtype="bfloat16", device=pick_device("cpu"))
    assert next(m.unet.parameters()).dtype == torch.bfloat16
    assert m.eps(torch.randn(1, 1, 8, 8), torch.tensor([5])).dtype == torch.float32
    assert pick_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(ModelStoreError, match="dtype 'float8'"):
        load_model(tiny_store / "tiny", dtype="float8")


def test_old_attention_names_load(tmp_path: Path, folder: Path) -> None:
    """Checkpoints saved before diffusers 0.14 (google/ddpm-*) name attention query/key/value/proj_attn."""
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
           .replace(".to_out.0.", ".proj_attn."): v for k, v in state.items()}
    assert old.keys() != state.keys()
    save_file(old, str(weights))
    m = load_model(folder)
    torch.testing.assert_close(m.unet.state_dict()["mid_block.attentions.0.to_q.weight"],
                               state["mid_block.attentions.0.to_q.weight"])


def _break(folder: Path, case: str) -> tuple[str, str]:
    unet = folder / "unet"
    if case == "missing model_index":
        (folder / "model_index.json").unlink()
        return "model_index.json", "missing file"
    if case == "missing unet config":
        (unet / "config.json").unlink()
        return "unet/config.json", "missing file"
    if case == "missing weights":
        (unet / "diffusion_pytorch_model.safetensors").unlink()
        return "unet/diffusion_pytorch_model.safetensors", "missing file"
    if case == "missing scheduler":
        (folder / "scheduler" / "scheduler_config.json").unlink()
        return "scheduler/scheduler_config.json", "missing file"
    if case == "bad json":
        (unet / "config.json").write_text('{"sample_size": 8,')
        return "unet/config.json", "bad JSON"
    if case == "bad model_index json":
        (folder / "model_index.json").write_text("[1, 2")
        return "model_index.json", "bad JSON"
    if case == "unknown beta schedule":
        cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "beta_schedule": "cosine"}))
        return "scheduler/scheduler_config.json", "unknown beta_schedule 'cosine'"
    if case == "weights do not fit":
        cfg = json.loads((unet / "config.json").read_text())
        (unet / "config.json").write_text(json.dumps({**cfg, "block_out_channels": [16, 32]}))
        return "unet/diffusion_pytorch_model.safetensors", "weights do not fit"
    if case == "corrupt weights":
        (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
        return "unet/diffusion_pytorch_model.safetensors", "cannot read weights"
    if case == "unknown prediction type":
        cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "prediction_type": "x"}))
        return "scheduler/scheduler_config.json", "unknown prediction_type"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing model_index", "missing unet config", "missing weights", "missing scheduler",
                                  "bad json",
                                  "bad model_index json", "unknown beta schedule", "weights do not fit",
                                  "corrupt weights", "unknown prediction type"])
def test_broken_folders_name_file_and_problem(folder: Path, case: str) -> None:
    path, problem = _break(folder, case)
    with pytest.raises(ModelStoreError) as err:
        load_model(folder)
    assert str(folder / path) in str(err.value)
    assert problem in str(err.value)


def test_pickled_weights_need_explicit_trust(tmp_path: Path) -> None:
    root = random_model_folder(tmp_path / "pickled", TINY_UNET, LINEAR_SCHEDULER, layout="flat")
    st = root / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(st)), root / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(ModelStoreError, match=r"diffusion_pytorch_model\.bin: pickled weights.*DDIM_ALLOW_PICKLE"):
        load_model(root)
    assert load_model(root, allow_pickle=True).sample_shape == (1, 8, 8)


def test_missing_store_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="model store folder does not exist"):
        discover(tmp_path / "nope")
    with pytest.raises(ModelStoreError, match="missing folder"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert discover(tmp_path) == []
