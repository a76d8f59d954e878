"""The model store: folders in the diffusers DDPMPipeline layout, loaded unchanged.

Two layouts are accepted, as found on the Hub:
- nested: model_index.json, unet/config.json, unet/<weights>, scheduler/scheduler_config.json
- flat (google/ddpm-cifar10-32): config.json, <weights>, scheduler_config.json
Weights are diffusion_pytorch_model.safetensors; a pickled .bin loads only with allow_pickle.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from app.models.fast import Forward, bf16_supported
from app.sampling.schedules import ScheduleError, alphas_cumprod_from_config

log = logging.getLogger(__name__)

SAFETENSORS = "diffusion_pytorch_model.safetensors"
PICKLE = "diffusion_pytorch_model.bin"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Attention parameter names of checkpoints saved before diffusers 0.14 (google/ddpm-* among them).
_OLD_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


class ModelStoreError(ValueError):
    """A model folder that cannot be loaded; the message names the file and the problem."""


def pick_device(requested: str = "auto") -> torch.device:
    """cuda, then mps, then cpu -- or exactly what was requested."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelStoreError(f"{path}: missing file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelStoreError(f"{path}: bad JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelStoreError(f"{path}: bad JSON (expected an object)")
    return data


@dataclass(frozen=True)
class ModelFiles:
    """Where a model folder keeps its three parts."""

    root: Path
    unet_config: Path
    weights: Path
    scheduler_config: Path

    @classmethod
    def find(cls, root: Path, allow_pickle: bool = False) -> ModelFiles:
        nested = (root / "model_index.json").exists() or (root / "unet").is_dir()
        if nested:
            _read_json(root / "model_index.json")
            unet_dir, sched = root / "unet", root / "scheduler" / "scheduler_config.json"
        else:
            unet_dir, sched = root, root / "scheduler_config.json"
        weights = unet_dir / SAFETENSORS
        if not weights.is_file():
            if (unet_dir / PICKLE).is_file():
                if not allow_pickle:
                    raise ModelStoreError(
                        f"{unet_dir / PICKLE}: pickled weights can run arbitrary code; convert them to "
                        f"{SAFETENSORS} or set DDIM_ALLOW_PICKLE=1 if you trust this file")
                weights = unet_dir / PICKLE
            else:
                raise ModelStoreError(f"{weights}: missing file")
        return cls(root, unet_dir / "config.json", weights, sched)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelStoreError(f"{path}: cannot read weights ({e})") from e
    renamed = {}
    for k, v in state.items():
        for old, new in _OLD_ATTENTION.items():
            k = k.replace(old, new)
        renamed[k] = v
    return renamed


@dataclass
class LoadedModel:
    """An eps-network on its device, with its alpha-bar table and sampling defaults."""

    name: str
    unet: UNet2DModel
    scheduler_config: dict[str, Any]
    alphas_cumprod: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    path: Path
    channels_last: bool = False

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet.config.in_channels), int(h), int(w))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def clip_sample(self) -> bool:
        return bool(self.scheduler_config.get("clip_sample", True))

    @property
    def beta_schedule(self) -> str:
        if self.scheduler_config.get("trained_betas") is not None:
            return "trained_betas"
        return str(self.scheduler_config.get("beta_schedule", "linear"))

    def __post_init__(self) -> None:
        self.forward = Forward(self.unet, self.device, self.dtype, channels_last=self.channels_last)

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network output (eps, x0 or v, as prediction_type says) in float32, on the model's device."""
        return self.forward(x, t)

    def info(self) -> dict[str, Any]:
        c, h, w = self.sample_shape
        return {"name": self.name, "image_size": [h, w], "channels": c,
                "num_train_timesteps": self.num_train_timesteps, "beta_schedule": self.beta_schedule,
                "prediction_type": self.prediction_type, "clip_sample": self.clip_sample,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "channels_last": self.forward.channels_last,
                "parameters": sum(p.numel() for p in self.unet.parameters())}


def load_model(root: Path, *, device: torch.device | str = "cpu", dtype: str = "float32",
               allow_pickle: bool = False, name: str | None = None, channels_last: bool = False) -> LoadedModel:
    """Load one model folder; every failure is a ModelStoreError naming the file.

    dtype "auto" is bfloat16 where it pays off (see fast.bf16_supported), else float32.
    """
    dev = torch.device(device)
    if dtype == "auto":
        dtype = "bfloat16" if bf16_supported(dev) else "float32"
    if dtype not in DTYPES:
        raise ModelStoreError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not root.is_dir():
        raise ModelStoreError(f"{root}: missing folder")
    files = ModelFiles.find(root, allow_pickle)
    config = _read_json(files.unet_config)
    sched = _read_json(files.scheduler_config)
    try:
        alphas_cumprod = alphas_cumprod_from_config(sched)
    except (ScheduleError, TypeError, ValueError) as e:
        raise ModelStoreError(f"{files.scheduler_config}: {e}") from e
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "sample", "v_prediction"):
        raise ModelStoreError(f"{files.scheduler_config}: unknown prediction_type {prediction!r}")
    try:
        unet = UNet2DModel.from_config(config)
    except Exception as e:
        raise ModelStoreError(f"{files.unet_config}: not a UNet2DModel config ({e})") from e
    try:
        unet.load_state_dict(_load_state_dict(files.weights), strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[:4]
        raise ModelStoreError(f"{files.weights}: weights do not fit {files.unet_config}: "
                              + " ".join(s.strip() for s in first)) from e
    unet = unet.to(dev).eval().requires_grad_(False)
    if dtype != "float32":
        # diffusers' ModelMixin.to warns on every dtype cast that modules "should be kept in float32", even when the
        # list of such modules is empty (UNet2DModel's is): cast as torch does unless the model names some
        keep = getattr(unet, "_keep_in_fp32_modules", None) or []
        unet = unet.to(DTYPES[dtype]) if keep else torch.nn.Module.to(unet, DTYPES[dtype])
    return LoadedModel(name or root.name, unet, sched, alphas_cumprod.to(dev), dev, DTYPES[dtype], root,
                       channels_last=channels_last)


def discover(store: Path) -> list[str]:
    """Names of the model folders in a store (folders holding a config), sorted."""
    if not store.is_dir():
        raise ModelStoreError(f"{store}: model store folder does not exist")
    names = [p.name for p in sorted(store.iterdir())
             if p.is_dir() and not p.name.startswith(".")
             and any((p / f).exists() for f in ("model_index.json", "config.json", "unet"))]
    return names
