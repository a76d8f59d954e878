"""Reading a diffusers pipeline folder (StableDiffusionPipeline, StableDiffusion3Pipeline, DiTPipeline) into parts.

Each component loads with its own class's from_pretrained from its subfolder (local files only): the denoiser and
text encoders in the server's dtype, the VAE in float32 where its config says force_upcast and the server runs 16-bit.
Where a component ships *.fp16.safetensors, a 16-bit server reads those. The scheduler config only supplies the path
(betas, prediction type, spacing, offset, or the flow shift) after the fix-ups diffusers' pipelines apply at load:
sampling is always our stepper. The folder's classes were checked (kinds.check_folder) before this runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from transformers import (
    AutoTokenizer,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5EncoderModel,
)

from app.models.codec import LatentCodec
from app.models.conditioning import TextConditioner
from app.models.denoiser import CALLS, Denoiser, Parts
from app.models.kinds import FolderCheck, ModelStoreError, read_json

log = logging.getLogger(__name__)
NETWORKS: dict[str, Any] = {"UNet2DConditionModel": UNet2DConditionModel,
                            "SD3Transformer2DModel": SD3Transformer2DModel,
                            "DiTTransformer2DModel": DiTTransformer2DModel}
ENCODERS: dict[str, Any] = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
                            "T5EncoderModel": T5EncoderModel}
GUIDANCE = {"StableDiffusionPipeline": 7.5, "StableDiffusion3Pipeline": 7.0, "DiTPipeline": 4.0}  # their __call__'s
HALF = (torch.float16, torch.bfloat16)


def _variant(folder: Path, dtype: torch.dtype) -> str | None:
    return "fp16" if dtype in HALF and any(folder.glob("*.fp16.safetensors")) else None


def _load(cls: Any, folder: Path, dtype: torch.dtype, allow_pickle: bool, transformers: bool = False) -> Any:
    """One component from its subfolder, local files only; a failure is one ModelStoreError naming the folder."""
    kwargs: dict[str, Any] = {"variant": _variant(folder, dtype), "use_safetensors": None if allow_pickle else True,
                              "local_files_only": True, ("dtype" if transformers else "torch_dtype"): dtype}
    if not transformers:
        kwargs["low_cpu_mem_usage"] = False  # no accelerate here: say so once, not per component
    try:
        return cls.from_pretrained(str(folder), **kwargs).eval().requires_grad_(False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelStoreError(f"{folder}: cannot load the {cls.__name__} ({first})") from e


def _tokenizer(folder: Path) -> Any:
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ModelStoreError(f"{folder}: cannot load the tokenizer ({e})") from e


def fix_scheduler(pipeline: str, config: dict[str, Any]) -> dict[str, Any]:
    """The fix-ups diffusers' pipelines apply to a scheduler config at load: StableDiffusionPipeline sets
    steps_offset=1 and clip_sample=False; latent pipelines never clip."""
    out = dict(config)
    if pipeline == "StableDiffusionPipeline" and out.get("steps_offset", 0) != 1:
        log.info("scheduler steps_offset %s -> 1, as StableDiffusionPipeline sets it", out.get("steps_offset", 0))
        out["steps_offset"] = 1
    out["clip_sample"] = False
    return out


def load_parts(check: FolderCheck, device: torch.device, dtype: torch.dtype, allow_pickle: bool,
               cache_size: int = 256,
               trace: bool = True) -> tuple[torch.nn.Module, Parts, dict[str, Any], tuple[str, ...]]:
    """(the denoiser network, the parts, the fixed-up scheduler config, class names) of a pipeline folder."""
    root, kind = check.root, check.kind
    assert kind is not None
    slot = "unet" if "unet" in check.classes else "transformer"
    net_class = check.classes[slot]
    net = _load(NETWORKS[net_class], root / slot, dtype, allow_pickle).to(device)
    vae_config = read_json(root / "vae" / "config.json")
    vae_dtype = torch.float32 if dtype in HALF and vae_config.get("force_upcast", True) else dtype
    vae = _load(AutoencoderKL, root / "vae", vae_dtype, allow_pickle).to(device)
    codec = LatentCodec(vae, device, vae_dtype, trace, root.name)
    sched = fix_scheduler(kind.name, read_json(root / "scheduler" / "scheduler_config.json"))
    channels = int(net.config.in_channels)
    parts = Parts(kind.name, Denoiser(net, CALLS[net_class], device, dtype, channels, trace, root.name), codec, "none",
                  guidance_scale=GUIDANCE[kind.name], patch=int(net.config.get("patch_size") or 1),
                  scheduler_class=str(sched.get("_class_name", "")))
    names: tuple[str, ...] = ()
    if kind.name == "DiTPipeline":
        n = int(net.config.num_embeds_ada_norm)
        labels = read_json(root / "model_index.json").get("id2label") or {}
        names = tuple(str(labels.get(str(i), i)) for i in range(n))
        parts.conditioning, parts.null_class = "class", n  # DiTPipeline's null class: the table's last row
        parts.null_cond = {"class_labels": torch.tensor([n])}
    else:
        encoders = [(_tokenizer(root / f"tokenizer{s}"),
                     _load(ENCODERS[check.classes[f"text_encoder{s}"]], root / f"text_encoder{s}", dtype,
                           allow_pickle, transformers=True).to(device))
                    for s in (("",) if kind.name == "StableDiffusionPipeline" else ("", "_2"))]
        t5 = None
        if "text_encoder_3" in check.classes:
            t5 = (_tokenizer(root / "tokenizer_3"),
                  _load(T5EncoderModel, root / "text_encoder_3", dtype, allow_pickle, transformers=True).to(device))
        joint = int(net.config.joint_attention_dim) if slot == "transformer" else None
        parts.conditioner = TextConditioner("sd" if joint is None else "sd3", encoders, device=device,
                                            joint_dim=joint, t5=t5, cache_size=cache_size)
        parts.conditioning = "text"
        parts.null_cond = parts.conditioner.encode([""]).cond
    return net, parts, sched, names
