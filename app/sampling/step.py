"""The generalized DDIM step (Song et al. 2021, Eq. 12) and the DDIM inversion step.

Every function takes per-sample [B] tensors, so one batch can mix timesteps, eta, variance
kinds, prediction types and directions. Shapes: x and model_output [B, C, H, W].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.sampling.schedules import alpha_at

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "sample", "v_prediction")


@dataclass(frozen=True)
class StepOutput:
    """x_{t'} and the x0 predicted on the way there."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def precise(v: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficients in float64 (float32 on MPS, which has no float64)."""
    return v.float() if v.device.type == "mps" else v.double()


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
    alpha: torch.Tensor,
    prediction_type: str | torch.Tensor = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from the network output at the noise level alpha-bar of x.

    epsilon: x0 = (x - sqrt(1 - a) eps) / sqrt(a)       (Eq. 12's "predicted x0")
    sample:  eps = (x - sqrt(a) x0) / sqrt(1 - a)
    v:       x0 = sqrt(a) x - sqrt(1 - a) v,  eps = sqrt(a) v + sqrt(1 - a) x
    A tensor prediction_type holds per-sample codes from prediction_codes().
    """
    a = _bcast(alpha, x)
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    if isinstance(prediction_type, str):
        if prediction_type == "epsilon":
            return (x - s1a * model_output) / sa, model_output
        if prediction_type == "sample":
            return model_output, (x - sa * model_output) / s1a
        if prediction_type == "v_prediction":
            return sa * x - s1a * model_output, sa * model_output + s1a * x
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    code = _bcast(prediction_type, x).long()
    x0 = torch.where(code == 0, (x - s1a * model_output) / sa,
                     torch.where(code == 1, model_output, sa * x - s1a * model_output))
    eps = torch.where(code == 0, model_output,
                      torch.where(code == 1, (x - sa * model_output) / s1a, sa * model_output + s1a * x))
    return x0, eps


def ddim_sigma(alpha: torch.Tensor, alpha_prev: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """sigma_t(eta) = eta sqrt((1 - a_{t'}) / (1 - a_t)) sqrt(1 - a_t / a_{t'})   (Eq. 16).

    Zero where eta = 0, also on rows that start from the clean end (alpha = 1, inversion).
    """
    sigma = eta * ((1 - alpha_prev) / (1 - alpha)).sqrt() * (1 - alpha / alpha_prev).clamp(min=0).sqrt()
    return torch.where(eta > 0, sigma, torch.zeros_like(sigma))


def generalized_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    alpha: torch.Tensor,
    alpha_next: torch.Tensor,
    sigma: torch.Tensor,
    noise_std: torch.Tensor,
    *,
    prediction_type: str | torch.Tensor = "epsilon",
    clip_denoised: bool | torch.Tensor = False,
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """x_next = sqrt(a_next) x0 + sqrt(1 - a_next - sigma^2) eps + noise_std z   (Eq. 12).

    alpha is alpha-bar at x's level, alpha_next the target level. sigma sets the direction term
    (Eq. 16); noise_std is sigma itself, or the "large" sigma-hat. Clipping x0 to [-1, 1]
    re-derives eps from the clipped x0, as DDPM's posterior mean does.
    """
    x0, eps = predict_x0_eps(x, model_output, alpha, prediction_type)
    clip = clip_denoised if isinstance(clip_denoised, torch.Tensor) else torch.tensor(clip_denoised)
    if bool(clip.any()):
        a = _bcast(alpha, x)
        clipped = x0.clamp(-1, 1)
        eps_clipped = (x - a.sqrt() * clipped) / (1 - a).sqrt()
        c = _bcast(clip, x).bool()
        x0, eps = torch.where(c, clipped, x0), torch.where(c, eps_clipped, eps)
    # per-sample coefficients in float64: 1 - a' - sigma^2 cancels badly in float32 near t = 0
    a_next, s = precise(alpha_next), precise(sigma)
    c_x0, c_eps = _bcast(a_next.sqrt(), x), _bcast((1 - a_next - s**2).clamp(min=0).sqrt(), x)
    prev = c_x0 * x0 + c_eps * eps
    if noise is not None:
        prev = prev + _bcast(noise_std, x) * noise.to(x)
    return StepOutput(prev_sample=prev, pred_original_sample=x0)


def step_sigmas(
    alpha: torch.Tensor, alpha_prev: torch.Tensor, eta: torch.Tensor, large: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma for the direction term, std of the added noise) per sample.

    large=True is the paper's sigma-hat row (DDPM's fixed_large): the mean keeps eta = 1's
    coefficients, the noise uses sigma-hat = sqrt(1 - a_t / a_{t'}), and the last step adds none.
    """
    large = large.to(alpha.device).bool()
    sigma = ddim_sigma(alpha, alpha_prev, torch.where(large, torch.ones_like(eta), eta))
    sigma_hat = (1 - alpha / alpha_prev).clamp(min=0).sqrt()
    last = alpha_prev >= 1
    noise_std = torch.where(large & ~last, sigma_hat, sigma)
    return sigma, noise_std


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
    """One generation step x_t -> x_{t'} per sample; t_prev < 0 means alpha-bar = 1 (the end)."""
    alpha = precise(alpha_at(alphas_cumprod, t))
    alpha_prev = precise(alpha_at(alphas_cumprod, t_prev))
    eta = eta.to(alpha)
    large = torch.zeros_like(eta, dtype=torch.bool) if large is None else large
    sigma, noise_std = step_sigmas(alpha, alpha_prev, eta, large)
    return generalized_step(x_t, model_output, alpha, alpha_prev, sigma, noise_std,
                            prediction_type=prediction_type, clip_denoised=clip_denoised, noise=noise)


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
    alpha, alpha_next = precise(alpha_at(alphas_cumprod, t_from)), precise(alpha_at(alphas_cumprod, t))
    zero = torch.zeros_like(alpha)
    return generalized_step(x, model_output, alpha, alpha_next, zero, zero,
                            prediction_type=prediction_type)


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
