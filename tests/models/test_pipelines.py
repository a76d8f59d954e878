"""Latent pipeline folders load as parts (app/models/pipelines.py): a denoiser with one forward(x, t, cond), the VAE
as codec, and a conditioner whose encodings equal diffusers' encode_prompt; configs fixed up as diffusers' pipelines
fix them; fp16 variants read for a 16-bit dtype; an unsupported component refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusion3Pipeline, StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from app.config import Settings
from app.engine.client import Engine
from app.metrics import Metrics
from app.models import UnsupportedModel, check_folder, load_model
from tests.conftest import needs_open_clip


@pytest.mark.parametrize(("name", "conditioning", "kind", "prediction", "guidance", "channels"), [
    ("sd", "text", "vp", "epsilon", 7.5, 4), ("sd-v", "text", "vp", "v_prediction", 7.5, 4),
    ("sd3", "text", "flow", "flow", 7.0, 16), ("dit", "class", "vp", "epsilon", 4.0, 4)])
def test_each_pipeline_loads_as_parts(pipeline_store: Path, name: str, conditioning: str, kind: str,
                                      prediction: str, guidance: float, channels: int) -> None:
    model = load_model(pipeline_store / name)
    assert (model.conditioning, model.kind, model.prediction_type) == (conditioning, kind, prediction)
    assert (model.default_guidance, model.sample_shape, model.image_size) == (guidance, (channels, 8, 8), (32, 32))
    assert model.codec is not None and model.codec.factor == 4 and not model.clip_sample
    x, t = torch.randn(3, channels, 8, 8), torch.full((3,), 500.0)
    out = model.eps(x, t, model.null_cond(3))
    assert out.shape == x.shape and out.dtype == torch.float32  # DiT: its learned-sigma channels dropped
    if name != "dit":
        assert model.latent_shape(48, 40) == (channels, 10, 12)
    else:
        assert model.null_class == 1000 and model.class_names[3] == "cat" and len(model.class_names) == 1000
        with pytest.raises(ValueError, match="width"):
            model.latent_shape(48, None)


def test_stable_diffusion_fixups(tmp_path: Path, pipeline_store: Path) -> None:
    """As StableDiffusionPipeline's __init__: steps_offset 1 and clip_sample False; a PNDM config supplies the
    path (its betas), sampled with DDIM from the leading timesteps + 1 to alpha-bar_0 (set_alpha_to_one False)."""
    root = tmp_path / "sd-pndm"
    shutil.copytree(pipeline_store / "sd", root)
    path = root / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "_class_name": "PNDMScheduler", "steps_offset": 0, "clip_sample": True}))
    model = load_model(root)
    assert model.scheduler_config["steps_offset"] == 1 and not model.clip_sample
    plan = model.plan(4, model.spacings[0], "generate")
    assert plan.model_t.tolist() == [751, 501, 251, 1]
    assert model.alphas_cumprod is not None
    assert float(plan.a[-1]) == pytest.approx(float(model.alphas_cumprod[0].double().sqrt()), rel=1e-12)
    assert "PNDMScheduler config supplies the path only" in model.info()["scheduler"]


def test_prompts_encode_as_diffusers_encodes_them(pipeline_store: Path) -> None:
    sd = load_model(pipeline_store / "sd")
    assert sd.conditioner is not None
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_store / "sd")
    want, _ = pipe.encode_prompt(["a photo of a cat", "cat " * 100], "cpu", 1, False)
    got = sd.conditioner.encode(["a photo of a cat", "cat " * 100])
    torch.testing.assert_close(got.cond["encoder_hidden_states"], want, rtol=1e-5, atol=1e-6)
    assert sd.conditioner.truncated("cat " * 100) and not sd.conditioner.truncated("a photo of a cat")
    again = sd.conditioner.encode(["a photo of a cat"])
    assert (again.hits, again.misses) == (1, 0)  # the cache, keyed by text

    sd3 = load_model(pipeline_store / "sd3")
    assert sd3.conditioner is not None
    pipe3 = StableDiffusion3Pipeline.from_pretrained(pipeline_store / "sd3", text_encoder_3=None, tokenizer_3=None)
    embeds, _, pooled, _ = pipe3.encode_prompt("a cat", None, None, device="cpu", do_classifier_free_guidance=False)
    cond = sd3.conditioner.encode(["a cat"]).cond
    assert cond["encoder_hidden_states"].shape == (1, 77 + 256, 96) and cond["pooled_projections"].shape == (1, 80)
    assert not cond["encoder_hidden_states"][:, 77:].any()  # no T5: zeros, as diffusers
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=1e-5, atol=1e-6)


def test_the_codec_is_the_vae_with_its_factors(pipeline_store: Path) -> None:
    model = load_model(pipeline_store / "sd3")
    assert model.codec is not None
    vae = AutoencoderKL.from_pretrained(pipeline_store / "sd3" / "vae")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    z = model.codec.encode(images)
    with torch.no_grad():
        want = (vae.encode(images).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        torch.testing.assert_close(z, want)
        torch.testing.assert_close(model.codec.decode(z), vae.decode(z / vae.config.scaling_factor
                                                                     + vae.config.shift_factor).sample)


def test_a_16bit_server_reads_the_fp16_variant(tmp_path: Path) -> None:
    needs_open_clip()
    from harness.pipelines import tiny_sd

    root = tiny_sd(tmp_path / "sd16", fp16_variant=True)
    weights = root / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    state = load_file(weights)
    key = next(iter(state))
    state[key] = torch.full_like(state[key], 0.25)  # marks the variant file
    save_file(state, weights)
    model = load_model(root, dtype="bfloat16")
    assert dict(model.unet.named_parameters())[key].flatten()[0].item() == 0.25
    assert model.unet.dtype == torch.bfloat16
    assert model.codec is not None and model.codec.vae.dtype == torch.float32  # force_upcast
    assert float(load_model(root).unet.state_dict()[key].flatten()[0]) != 0.25  # float32 reads the full file


def test_an_unsupported_component_is_refused_in_one_line_and_the_others_serve(tmp_path: Path,
                                                                              pipeline_store: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(pipeline_store / "dit", store / "dit")
    shutil.copytree(pipeline_store / "sd", store / "odd")
    index = json.loads((store / "odd" / "model_index.json").read_text())
    (store / "odd" / "model_index.json").write_text(json.dumps({**index, "text_encoder": ["transformers",
                                                                                         "T5EncoderModel"]}))
    with pytest.raises(UnsupportedModel, match=r"text_encoder class 'T5EncoderModel' is not supported in a "
                                               r"StableDiffusionPipeline; supported: CLIPTextModel$"):
        check_folder(store / "odd")
    engine = Engine(Settings(model_store=store, dtype="float32", channels_last=False, warmup=False), Metrics())
    engine.load()
    try:
        assert list(engine.models) == ["dit"] and "\n" not in engine.failed["odd"]
    finally:
        engine.stop()
