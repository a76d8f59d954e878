"""Our stepper against diffusers' schedulers on a tiny random UNet2DModel (max abs diff <= 1e-5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler

from app.models import LoadedModel, load_model
from app.sampling import ddim_step, draw, sample_generators, timestep_sequence
from app.sampling.loop import invert, sample

ATOL = 1e-5


class Model:
    """A tiny random UNet made to behave like a trained eps-model: eps = sqrt(1 - a_t) x_t + 0.1 unet(x_t, t).

    (The eps of data concentrated at 0, plus the network.) A raw random UNet drives x to |x| ~ 1e3,
    where float32 rounding alone exceeds 1e-5; this keeps x in the data range.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.alphas_cumprod = loaded.alphas_cumprod
        self.sample_shape = loaded.sample_shape

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * x + 0.1 * self.loaded.eps(x, t).to(x.dtype)


@pytest.fixture(scope="module")
def model(tiny_store: Path) -> Model:
    return Model(load_model(tiny_store / "tiny"))


def _diffusers_ddim(model: Model, x: torch.Tensor, S: int, eta: float, spacing: str, seed: int,
                    clip: bool, prediction_type: str = "epsilon") -> torch.Tensor:
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip,
                          set_alpha_to_one=True, timestep_spacing=spacing, prediction_type=prediction_type)
    sched.set_timesteps(S)
    gens = sample_generators(seed, x.shape[0])
    draw(gens, tuple(x.shape[1:]))  # x_T came first from these generators
    for t in sched.timesteps:
        out = model.eps(x, torch.full((x.shape[0],), int(t)))
        noise = draw(gens, tuple(x.shape[1:])) if eta > 0 else None
        x = sched.step(out, t, x, eta=eta, variance_noise=noise, use_clipped_model_output=True).prev_sample
    return x


@pytest.mark.parametrize("spacing,ours", [("leading", "uniform"), ("trailing", "trailing")])
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_matches_diffusers_ddim_scheduler(model: Model, spacing: str, ours: str, eta: float,
                                               clip: bool) -> None:
    S, seed, n = 20, 7, 3
    gens = sample_generators(seed, n)
    x_T = draw(gens, model.sample_shape)
    got = sample(model.eps, x_T, model.alphas_cumprod, timestep_sequence(S, 1000, ours), eta=eta,
                 clip_denoised=clip, generators=gens)
    ref = _diffusers_ddim(model, x_T.clone(), S, eta, spacing, seed, clip)
    assert (got - ref).abs().max().item() <= ATOL


@pytest.mark.parametrize("variance_type,large", [("fixed_small", False), ("fixed_large", True)])
@pytest.mark.parametrize("clip", [False, True])
def test_full_chain_matches_ddpm_scheduler(model: Model, variance_type: str, large: bool, clip: bool) -> None:
    """S = T: eta = 1 is DDPM with fixed_small; 'large' is DDPM with fixed_large.

    DDPMScheduler writes the mean as the posterior mean (coefficients of x0 and x_t), we as Eq. 12:
    equal algebraically. Near t = 0 DDPMScheduler computes beta_t = 1 - a_t / a_{t-1} from the float32
    table in float32, which alone moves a step by ~1e-4. So both run on the same alpha-bar table held
    in float64, with the samples in float64 (the network itself in float32): any difference left is
    the math's, and it is held to 1e-5.
    """
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type=variance_type,
                          clip_sample=clip)
    sched.set_timesteps(1000)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    table = model.alphas_cumprod.double()
    g_ours, g_ref = sample_generators(3, 1)[0], sample_generators(3, 1)[0]
    shape = (1, *model.sample_shape)
    x = torch.randn(shape, generator=g_ours, dtype=torch.float64)
    x_ref = torch.randn(shape, generator=g_ref, dtype=torch.float64)
    for t in sched.timesteps:
        tt = torch.full((1,), int(t))
        noise = torch.randn(shape, generator=g_ours, dtype=torch.float64) if t > 0 else None
        x = ddim_step(model.eps(x, tt), x, tt, tt - 1, torch.ones(1), table,
                      large=torch.tensor([large]), clip_denoised=clip, noise=noise).prev_sample
        x_ref = sched.step(model.eps(x_ref, tt), t, x_ref, generator=g_ref).prev_sample
    assert x.dtype == torch.float64 and x.abs().max() < 10
    assert (x - x_ref).abs().max().item() <= ATOL


def test_inversion_matches_ddim_inverse_scheduler(model: Model) -> None:
    """Leading spacing: both call the network at the target timestep and start from alpha-bar = 1.

    Where they differ: DDIMInverseScheduler takes the source level as t - T // S, so for trailing
    spacing with T % S != 0 it leaves the sequence; we always step between neighbours of the sequence.
    It also clips x0 when clip_sample is set; our inversion never clips.
    """
    S = 25
    x0 = torch.rand(2, *model.sample_shape) * 2 - 1
    got = invert(model.eps, x0, model.alphas_cumprod, timestep_sequence(S, 1000))
    sched = DDIMInverseScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                 set_alpha_to_one=True, timestep_spacing="leading")
    sched.set_timesteps(S)
    x = x0.clone()
    for t in sched.timesteps:
        x = sched.step(model.eps(x, torch.full((2,), int(t))), t, x).prev_sample
    assert (got - x).abs().max().item() <= ATOL


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_other_prediction_types_match_diffusers(model: Model, prediction_type: str) -> None:
    gens = sample_generators(11, 2)
    x_T = draw(gens, model.sample_shape)
    got = sample(model.eps, x_T, model.alphas_cumprod, timestep_sequence(10, 1000), eta=0.5,
                 prediction_type=prediction_type, generators=gens)
    ref = _diffusers_ddim(model, x_T.clone(), 10, 0.5, "leading", 11, False, prediction_type)
    assert (got - ref).abs().max().item() <= ATOL
