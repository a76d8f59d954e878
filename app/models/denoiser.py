"""A pipeline's parts as the engine sees them: one forward(x, t, cond), an optional codec and conditioner.

Each network class of a registered pipeline has an adapter that calls it with the batch's per-row cond tensors:
- UNet2DConditionModel (Stable Diffusion 1.x/2.x): encoder_hidden_states;
- SD3Transformer2DModel: encoder_hidden_states and pooled_projections;
- DiTTransformer2DModel: class_labels; its learned-sigma channels are dropped, as DiTPipeline drops them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from app.models.codec import LatentCodec
from app.models.conditioning import Cond, TextConditioner
from app.models.trace import Traced

log = logging.getLogger(__name__)
Conditioning = Literal["none", "class", "text"]
Call = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Cond], torch.Tensor]


def _unet(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    return net(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample


def _sd3(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    return net(hidden_states=x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
               pooled_projections=cond["pooled_projections"]).sample


def _dit(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    return net(x, timestep=t, class_labels=cond["class_labels"]).sample


CALLS: dict[str, Call] = {"UNet2DConditionModel": _unet, "SD3Transformer2DModel": _sd3, "DiTTransformer2DModel": _dit}


class Denoiser:
    """forward(x, t, cond) -> the network's prediction [B, C, h, w] in float32 on its device; x, t and cond's rows
    may come in any dtype and device. Traced per input signature (app.models.trace) unless trace is off; neither
    compiled nor channels_last (the UNet2DModel path's Forward is)."""

    channels_last = False

    def __init__(self, net: torch.nn.Module, call: Call, device: torch.device, dtype: torch.dtype,
                 channels: int, trace: bool = True, name: str = "") -> None:
        self.net, self.call, self.device, self.dtype, self.channels = net, call, device, dtype, channels
        self.traced = Traced(net, lambda net, x, t, **cond: call(net, x, t, cond), f"model {name}") if trace else None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        x = x.to(self.device, self.dtype, non_blocking=True)
        t = t.to(self.device, non_blocking=True)
        rows = {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype, non_blocking=True)
                for k, v in (cond or {}).items()}
        with torch.inference_mode():
            out = self.call(self.net, x, t, rows) if self.traced is None else self.traced(x, t, **rows)
            return out[:, :self.channels].float()

    def compile(self, *args: object) -> list[int]:
        log.warning("torch.compile is not offered for pipeline denoisers yet; serving eagerly")
        return []

    def use_channels_last(self, on: bool) -> None:
        if on:
            log.warning("channels_last is not offered for pipeline denoisers; keeping the contiguous layout")


@dataclass
class Parts:
    """What a diffusers pipeline folder adds to its denoiser: its class, the codec between pixels and latents, how
    it is conditioned, and the defaults of its own __call__."""

    pipeline: str
    denoiser: Denoiser
    codec: LatentCodec | None
    conditioning: Conditioning
    conditioner: TextConditioner | None = None
    null_cond: Cond | None = None  # one row of the unconditional input, for warm-up
    guidance_scale: float = 1.0
    patch: int = 1  # the denoiser's patch size: sizes are multiples of codec factor x patch
    null_class: int | None = None
    scheduler_class: str = ""
