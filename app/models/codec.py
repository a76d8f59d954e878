"""The codec between pixels and the stepper's space: an AutoencoderKL, as diffusers' latent pipelines use it.

encode: z = (mean of the posterior - shift_factor) * scaling_factor; decode: vae.decode(z / scaling_factor +
shift_factor). shift_factor is SD3's (None, i.e. 0, for Stable Diffusion 1.x/2.x and DiT). Images are [-1, 1].
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from app.models.trace import Traced


class LatentCodec:
    """An AutoencoderKL on its device, float32 where its config says force_upcast and the server runs 16-bit.
    Its decoder runs traced per latent size (app.models.trace) unless trace is off."""

    def __init__(self, vae: AutoencoderKL, device: torch.device, dtype: torch.dtype, trace: bool = True,
                 name: str = "") -> None:
        self.vae, self.device, self.dtype = vae, device, dtype
        self._decode = Traced(vae, _decode, f"model {name} (VAE decoder)") if trace else \
            lambda z: _decode(vae, z)
        config = vae.config
        self.factor = 2 ** (len(config.block_out_channels) - 1)
        self.channels = int(config.latent_channels)
        self.image_channels = int(config.in_channels)
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(config.get("shift_factor") or 0.0)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [n, 3, H, W] in [-1, 1] -> latents [n, C, H / f, W / f] (float32, on the model's device)."""
        with torch.inference_mode():
            posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
            return ((posterior.mean.float() - self.shift_factor) * self.scaling_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [n, C, h, w] -> images [n, 3, h f, w f] in [-1, 1] (not clamped; float32, on the CPU)."""
        z = latents.to(self.device, torch.float32) / self.scaling_factor
        if self.shift_factor:
            z = z + self.shift_factor
        with torch.inference_mode():
            return self._decode(z.to(self.dtype)).float().cpu()


def _decode(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    return vae.decode(z).sample
