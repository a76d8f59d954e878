"""Gaussian paths x_t = a_t x0 + s_t eps, and the plan of one sampling or inversion run over one.

- VP (DDPM): a = sqrt(alpha-bar_t), s = sqrt(1 - alpha-bar_t); the network gets the integer t.
- Rectified flow: a = 1 - sigma, s = sigma; the network gets 1000 sigma (num_train_timesteps sigma).

A Plan holds the levels (a, s) a run visits and the timestep the network sees at each step, so that
the engine and the offline loops walk any path the same way: x moves from level k to level k + 1 at
step k, with the network called at model_t[k].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from app.sampling.schedules import alpha_at

PathKind = Literal["vp", "flow"]
PATH_KINDS: tuple[PathKind, ...] = ("vp", "flow")
Direction = Literal["generate", "invert"]


def vp_levels(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, s) = (sqrt(alpha-bar_t), sqrt(1 - alpha-bar_t)) in float64; t < 0 is the clean end (a = 1, s = 0)."""
    ab = alpha_at(alphas_cumprod, t).double()
    return ab.sqrt(), (1 - ab).clamp(min=0).sqrt()


def flow_levels(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, s) = (1 - sigma, sigma) in float64."""
    sigma = sigma.double()
    return 1 - sigma, sigma


@dataclass(frozen=True)
class Plan:
    """The levels of one run, a and s [S + 1] (float64), and the network's timestep at each step, model_t [S]."""

    a: torch.Tensor
    s: torch.Tensor
    model_t: torch.Tensor

    @property
    def steps(self) -> int:
        return int(self.model_t.numel())


def vp_plan(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, direction: Direction, end: int = -1) -> Plan:
    """A VP run over ascending timesteps tau_1 < ... < tau_S.

    generate: tau_S -> ... -> tau_1 -> end, the network at the current timestep (Eq. 12);
    invert: clean -> tau_1 -> ... -> tau_S, the network at the target timestep (Eq. 14, as diffusers'
    DDIMInverseScheduler). end -1 is the clean end (alpha-bar = 1); 0 is alpha-bar_0, where diffusers' DDIMScheduler
    with set_alpha_to_one=False (Stable Diffusion's config) ends.
    """
    seq, clean = timesteps.long(), torch.tensor([end if direction == "generate" else -1])
    if direction == "generate":
        desc = seq.flip(0)
        levels, model_t = torch.cat([desc, clean]), desc
    else:
        levels, model_t = torch.cat([clean, seq]), seq
    a, s = vp_levels(alphas_cumprod, levels)
    return Plan(a, s, model_t.float())


def flow_plan(sigmas: torch.Tensor, num_train_timesteps: int, direction: Direction) -> Plan:
    """A flow run over descending sigmas [S + 1] that end at 0 (schedules.flow_sigmas).

    generate: sigma_0 -> ... -> 0; invert: 0 -> ... -> sigma_0, the reversed Euler loop. Both call the
    network at the current point, timestep num_train_timesteps sigma.
    """
    levels = sigmas.double() if direction == "generate" else sigmas.double().flip(0)
    a, s = flow_levels(levels)
    return Plan(a, s, (levels[:-1] * num_train_timesteps).float())


def strength_steps(steps: int, strength: float) -> int:
    """k, the steps of an S-step plan that a partial trip (SDEdit, img2img, /edit) runs: diffusers' img2img
    init_timestep = min(int(S * strength), S)."""
    return min(int(steps * strength), steps)


def last_steps(plan: Plan, k: int) -> Plan:
    """The last k steps of a generation plan: from its level S - k (t_k) down to its end (img2img's timesteps
    [S - k:], as diffusers' get_timesteps gives them)."""
    start = plan.steps - k
    return Plan(plan.a[start:], plan.s[start:], plan.model_t[start:])


def first_steps(plan: Plan, k: int) -> Plan:
    """The first k steps of an inversion plan: from the clean end up to level t_k, the level last_steps of the
    same S-step generation plan starts from."""
    return Plan(plan.a[:k + 1], plan.s[:k + 1], plan.model_t[:k])
