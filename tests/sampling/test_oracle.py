"""An analytic oracle: for data ~ N(mu, s^2 I) the optimal eps is known in closed form.

x_t = sqrt(a) x0 + sqrt(1 - a) eps  =>  x_t ~ N(sqrt(a) mu, (a s^2 + 1 - a) I), and
E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from app.sampling import alphas_cumprod_from_config, draw, sample_generators, timestep_sequence
from app.sampling.loop import invert, sample

AC = alphas_cumprod_from_config({})
MU, S = 0.4, 0.3


def optimal_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a = AC[t].view(-1, 1, 1, 1).to(x)
    return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_samplers_reach_the_data_distribution(eta: float) -> None:
    n = 256  # 65,536 values: the std's own sampling error is ~0.3%
    gens = sample_generators(100, n)
    x_T = draw(gens, (1, 16, 16))
    x0 = sample(optimal_eps, x_T, AC, timestep_sequence(1000, 1000), eta=eta, generators=gens)
    assert abs(x0.mean().item() - MU) <= 0.02 * MU
    assert abs(x0.std().item() - S) <= 0.02 * S


def test_inversion_then_generation_reconstructs_and_improves_with_S() -> None:
    x0 = MU + S * torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    errors = []
    for steps in (10, 50, 200, 1000):
        seq = timestep_sequence(steps, 1000)
        back = sample(optimal_eps, invert(optimal_eps, x0, AC, seq), AC, seq)
        errors.append(((back - x0).norm() / x0.norm()).item())
    assert all(later < earlier for earlier, later in itertools.pairwise(errors)), errors
    assert errors[-1] <= 0.01, errors
