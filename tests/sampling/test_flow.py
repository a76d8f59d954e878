"""Rectified flow: our plan and step against diffusers' FlowMatchEulerDiscreteScheduler, inversion against an
independent reversed Euler loop, and an analytic oracle (the exact velocity field of Gaussian data)."""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

from app.sampling import (
    ScheduleError,
    check_flow_config,
    draw,
    flow_plan,
    flow_sigmas,
    predict_x0_eps,
    sample_generators,
    sigma_eta,
    step_coefficients,
    take_step,
)
from app.sampling.loop import run_plan
from tests.conftest import TINY_UNET

RTOL = 1e-5


@pytest.fixture(scope="module")
def velocity() -> UNet2DModel:
    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET).eval().requires_grad_(False)

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A random diffusers UNet made tame: its output scaled down, plus a pull towards 0."""
        return 0.5 * x + 0.1 * unet(x, t).sample

    return v  # type: ignore[return-value]


def _diffusers_flow(v, x: torch.Tensor, S: int, shift: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(S)
    for t in sched.timesteps:
        x = sched.step(v(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("S", [1, 2, 7, 20, 50])
def test_flow_sampling_matches_flow_match_euler_discrete(velocity, shift: float, S: int) -> None:  # type: ignore[no-untyped-def]
    x_T = draw(sample_generators(S, 3), TINY_UNET_SHAPE)
    ref = _diffusers_flow(velocity, x_T.clone(), S, shift)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(S)
    sigmas = flow_sigmas(S, 1000, shift)
    torch.testing.assert_close(sigmas, sched.sigmas, rtol=1e-6, atol=1e-7)
    plan = flow_plan(sigmas, 1000, "generate")
    torch.testing.assert_close(plan.model_t, sched.timesteps, rtol=1e-6, atol=1e-4)
    got = run_plan(velocity, x_T, plan, prediction_type="flow")
    assert ((got - ref).norm() / ref.norm()).item() <= RTOL


def test_flow_eta_zero_is_the_euler_step() -> None:
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g)
    sigma, sigma_next = torch.tensor([1.0, 0.7, 0.3, 0.05]), torch.tensor([0.7, 0.3, 0.05, 0.0])
    coef = step_coefficients(1 - sigma, sigma, 1 - sigma_next, sigma_next, torch.zeros(4))
    out = take_step(x, v, coef, prediction_type="flow").prev_sample
    torch.testing.assert_close(out, x + (sigma_next - sigma).view(-1, 1, 1, 1) * v, rtol=0, atol=1e-6)
    x0, eps = predict_x0_eps(x, v, 1 - sigma, sigma, "flow")
    torch.testing.assert_close(eps - x0, v, rtol=0, atol=1e-6)  # v = eps - x0


def test_flow_sigma_eta_is_the_general_formula() -> None:
    """sigma_eta = eta s' sqrt(1 - SNR_t / SNR_t') on the flow path; eta = 1 is the posterior's std."""
    sigma, sigma_next = torch.tensor([0.8], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    a, s, an, sn = 1 - sigma, sigma, 1 - sigma_next, sigma_next
    snr, snr_next = (a / s) ** 2, (an / sn) ** 2
    expected = sn * (1 - snr / snr_next).sqrt()
    torch.testing.assert_close(sigma_eta(a, s, an, sn, torch.ones(1, dtype=torch.float64)), expected)
    # the posterior q(x_t' | x_t, x0) of a Gaussian path has variance s'^2 (1 - SNR_t / SNR_t')
    assert sigma_eta(a, s, an, torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)).item() == 0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_inversion_matches_a_reversed_euler_loop(velocity, shift: float) -> None:  # type: ignore[no-untyped-def]
    S = 25
    x0 = torch.rand(2, *TINY_UNET_SHAPE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    sigmas = flow_sigmas(S, 1000, shift)
    got = run_plan(velocity, x0, flow_plan(sigmas, 1000, "invert"), prediction_type="flow")
    rev, x = sigmas.flip(0).tolist(), x0.clone()
    for sigma, sigma_next in itertools.pairwise(rev):
        x = x + (sigma_next - sigma) * velocity(x, torch.full((2,), sigma * 1000))
    assert ((got - x).norm() / x.norm()).item() <= RTOL


def test_unsupported_flow_keys_are_refused_by_name() -> None:
    check_flow_config({"shift": 3.0, "use_dynamic_shifting": False})
    for key in ("use_dynamic_shifting", "use_karras_sigmas", "shift_terminal", "invert_sigmas"):
        with pytest.raises(ScheduleError, match=key):
            check_flow_config({key: True if key != "shift_terminal" else 0.1})


MU, STD = 0.4, 0.3


def optimal_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[eps - x0 | x_sigma] for x0 ~ N(MU, STD^2), x_sigma = (1 - sigma) x0 + sigma eps."""
    sigma = (t / 1000).double().view(-1, 1, 1, 1)
    var = (1 - sigma) ** 2 * STD**2 + sigma**2
    centred = x.double() - (1 - sigma) * MU
    return ((sigma - (1 - sigma) * STD**2) / var * centred - MU).to(x.dtype)


def test_euler_reaches_gaussian_data_and_round_trips() -> None:
    n = 256
    x_T = draw(sample_generators(100, n), (1, 16, 16))
    sigmas = flow_sigmas(1000, 1000, 1.0)
    x0 = run_plan(optimal_velocity, x_T, flow_plan(sigmas, 1000, "generate"), prediction_type="flow")
    assert abs(x0.mean().item() - MU) <= 0.02 * MU
    assert abs(x0.std().item() - STD) <= 0.02 * STD


def test_flow_round_trip_error_is_first_order_in_the_step() -> None:
    """Inversion and generation both take the velocity at the current point (Euler both ways), so a round
    trip is exact only as S grows: its error halves when S doubles. (Measured: 2.2e-3 at S = 1000, 1.1e-3 at
    S = 2000 on this data; the eps-oracle's bar for DDIM's round trip is 1e-2.)"""
    data = MU + STD * torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    errors = []
    for S in (250, 1000, 2000):
        sigmas = flow_sigmas(S, 1000, 1.0)
        noise = run_plan(optimal_velocity, data, flow_plan(sigmas, 1000, "invert"), prediction_type="flow")
        back = run_plan(optimal_velocity, noise, flow_plan(sigmas, 1000, "generate"), prediction_type="flow")
        errors.append(((back - data).norm() / data.norm()).item())
    assert errors[1] <= 1e-2 and errors[2] <= 0.55 * errors[1] and errors[1] <= 0.3 * errors[0], errors


TINY_UNET_SHAPE = (TINY_UNET["in_channels"], TINY_UNET["sample_size"], TINY_UNET["sample_size"])
