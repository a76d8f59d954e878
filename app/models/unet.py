"""A UNet2DModel folder's own files, in either layout: where its parts are, its weights fitted to its config, and
the names of its classes.

- nested: model_index.json, unet/config.json, unet/<weights>, scheduler/scheduler_config.json
- flat (google/ddpm-cifar10-32): config.json, <weights>, scheduler_config.json
Weights are diffusion_pytorch_model.safetensors; a pickled .bin loads only with allow_pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from app.models.kinds import ModelStoreError, read_json

SAFETENSORS = "diffusion_pytorch_model.safetensors"
PICKLE = "diffusion_pytorch_model.bin"
# Attention parameter names of checkpoints saved before diffusers 0.14 (google/ddpm-* among them).
_OLD_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


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
            read_json(root / "model_index.json")
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


def load_unet(files: ModelFiles) -> tuple[UNet2DModel, tuple[str, ...]]:
    """The network with its weights (on the CPU, float32), and its class names."""
    try:
        unet = UNet2DModel.from_config(read_json(files.unet_config))
    except ModelStoreError:
        raise
    except Exception as e:
        raise ModelStoreError(f"{files.unet_config}: not a UNet2DModel config ({e})") from e
    class_names = _class_names(unet, files)
    _fit(unet, _load_state_dict(files.weights), files)
    return unet, class_names


def _fit(unet: torch.nn.Module, state: dict[str, torch.Tensor], files: ModelFiles) -> None:
    """Load state into unet, or one short ModelStoreError: what is missing, unexpected or of another shape, with at
    most a few key names each."""
    want = unet.state_dict()
    problems = [_keys("missing", [k for k in want if k not in state]),
                _keys("unexpected", [k for k in state if k not in want]),
                _keys("of another shape", [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
                                           if k in state and state[k].shape != v.shape])]
    problems = [p for p in problems if p]
    if problems:
        raise ModelStoreError(f"{files.weights}: weights do not fit {files.unet_config}: {'; '.join(problems)}")
    unet.load_state_dict(state, strict=True)


def _keys(what: str, keys: list[str], shown: int = 3) -> str:
    """'12 keys missing (a, b, c and 9 more)', or '' for none."""
    if not keys:
        return ""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} key{'s' if len(keys) > 1 else ''} {what} ({', '.join(keys[:shown])}{more})"


def _class_names(unet: UNet2DModel, files: ModelFiles) -> tuple[str, ...]:
    """The names of a conditional model's classes (id2label of model_index.json), else their numbers."""
    cfg = unet.config
    if cfg.class_embed_type is not None:
        raise ModelStoreError(f"{files.unet_config}: class_embed_type {cfg.class_embed_type!r} is not supported "
                              "(class-conditional models use num_class_embeds)")
    if cfg.num_class_embeds is None:
        return ()
    n = int(cfg.num_class_embeds) - 1  # the last row is the null label
    if n < 1:
        raise ModelStoreError(f"{files.unet_config}: num_class_embeds must be at least 2 (classes + the null label)")
    index = files.root / "model_index.json"
    labels = read_json(index).get("id2label") if index.is_file() else None
    if labels is None:
        return tuple(str(i) for i in range(n))
    if not isinstance(labels, dict) or sorted(labels, key=str) != sorted(map(str, range(n)), key=str):
        raise ModelStoreError(f"{index}: id2label must map each class 0..{n - 1} to a name "
                              f"(num_class_embeds {n + 1} includes the null label {n})")
    names = tuple(str(labels[str(i)]) for i in range(n))
    if len({x.lower() for x in names}) != n:
        raise ModelStoreError(f"{index}: id2label names must be distinct")
    return names
