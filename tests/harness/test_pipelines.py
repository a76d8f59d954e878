"""harness.pipelines: CLIP's real tokenizer built offline, and tiny SD 1.x, SD3 (no T5) and DiT folders that
diffusers' own pipeline classes load with from_pretrained and run.

The CLIP tokenizer's BPE file comes from open_clip_torch, which make install installs with --no-deps; where it is
missing (a hand-made install) the tests that need it skip, unless DDIM_REQUIRE_OPEN_CLIP=1 (CI), which fails them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, PNDMScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline
from safetensors.torch import load_file

from harness.pipelines import VOCAB_SIZE, clip_tokenizer, tiny_dit, tiny_sd, tiny_sd3

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat", as openai/CLIP tokenises it


@pytest.fixture(autouse=True)
def needs_open_clip(request: pytest.FixtureRequest) -> None:
    """Every test here but DiT's needs CLIP's BPE file, from open_clip_torch."""
    if "dit" in request.node.name or importlib.util.find_spec("open_clip") is not None:
        return
    reason = "open_clip_torch is not installed: pip install --no-deps open_clip_torch (make install does this)"
    if os.environ.get("DDIM_REQUIRE_OPEN_CLIP") == "1":
        pytest.fail(f"DDIM_REQUIRE_OPEN_CLIP=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def generate(pipe: object, *args: object, **kwargs: object) -> np.ndarray:
    images = pipe(*args, num_inference_steps=2, output_type="np",  # type: ignore[operator]
                  generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    return np.asarray(images)


def test_clip_tokenizer_is_clips() -> None:
    tok = clip_tokenizer()
    assert tok("a photo of a cat").input_ids == CAT_IDS
    assert len(tok) == VOCAB_SIZE and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    padded = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert padded == CAT_IDS + [49407] * 70
    long = tok("cat " * 100, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407
    assert clip_tokenizer(pad_token="!").pad_token_id == 0  # SD3's tokenizer_2
    assert clip_tokenizer(max_length=16).model_max_length == 16


@pytest.mark.parametrize(("prediction_type", "scheduler", "cls"),
                         [("epsilon", "PNDM", PNDMScheduler), ("v_prediction", "DDIM", DDIMScheduler)])
def test_sd_folder_loads_and_generates(tmp_path: Path, prediction_type: str, scheduler: str, cls: type) -> None:
    folder = tiny_sd(tmp_path / "sd", prediction_type=prediction_type, scheduler=scheduler)
    assert sorted(p.name for p in (folder / "tokenizer").iterdir()) == [
        "merges.txt", "tokenizer_config.json", "vocab.json"]  # as the released checkpoints ship it
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.fp16.*"))
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert type(pipe.scheduler) is cls and pipe.safety_checker is None and pipe.feature_extractor is None
    config = pipe.scheduler.config
    assert (config.prediction_type, config.steps_offset, config.beta_schedule) == (prediction_type, 1, "scaled_linear")
    assert (config.beta_start, config.beta_end) == (0.00085, 0.012)
    assert pipe.tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert pipe.text_encoder.config.vocab_size == VOCAB_SIZE
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 8
    images = generate(pipe, ["a photo of a cat", "a dog"])
    assert images.shape == (2, 32, 32, 3)
    assert not np.allclose(images[0], images[1])


def test_sd_fp16_variant(tmp_path: Path) -> None:
    folder = tiny_sd(tmp_path / "sd", fp16_variant=True)
    for name in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        full, half = load_file(folder / f"{name}.safetensors"), load_file(folder / f"{name}.fp16.safetensors")
        assert full.keys() == half.keys()
        assert all(full[k].dtype == torch.float32 and half[k].dtype == torch.float16 for k in full)
        assert all(torch.equal(full[k].half(), half[k]) for k in full), name  # the same weights, halved
    # the configs are float32's: a plain load (transformers reads the dtype from config.json) stays float32
    plain = StableDiffusionPipeline.from_pretrained(folder)
    assert plain.unet.dtype == plain.vae.dtype == plain.text_encoder.dtype == torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(folder, variant="fp16", dtype=torch.float16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16
    assert torch.equal(pipe.unet.conv_in.weight, plain.unet.conv_in.weight.half())


def test_sd3_folder_without_t5(tmp_path: Path) -> None:
    folder = tiny_sd3(tmp_path / "sd3")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    assert not (folder / "text_encoder_3").exists()
    # diffusers 0.42 does not treat the null entries as optional: the caller has to pass them as None
    with pytest.raises(ValueError, match="text_encoder_3"):
        StableDiffusion3Pipeline.from_pretrained(folder)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert pipe.tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert pipe.scheduler.config.shift == 3.0
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    embeds, _, pooled, _ = pipe.encode_prompt("a photo of a cat", None, None, do_classifier_free_guidance=False)
    assert embeds.shape == (1, 77 + 256, 96) and pooled.shape == (1, 32 + 48)
    assert not embeds[:, 77:].any() and not embeds[:, :77, 80:].any()  # T5's zeros; CLIP's 80 padded to 96
    images = generate(pipe, "a photo of a cat")
    assert images.shape == (1, 32, 32, 3)


def test_dit_folder_loads_and_generates(tmp_path: Path) -> None:
    folder = tiny_dit(tmp_path / "dit")
    assert json.loads((folder / "model_index.json").read_text())["id2label"]["2"] == "great white shark, white shark"
    pipe = DiTPipeline.from_pretrained(folder)
    assert pipe.get_label_ids(["white shark", "cat", "goldfish"]) == [2, 3, 1]
    config = pipe.transformer.config
    assert config.out_channels == 2 * config.in_channels and config.num_embeds_ada_norm == 1000  # learned sigma
    assert type(pipe.scheduler) is DDIMScheduler and pipe.scheduler.config.beta_schedule == "linear"
    images = generate(pipe, [2, 3])
    assert images.shape == (2, 32, 32, 3)
    assert not np.allclose(images[0], images[1])


def test_dit_builder_is_seeded(tmp_path: Path) -> None:
    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b = tiny_dit(tmp_path / "a"), tiny_dit(tmp_path / "b")
    c = tiny_dit(tmp_path / "c", seed=1)
    assert (a / weights).read_bytes() == (b / weights).read_bytes() != (c / weights).read_bytes()
