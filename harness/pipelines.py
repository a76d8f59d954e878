"""Tiny random-weight latent pipelines written with diffusers' save_pretrained, and a real CLIP tokenizer, offline.

Each builder writes the folder layout of a real checkpoint (model_index.json, one subfolder a component, safetensors)
for Stable Diffusion 1.x, Stable Diffusion 3 without T5, or DiT, seeded, in about a second on a CPU; 32x32 pixels
by default, through a VAE of factor 4 (8x8 latents). The text encoders are tiny but keep CLIP's real vocabulary
(49408 tokens) and its real token ids, so that prompts are tokenised exactly as the released checkpoints do.

The tokenizer's BPE data comes from open_clip_torch (its bpe_simple_vocab_16e6.txt.gz, the file of openai/CLIP),
installed with --no-deps (its torchvision dependency would replace this project's torch): see the Makefile's
install recipe. Only the data file is read; open_clip itself is never imported.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import inspect
import json
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408  # CLIP's: 256 bytes, 256 bytes + </w>, 48894 merges, <|startoftext|>, <|endoftext|>
BOS_ID, EOS_ID = 49406, 49407
SAMPLE_SIZE = 8  # latents: 32x32 pixels through the factor-4 VAE below

# Stable Diffusion 1.x's scheduler settings (its scheduler_config.json); each scheduler class takes the keys it knows
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "trained_betas": None, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False,
    "skip_prk_steps": True,
}
# DiT's training schedule: DDPM's linear betas over 1000 steps, epsilon (the transformer also predicts the variance)
DIT_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
    "prediction_type": "epsilon",
}
DIT_CLASSES = {0: "tench, Tinca tinca", 1: "goldfish", 2: "great white shark, white shark", 3: "cat"}


def bpe_path() -> Path:
    """open_clip's copy of CLIP's BPE merges; found without importing open_clip (which needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip_torch is not installed: pip install --no-deps open_clip_torch "
                                  "(make install does this)")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: open_clip_torch without its BPE file")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """openai/CLIP's simple_tokenizer: a printable character for each byte (GPT-2's byte-level alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@cache
def _bpe_tables() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary (token -> id) and merges, built as openai/CLIP's SimpleTokenizer builds them."""
    lines = gzip.open(bpe_path()).read().decode("utf-8").split("\n")
    merges = tuple((a, b) for a, b in (line.split() for line in lines[1:49152 - 256 - 2 + 1]))
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), "<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == VOCAB_SIZE == len(set(tokens)), len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def write_bpe_files(folder: Path) -> tuple[Path, Path]:
    """CLIP's vocab.json and merges.txt in folder, in the format of the released checkpoints' tokenizer folders."""
    vocab, merges = _bpe_tables()
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_file, merges_file


def clip_tokenizer(max_length: int = 77, *, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """CLIP's real tokenizer (49408 tokens), e.g. "a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407].

    pad_token: "<|endoftext|>" as in SD 1.x's and SD3's first tokenizer; SD3's tokenizer_2 (CLIP-G) pads with "!".
    The vocab and merges go in as file paths, positionally: transformers 5 ignores vocab_file=/merges_file=.
    """
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_bpe_files(Path(tmp))
        return CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=max_length)


def _hub_layout(pipeline_folder: Path, *tokenizers: str) -> None:
    """Tokenizer folders as the released checkpoints ship them (vocab.json, merges.txt, tokenizer_config.json, no
    tokenizer.json), so that loading them builds the tokenizer from its files as it does for a real checkpoint."""
    for name in tokenizers:
        folder = pipeline_folder / name
        (folder / "tokenizer.json").unlink(missing_ok=True)
        write_bpe_files(folder)


def _clip_config(hidden: int, *, projection: int | None = None, act: str = "quick_gelu") -> CLIPTextConfig:
    """A tiny CLIP text encoder with CLIP's vocabulary, token ids and 77 positions."""
    return CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
                          projection_dim=projection or hidden, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                          pad_token_id=1)


def _vae(latent_channels: int, **config: Any) -> AutoencoderKL:
    """A factor-4 VAE (three levels): 32x32 pixels <-> 8x8 latents."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                         block_out_channels=[8, 16, 16], layers_per_block=1, norm_num_groups=4,
                         sample_size=SAMPLE_SIZE * 4, **config)


def scheduler_class(name: str) -> type:
    """diffusers' scheduler class from "DDIM", "PNDM", "EulerDiscrete", ... or its full name."""
    cls = getattr(diffusers, name if name.endswith("Scheduler") else f"{name}Scheduler", None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"no diffusers scheduler {name!r}")
    return cls


def _scheduler(name: str, config: dict[str, Any]) -> Any:
    cls = scheduler_class(name)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in config.items() if k in accepted})


def tiny_sd(root: Path, prediction_type: str = "epsilon", scheduler: str = "DDIM", fp16_variant: bool = False,
            seed: int = 0) -> Path:
    """A Stable Diffusion 1.x folder (StableDiffusionPipeline): UNet2DConditionModel, AutoencoderKL, CLIPTextModel
    and CLIP's tokenizer, no safety checker; the scheduler class named (SD 1.5 ships "PNDM") with SD 1.5's settings
    and the prediction type given ("epsilon" as SD 1.5, "v_prediction" as SD 2.x-v). fp16_variant also writes
    *.fp16.safetensors beside the float32 weights (from_pretrained(..., variant="fp16"))."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=SAMPLE_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=32, attention_head_dim=2)
    vae = _vae(4, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(_clip_config(32))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer(), unet=unet,
        scheduler=_scheduler(scheduler, {**SD15_SCHEDULER, "prediction_type": prediction_type}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if fp16_variant:  # first: the last save writes the configs, whose dtype transformers 5 loads by default
        copy.deepcopy(pipe).to(torch.float16).save_pretrained(root, safe_serialization=True, variant="fp16")
    pipe.save_pretrained(root, safe_serialization=True)
    _hub_layout(Path(root), "tokenizer")
    return Path(root)


def tiny_sd3(root: Path, seed: int = 0) -> Path:
    """A Stable Diffusion 3 folder without T5 (StableDiffusion3Pipeline with text_encoder_3=None, tokenizer_3=None,
    as released checkpoints are loaded without it): SD3Transformer2DModel (16 latent channels, patch 2),
    AutoencoderKL with SD3's scaling and shift factors, two CLIPTextModelWithProjection of different widths
    (32 and 48, as CLIP-L and CLIP-G differ: pooled 80 = 32 + 48) with CLIP's tokenizer (the second pads with "!"
    as SD3's tokenizer_2 does), FlowMatchEulerDiscreteScheduler(shift=3.0). joint_attention_dim 96 > 32 + 48, so
    the CLIP embeddings are zero-padded to it, as 768 + 1280 are to T5's 4096 in SD3."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=SAMPLE_SIZE, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=96, pooled_projection_dim=80)
    vae = _vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    text_encoder = CLIPTextModelWithProjection(_clip_config(32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(48, act="gelu"))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer(), text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=clip_tokenizer(pad_token="!"), text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(root, safe_serialization=True)
    _hub_layout(Path(root), "tokenizer", "tokenizer_2")
    return Path(root)


def tiny_dit(root: Path, seed: int = 0, id2label: dict[int, str] | None = None) -> Path:
    """A DiT folder (DiTPipeline): DiTTransformer2DModel with learned sigma (out_channels = 2 x in_channels, as
    facebook/DiT-XL-2-256) and 1000 class embeddings plus the null class 1000 (DiTPipeline hard-codes 1000 for the
    unconditional half), AutoencoderKL, DDIMScheduler with DiT's linear betas, and id2label in model_index.json
    (ImageNet-style names, commas separating synonyms) for get_label_ids."""
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=SAMPLE_SIZE, patch_size=2, num_embeds_ada_norm=1000)
    labels = {int(k): v for k, v in (id2label or DIT_CLASSES).items()}
    pipe = DiTPipeline(transformer=transformer.eval(), vae=_vae(4, scaling_factor=0.18215),
                       scheduler=_scheduler("DDIM", DIT_SCHEDULER), id2label=labels)
    pipe.register_to_config(id2label={str(k): v for k, v in labels.items()})  # __init__ does not keep it
    pipe.save_pretrained(root, safe_serialization=True)
    return Path(root)
