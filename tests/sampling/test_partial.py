"""Partial trips (img2img strength, /edit): k steps of an S-step plan, as diffusers' img2img pipelines take them."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from app.sampling import (
    alphas_cumprod_from_config,
    first_steps,
    flow_plan,
    flow_sigmas,
    last_steps,
    strength_steps,
    timestep_sequence,
    vp_plan,
)

CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}


@pytest.mark.parametrize("steps,strength", [(50, 0.3), (50, 0.75), (10, 1.0), (7, 0.5), (20, 0.05)])
def test_vp_partial_trips_take_diffusers_img2img_timesteps(steps: int, strength: float) -> None:
    sched = DDIMScheduler(**CONFIG, timestep_spacing="leading", steps_offset=0)
    sched.set_timesteps(steps)
    init = min(int(steps * strength), steps)  # StableDiffusionImg2ImgPipeline.get_timesteps
    want = sched.timesteps[max(steps - init, 0):]
    k = strength_steps(steps, strength)
    ac = alphas_cumprod_from_config(CONFIG)
    seq = timestep_sequence(steps, 1000, "leading")
    down, up = vp_plan(ac, seq, "generate"), vp_plan(ac, seq, "invert")
    assert last_steps(down, k).model_t.long().tolist() == want.tolist()
    inverted = first_steps(up, k)
    assert inverted.steps == k == last_steps(down, k).steps
    # the inversion ends at the level the generation starts from
    start = last_steps(down, k)
    assert torch.equal(inverted.a[-1], start.a[0]) and torch.equal(inverted.s[-1], start.s[0])


@pytest.mark.parametrize("steps,strength", [(28, 0.6), (10, 1.0), (5, 0.4)])
def test_flow_partial_trips_take_diffusers_timesteps(steps: int, strength: float) -> None:
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(steps)
    k = strength_steps(steps, strength)
    sigmas = flow_sigmas(steps, 1000, 3.0)
    down, up = flow_plan(sigmas, 1000, "generate"), flow_plan(sigmas, 1000, "invert")
    torch.testing.assert_close(last_steps(down, k).model_t, sched.timesteps[steps - k:].float())
    assert torch.equal(first_steps(up, k).s[-1], last_steps(down, k).s[0])
