import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from app.sampling import ScheduleError, alpha_at, alphas_cumprod_from_config, timestep_sequence


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alpha_bar_table_matches_diffusers(kind: str) -> None:
    cfg = {"num_train_timesteps": 1000, "beta_schedule": kind, "beta_start": 0.00085, "beta_end": 0.012}
    ours = alphas_cumprod_from_config(cfg)
    ref = DDPMScheduler(**cfg).alphas_cumprod
    assert ours.shape == (1000,)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-7)


def test_trained_betas_and_errors() -> None:
    betas = np.linspace(1e-4, 0.02, 10).tolist()
    ours = alphas_cumprod_from_config({"num_train_timesteps": 10, "trained_betas": betas})
    torch.testing.assert_close(ours, torch.cumprod(1 - torch.tensor(betas), 0))
    with pytest.raises(ScheduleError, match="unknown beta_schedule 'cosine'"):
        alphas_cumprod_from_config({"beta_schedule": "cosine"})
    with pytest.raises(ScheduleError, match="trained_betas has 10 values"):
        alphas_cumprod_from_config({"num_train_timesteps": 20, "trained_betas": betas})


@pytest.mark.parametrize("spacing,diffusers_spacing", [("uniform", "leading"), ("trailing", "trailing"),
                                                       ("linspace", "linspace")])
@pytest.mark.parametrize("S", [1, 7, 10, 50, 333, 1000])
def test_sequences_match_diffusers(spacing: str, diffusers_spacing: str, S: int) -> None:
    ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=diffusers_spacing)
    ref.set_timesteps(S)
    ours = timestep_sequence(S, 1000, spacing)
    assert torch.equal(ours, ref.timesteps.flip(0))


@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "trailing", "linspace"])
@pytest.mark.parametrize("S", [1, 2, 10, 100, 500, 999, 1000])
def test_sequences_have_exactly_S_distinct_steps(spacing: str, S: int) -> None:
    seq = timestep_sequence(S, 1000, spacing)
    assert len(seq) == S and seq.dtype == torch.int64
    assert bool((seq[1:] > seq[:-1]).all()) and int(seq[0]) >= 0 and int(seq[-1]) <= 999


def test_uniform_is_the_papers_linear_skip_and_quadratic_the_official_code() -> None:
    assert timestep_sequence(10, 1000, "uniform").tolist() == list(range(0, 1000, 100))
    S = 20
    official = [int(s) for s in np.linspace(0, np.sqrt(1000 * 0.8), S) ** 2]
    assert timestep_sequence(S, 1000, "quadratic").tolist() == official  # already distinct at S=20
    q = timestep_sequence(100, 1000, "quadratic").tolist()
    assert len(set(q)) == 100  # the official code repeats steps here; ours does not


@pytest.mark.parametrize("S", [0, -3, 1001])
def test_steps_out_of_range(S: int) -> None:
    with pytest.raises(ScheduleError, match="steps must be between 1 and 1000"):
        timestep_sequence(S, 1000, "uniform")
    with pytest.raises(ScheduleError, match="unknown schedule"):
        timestep_sequence(10, 1000, "cosine")


def test_alpha_at_gathers_per_sample_and_ends_at_one() -> None:
    ac = alphas_cumprod_from_config({})
    a = alpha_at(ac, torch.tensor([-1, 0, 999, 500]))
    assert a[0] == 1.0 and a[1] == ac[0] and a[2] == ac[999] and a[3] == ac[500]
