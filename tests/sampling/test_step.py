"""The step functions: mixed batches equal single runs; sigma and the large variance; slerp."""

from __future__ import annotations

import math

import torch

from app.sampling import (
    alpha_at,
    alphas_cumprod_from_config,
    ddim_sigma,
    ddim_step,
    generalized_step,
    invert_step,
    lerp,
    prediction_codes,
    slerp,
    step_coefficients,
    vp_levels,
)

AC = alphas_cumprod_from_config({})


def test_mixed_batch_equals_single_calls() -> None:
    """Each sample carries its own t, t', eta, variance kind, clipping and prediction type."""
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([999, 500, 20, 0, 700, 80])
    t_prev = torch.tensor([899, 480, -1, -1, 100, 60])
    eta = torch.tensor([0.0, 1.0, 0.5, 0.2, 0.0, 1.0])
    large = torch.tensor([False, False, False, False, True, True])
    clip = torch.tensor([False, True, False, True, False, True])
    kinds = ["epsilon", "sample", "v_prediction", "epsilon", "v_prediction", "sample"]
    x = torch.randn(6, 3, 4, 4, generator=g)
    out = torch.randn(6, 3, 4, 4, generator=g)
    noise = torch.randn(6, 3, 4, 4, generator=g)
    batched = ddim_step(out, x, t, t_prev, eta, AC, large=large, prediction_type=prediction_codes(kinds, 6),
                        clip_denoised=clip, noise=noise)
    for i in range(6):
        s = slice(i, i + 1)
        single = ddim_step(out[s], x[s], t[s], t_prev[s], eta[s], AC, large=large[s], prediction_type=kinds[i],
                           clip_denoised=bool(clip[i]), noise=noise[s])
        torch.testing.assert_close(batched.prev_sample[s], single.prev_sample, rtol=0, atol=1e-6)
        torch.testing.assert_close(batched.pred_original_sample[s], single.pred_original_sample, rtol=0, atol=1e-6)


def test_generation_and_inversion_rows_share_one_generalized_step() -> None:
    """The engine's batch mixes directions: row 0 generates 600 -> 400, row 1 inverts 400 -> 600."""
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    a600, a400 = AC[600].double(), AC[400].double()
    mixed = generalized_step(x, out, torch.stack([a600, a400]), torch.stack([a400, a600]),
                             torch.zeros(2)).prev_sample
    gen = ddim_step(out[:1], x[:1], torch.tensor([600]), torch.tensor([400]), torch.zeros(1), AC).prev_sample
    inv = invert_step(out[1:], x[1:], torch.tensor([400]), torch.tensor([600]), AC).prev_sample
    torch.testing.assert_close(mixed, torch.cat([gen, inv]), rtol=0, atol=1e-6)


def test_sigma_is_eq16_and_large_is_sigma_hat() -> None:
    a, ap = AC[[500]].double(), AC[[400]].double()
    s1 = ddim_sigma(a, ap, torch.ones(1, dtype=torch.float64))
    expected = math.sqrt((1 - ap.item()) / (1 - a.item()) * (1 - a.item() / ap.item()))
    assert abs(s1.item() - expected) < 1e-12
    assert ddim_sigma(a, ap, torch.zeros(1, dtype=torch.float64)).item() == 0.0
    def step_sigmas(alpha: torch.Tensor, alpha_prev: torch.Tensor, eta: torch.Tensor,
                    large: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        coef = step_coefficients(*vp_levels(alpha, torch.tensor([0])), *vp_levels(alpha_prev, torch.tensor([0])),
                                 eta, large)
        return coef.sigma, coef.noise_std

    sigma, noise_std = step_sigmas(a, ap, torch.zeros(1, dtype=torch.float64), torch.tensor([True]))
    assert abs(sigma.item() - expected) < 1e-12  # the mean keeps eta = 1's coefficients
    assert abs(noise_std.item() - math.sqrt(1 - a.item() / ap.item())) < 1e-12
    assert noise_std.item() > sigma.item()
    # the last step (to alpha-bar = 1) adds no noise, large or not
    _, last = step_sigmas(a, torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                          torch.tensor([True]))
    assert last.item() == 0.0


def test_eta_zero_is_deterministic_and_last_step_returns_x0() -> None:
    g = torch.Generator().manual_seed(2)
    x, out = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    t, end = torch.tensor([10, 10, 10]), torch.full((3,), -1)
    r = ddim_step(out, x, t, end, torch.tensor([0.0, 0.5, 1.0]), AC, noise=torch.randn(3, 1, 4, 4))
    torch.testing.assert_close(r.prev_sample, r.pred_original_sample, rtol=0, atol=1e-6)
    a = alpha_at(AC, t).view(-1, 1, 1, 1)
    torch.testing.assert_close(r.pred_original_sample, (x - (1 - a).sqrt() * out) / a.sqrt())


def test_slerp_endpoints_norm_and_lerp() -> None:
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    torch.testing.assert_close(slerp(x0, x1, 0.0), x0)
    torch.testing.assert_close(slerp(x0, x1, 1.0), x1)
    mid = slerp(x0, x1, 0.5)
    # for near-orthogonal Gaussian draws slerp keeps the norm; lerp shrinks it by about 1/sqrt(2)
    assert abs(mid.norm() / x0.norm() - 1) < 0.1
    assert lerp(x0, x1, 0.5).norm() < 0.85 * x0.norm()
    torch.testing.assert_close(slerp(x0, 2 * x0, 0.5), 1.5 * x0)  # parallel: falls back to lerp


def test_slerp_closed_form_on_orthogonal_vectors() -> None:
    """For orthogonal unit vectors theta = pi/2: slerp(a) = cos(a pi/2) e0 + sin(a pi/2) e1."""
    e0, e1 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    for a in (0.25, 0.5, 0.8):
        expected = math.cos(a * math.pi / 2) * e0 + math.sin(a * math.pi / 2) * e1
        torch.testing.assert_close(slerp(e0, e1, a), expected)
    torch.testing.assert_close(slerp(e0, e1, 0.5), (e0 + e1) / math.sqrt(2))
