"""DPM-Solver++ and UniPC as per-row state against diffusers' DPMSolverMultistepScheduler and
UniPCMultistepScheduler, each built as users do: `from_config(the model's scheduler config, **overrides)`.

Plans (timesteps and sigmas) must be equal; a run of ours equals a loop of the scheduler within 1e-5 relative
(max-norm) with a fixed stand-in network; a mixed batch equals each row alone.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, SchedulerMixin, UniPCMultistepScheduler

from app.sampling import (
    ScheduleError,
    SolverPlan,
    alphas_cumprod_from_config,
    diffusers_overrides,
    flow_solver_plan,
    vp_solver_plan,
)
from tests.conftest import FLOW_SCHEDULER

STEPS = [1, 2, 3, 5, 10, 20, 25, 50]
# a model folder's DDPMScheduler config, as model_store/fashion-mnist ships it
DDPM: dict[str, Any] = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                        "beta_start": 0.0001, "beta_end": 0.02, "variance_type": "fixed_small", "clip_sample": True,
                        "prediction_type": "epsilon"}
SOLVERS: dict[str, type[SchedulerMixin]] = {"dpmsolver++": DPMSolverMultistepScheduler,
                                            "unipc": UniPCMultistepScheduler}


def reference(config: dict[str, Any], sampler: str, order: int, spacing: str, steps: int) -> Any:
    """diffusers' solver for a model's config, set to S steps (spacing "flow": the flow grid)."""
    shift = config.get("shift", 1.0) if spacing == "flow" else None
    sched = SOLVERS[sampler].from_config(config, **diffusers_overrides(sampler, order, spacing, shift=shift))  # type: ignore[arg-type]
    sched.set_timesteps(steps)
    return sched


def ours(config: dict[str, Any], sampler: str, order: int, spacing: str, steps: int) -> SolverPlan:
    if spacing == "flow":
        return flow_solver_plan(sampler, steps, num_train_timesteps=config["num_train_timesteps"],  # type: ignore[arg-type]
                                shift=config["shift"], order=order)
    return vp_solver_plan(config, sampler, steps, spacing, order)  # type: ignore[arg-type]


# --- plans -------------------------------------------------------------------------------------------------------

CONFIGS = {
    "ddpm": DDPM,
    "scaled_linear+offset": {**DDPM, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                             "steps_offset": 1},
    "cosine": {**DDPM, "beta_schedule": "squaredcos_cap_v2"},
    "ddim-trailing": {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                      "timestep_spacing": "trailing", "steps_offset": 1, "set_alpha_to_one": False},
}


@pytest.mark.parametrize("sampler", list(SOLVERS))
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", "karras"])
def test_vp_plans_equal_diffusers(sampler: str, config: str, spacing: str) -> None:
    cfg = CONFIGS[config]
    for S in [*STEPS, 7, 100, 999]:
        plan, ref = ours(cfg, sampler, 2, spacing, S), reference(cfg, sampler, 2, spacing, S)
        assert torch.equal(plan.timesteps, ref.timesteps), (S, plan.timesteps, ref.timesteps)
        assert torch.equal(plan.sigmas, ref.sigmas), S
        assert plan.steps == S and plan.sigmas[-1] == 0


@pytest.mark.parametrize("sampler", list(SOLVERS))
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_plans_equal_diffusers(sampler: str, shift: float) -> None:
    cfg = {**FLOW_SCHEDULER, "shift": shift}
    for S in [*STEPS, 7, 100, 999]:
        plan, ref = ours(cfg, sampler, 2, "flow", S), reference(cfg, sampler, 2, "flow", S)
        assert torch.equal(plan.timesteps, ref.timesteps), (S, plan.timesteps, ref.timesteps)
        assert torch.equal(plan.sigmas, ref.sigmas), S


def test_leading_at_ten_steps_is_900_down_to_90() -> None:
    """Multistep "leading" spaces S + 1 points, floor(T / (S + 1)) apart, and drops 0 (DDIM's leading is 900..0)."""
    for sampler in SOLVERS:
        plan = vp_solver_plan(DDPM, sampler, 10, "leading")  # type: ignore[arg-type]
        assert plan.timesteps.tolist() == list(range(900, 0, -90))
    assert vp_solver_plan({**DDPM, "steps_offset": 1}, "unipc", 10, "leading").timesteps[0] == 901
    assert vp_solver_plan(DDPM, "unipc", 10, "trailing").timesteps.tolist() == list(range(999, 0, -100))


def test_flow_grids_differ_between_samplers() -> None:
    """diffusers' two use_flow_sigmas grids: DPM-Solver++ starts at shift(1 - 1/T), UniPC at 1 - 1e-6."""
    dpm, unipc = flow_solver_plan("dpmsolver++", 5, shift=3.0), flow_solver_plan("unipc", 5, shift=3.0)
    assert dpm.timesteps.tolist() == [999, 922, 817, 666, 428]
    assert unipc.timesteps.tolist() == [999, 923, 818, 667, 429]
    assert float(unipc.sigmas[0]) == pytest.approx(1 - 1e-6) and float(dpm.sigmas[0]) < float(unipc.sigmas[0])


def test_levels_follow_the_sigma_grid() -> None:
    plan = vp_solver_plan(DDPM, "dpmsolver++", 10, "leading")
    alpha_t, sigma_t, lambda_t = plan.levels()
    ac = alphas_cumprod_from_config(DDPM).double()[plan.timesteps]
    torch.testing.assert_close(alpha_t[:-1], ac.sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(lambda_t[:-1], 0.5 * torch.log(ac / (1 - ac)), rtol=1e-5, atol=1e-6)
    assert (float(alpha_t[-1]), float(sigma_t[-1]), float(lambda_t[-1])) == (1.0, 0.0, math.inf)
    f_alpha, f_sigma, _ = flow_solver_plan("unipc", 4).levels()
    torch.testing.assert_close(f_alpha + f_sigma, torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("config,match", [
    ({**DDPM, "rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({**DDPM, "variance_type": "learned_range"}, "learned variance"),
    ({**DDPM, "prediction_type": "flow"}, "unknown prediction_type"),
])
def test_unsupported_configs_are_refused(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        vp_solver_plan(config, "unipc", 10, "leading")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ScheduleError, match="unknown sampler"):
        vp_solver_plan(DDPM, "heun", 10, "leading")  # type: ignore[arg-type]
    with pytest.raises(ScheduleError, match="solver order must be 1, 2 or 3"):
        flow_solver_plan("unipc", 10, order=4)
    with pytest.raises(ScheduleError, match="unknown spacing"):
        vp_solver_plan(DDPM, "unipc", 10, "quadratic")
    with pytest.raises(ScheduleError, match="steps must be below 1000"):
        vp_solver_plan(DDPM, "unipc", 1000, "trailing")
    with pytest.raises(ScheduleError, match="steps must be at least 1"):
        flow_solver_plan("dpmsolver++", 0)
