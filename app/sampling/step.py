"""The generalized DDIM step (Song et al. 2021, Eq. 12 with Eq. 16) on any Gaussian path, and its inversion.

Every path is x_t = a_t x0 + s_t eps (app/sampling/paths.py). Every function takes per-sample [B]
tensors, so one batch can mix levels, eta, variance kinds, prediction types, path kinds and
directions. Shapes: x and model_output [B, C, H, W].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from app.sampling.schedules import alpha_at

PredictionType = Literal["epsilon", "sample", "v_prediction", "flow"]
# flow: a rectified-flow velocity v = eps - x0 (diffusers' FlowMatchEulerDiscreteScheduler models)
PREDICTION_TYPES: tuple[PredictionType, ...] = get_args(PredictionType)
VP_PREDICTION_TYPES: tuple[PredictionType, ...] = ("epsilon", "sample", "v_prediction")  # what a DDPM config may say


@dataclass(frozen=True)
class StepOutput:
    """x_{t'} and the x0 predicted on the way there."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


@dataclass(frozen=True)
class StepCoefficients:
    """Per-sample [B] coefficients of one step from level (a, s) to (a_next, s_next):
    x' = a_next x0 + c_eps eps + noise_std z, c_eps = sqrt(s_next^2 - sigma^2). Built by step_coefficients;
    float64 (float32 on MPS)."""

    a: torch.Tensor
    s: torch.Tensor
    a_next: torch.Tensor
    c_eps: torch.Tensor
    sigma: torch.Tensor
    noise_std: torch.Tensor


def coefficient_dtype(device: torch.device) -> torch.dtype:
    """Per-sample coefficients are float64, but on MPS, which has no float64 (float32 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


def precise(v: torch.Tensor) -> torch.Tensor:
    """v in the coefficient dtype of its device."""
    return v.to(coefficient_dtype(v.device))


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def prediction_codes(prediction_type: str | list[str], batch: int) -> torch.Tensor:
    """Per-sample integer codes for prediction types (index into PREDICTION_TYPES)."""
    names = [prediction_type] * batch if isinstance(prediction_type, str) else list(prediction_type)
    for n in names:
        if n not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {n!r}; supported: {', '.join(PREDICTION_TYPES)}")
    return torch.tensor([PREDICTION_TYPES.index(n) for n in names], dtype=torch.long)


def predict_x0_eps(
    x: torch.Tensor,
    model_output: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    prediction_type: str | torch.Tensor = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from the network output at level x = a x0 + s eps.

    epsilon: x0 = (x - s eps) / a                  (Eq. 12's "predicted x0")
    sample:  eps = (x - a x0) / s
    v:       x0 = a x - s v,  eps = a v + s x      (VP, a^2 + s^2 = 1)
    flow:    x0 = x - s v,    eps = x + a v        (v = eps - x0, a + s = 1)
    A tensor prediction_type holds per-sample codes from prediction_codes().
    """
    a, s, out = _bcast(a, x), _bcast(s, x), model_output
    forms = {
        "epsilon": lambda: ((x - s * out) / a, out),
        "sample": lambda: (out, (x - a * out) / s),
        "v_prediction": lambda: (a * x - s * out, a * out + s * x),
        "flow": lambda: (x - s * out, x + a * out),
    }
    if isinstance(prediction_type, str):
        if prediction_type not in forms:
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        return forms[prediction_type]()
    code = _bcast(prediction_type, x).long()
    x0, eps = out, out
    for i, name in enumerate(PREDICTION_TYPES):
        if bool((prediction_type == i).any()):
            px0, peps = forms[name]()
            x0, eps = torch.where(code == i, px0, x0), torch.where(code == i, peps, eps)
    return x0, eps


def sigma_eta(a: torch.Tensor, s: torch.Tensor, a_next: torch.Tensor, s_next: torch.Tensor,
              eta: torch.Tensor) -> torch.Tensor:
    """sigma_eta = eta s' sqrt(1 - SNR_t / SNR_t'), SNR = a^2 / s^2: Eq. 16 on VP, for any Gaussian path.

    Zero where eta = 0, and where the target is the clean end (s' = 0) or x is clean (inversion's start).
    """
    ratio = (a * s_next) ** 2 / ((s * a_next) ** 2).clamp(min=torch.finfo(a.dtype).tiny)
    sigma = eta * s_next * (1 - ratio).clamp(min=0).sqrt()
    return torch.where((eta > 0) & (s > 0) & (s_next > 0), sigma, torch.zeros_like(sigma))


def ddim_sigma(alpha: torch.Tensor, alpha_prev: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """Eq. 16 on VP in alpha-bar terms: sigma_eta of the levels (sqrt(alpha-bar), sqrt(1 - alpha-bar))."""
    return sigma_eta(alpha.sqrt(), (1 - alpha).sqrt(), alpha_prev.sqrt(), (1 - alpha_prev).sqrt(), eta)


def step_coefficients(a: torch.Tensor, s: torch.Tensor, a_next: torch.Tensor, s_next: torch.Tensor,
                      eta: torch.Tensor, large: torch.Tensor | None = None) -> StepCoefficients:
    """The generalized step's coefficients per sample (Eq. 12 with Eq. 16).

    large=True is the paper's sigma-hat row (DDPM's fixed_large, VP only): the mean keeps eta = 1's
    coefficients, the noise uses sigma-hat = sqrt(1 - alpha-bar_t / alpha-bar_t'), and the last step adds none.
    """
    a, s, a_next, s_next, eta = (precise(v) for v in (a, s, a_next, s_next, eta.to(a.device)))
    large = torch.zeros_like(eta, dtype=torch.bool) if large is None else large.to(a.device).bool()
    sigma = sigma_eta(a, s, a_next, s_next, torch.where(large, torch.ones_like(eta), eta))
    sigma_hat = (1 - (a / a_next) ** 2).clamp(min=0).sqrt()
    noise_std = torch.where(large & (s_next > 0), sigma_hat, sigma)
    # float64: s'^2 - sigma^2 cancels badly in float32 near the clean end
    return StepCoefficients(a, s, a_next, (s_next**2 - sigma**2).clamp(min=0).sqrt(), sigma, noise_std)


def take_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    coef: StepCoefficients,
    *,
    prediction_type: str | torch.Tensor = "epsilon",
    clip_denoised: bool | torch.Tensor = False,
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """x_next = a' x0 + sqrt(s'^2 - sigma^2) eps + noise_std z   (Eq. 12, any Gaussian path).

    Clipping x0 to [-1, 1] re-derives eps from the clipped x0, as DDPM's posterior mean does.
    """
    x0, eps = predict_x0_eps(x, model_output, coef.a, coef.s, prediction_type)
    clip = clip_denoised if isinstance(clip_denoised, torch.Tensor) else torch.tensor(clip_denoised)
    if bool(clip.any()):
        clipped = x0.clamp(-1, 1)
        eps_clipped = (x - _bcast(coef.a, x) * clipped) / _bcast(coef.s, x)
        c = _bcast(clip, x).bool()
        x0, eps = torch.where(c, clipped, x0), torch.where(c, eps_clipped, eps)
    prev = _bcast(coef.a_next, x) * x0 + _bcast(coef.c_eps, x) * eps
    if noise is not None:
        prev = prev + _bcast(coef.noise_std, x) * noise.to(x)
    return StepOutput(prev_sample=prev, pred_original_sample=x0)


def generalized_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    alpha: torch.Tensor,
    alpha_next: torch.Tensor,
    eta: torch.Tensor,
    *,
    large: torch.Tensor | None = None,
    prediction_type: str | torch.Tensor = "epsilon",
    clip_denoised: bool | torch.Tensor = False,
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """One VP step between alpha-bar levels per sample (alpha-bar = 1 is the clean end), either direction."""
    a, s = precise(alpha).sqrt(), (1 - precise(alpha)).clamp(min=0).sqrt()
    an, sn = precise(alpha_next).sqrt(), (1 - precise(alpha_next)).clamp(min=0).sqrt()
    return take_step(x, model_output, step_coefficients(a, s, an, sn, eta, large),
                     prediction_type=prediction_type, clip_denoised=clip_denoised, noise=noise)


def ddim_step(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    eta: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    large: torch.Tensor | None = None,
    prediction_type: str | torch.Tensor = "epsilon",
    clip_denoised: bool | torch.Tensor = False,
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """One VP generation step x_t -> x_{t'} per sample; t_prev < 0 means alpha-bar = 1 (the end)."""
    return generalized_step(x_t, model_output, alpha_at(alphas_cumprod, t), alpha_at(alphas_cumprod, t_prev),
                            eta, large=large, prediction_type=prediction_type, clip_denoised=clip_denoised,
                            noise=noise)


def invert_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    t_from: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    prediction_type: str | torch.Tensor = "epsilon",
) -> StepOutput:
    """One DDIM inversion step x_{t_from} -> x_t (t ascending, eta = 0), the Euler step of Eq. 14.

    model_output is eps_theta(x_{t_from}, t): the network sees the target timestep, as in
    diffusers' DDIMInverseScheduler; t_from < 0 means x is the clean image (alpha-bar = 1).
    """
    return generalized_step(x, model_output, alpha_at(alphas_cumprod, t_from), alpha_at(alphas_cumprod, t),
                            torch.zeros(len(t)), prediction_type=prediction_type)


def guide(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance in the model's prediction space: uncond + w (cond - uncond)."""
    w = _bcast(w, cond) if isinstance(w, torch.Tensor) else w
    return uncond + w * (cond - uncond)


def slerp(x0: torch.Tensor, x1: torch.Tensor, a: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (DDIM paper, Eq. 67): sin((1-a)th)/sin th x0 + sin(a th)/sin th x1.

    Falls back to lerp when the two are (nearly) parallel.
    """
    a = torch.as_tensor(a, dtype=torch.float64)
    v0, v1 = x0.double().flatten(), x1.double().flatten()
    cos = torch.dot(v0, v1) / (v0.norm() * v1.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    if float(theta.sin().abs()) < 1e-6:
        return lerp(x0, x1, a)
    out = (torch.sin((1 - a) * theta) * x0.double() + torch.sin(a * theta) * x1.double()) / theta.sin()
    return out.to(x0.dtype)


def lerp(x0: torch.Tensor, x1: torch.Tensor, a: float | torch.Tensor) -> torch.Tensor:
    """Linear interpolation (1 - a) x0 + a x1."""
    a = torch.as_tensor(a, dtype=torch.float64)
    return ((1 - a) * x0.double() + a * x1.double()).to(x0.dtype)
