"""Noise schedules (the alpha-bar table) and timestep sequences, as values.

alpha-bar below is DDPM's cumulative product, written alpha_t in Song et al. 2021.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

import numpy as np
import torch

Spacing = Literal["uniform", "leading", "quadratic", "trailing", "linspace"]
SPACINGS: tuple[Spacing, ...] = get_args(Spacing)
FLOW_SPACINGS: tuple[Spacing, ...] = ("linspace",)  # diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps
# FlowMatchEulerDiscreteScheduler config keys that change the sigmas and that we do not implement
FLOW_UNSUPPORTED = ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                    "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")
BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")


class ScheduleError(ValueError):
    """A scheduler config or a step request that cannot be turned into a schedule."""


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's squaredcos_cap_v2, as diffusers' betas_for_alpha_bar."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def betas_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """The beta table [T] from a diffusers scheduler config (float32, as diffusers builds it)."""
    T = int(config.get("num_train_timesteps", 1000))
    if T < 1:
        raise ScheduleError(f"num_train_timesteps must be >= 1, got {T}")
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float32)
        if betas.shape != (T,):
            raise ScheduleError(f"trained_betas has {betas.numel()} values, num_train_timesteps is {T}")
        return betas
    kind = config.get("beta_schedule", "linear")
    start = float(config.get("beta_start", 0.0001))
    end = float(config.get("beta_end", 0.02))
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float32)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":
        return _cosine_betas(T)
    raise ScheduleError(
        f"unknown beta_schedule {kind!r}; supported: {', '.join(BETA_SCHEDULES)} or trained_betas"
    )


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """alpha-bar_t = prod_{s<=t} (1 - beta_s), a float32 tensor of length T."""
    betas = betas_from_config(config)
    return torch.cumprod(1.0 - betas, dim=0)


def timestep_sequence(steps: int, num_train_timesteps: int, spacing: str = "uniform") -> torch.Tensor:
    """The S distinct timesteps tau_1 < ... < tau_S of a sampling run, ascending, int64.

    - uniform (= diffusers "leading", the paper's linear skip): tau_i = i * floor(T/S)
    - quadratic (official DDIM code): floor(linspace(0, sqrt(0.8 T), S)^2), made strictly increasing
    - trailing, linspace: diffusers' definitions
    """
    S, T = int(steps), int(num_train_timesteps)
    if not 1 <= S <= T:
        raise ScheduleError(f"steps must be between 1 and {T} (the model's num_train_timesteps), got {S}")
    if spacing in ("uniform", "leading"):
        seq = np.arange(S, dtype=np.int64) * (T // S)
    elif spacing == "quadratic":
        seq = np.floor(np.linspace(0, math.sqrt(0.8 * T), S) ** 2).astype(np.int64)
        for i in range(1, S):
            seq[i] = max(seq[i], seq[i - 1] + 1)
        if seq[-1] > T - 1:
            raise ScheduleError(f"quadratic spacing cannot fit {S} distinct steps into T={T}")
    elif spacing == "trailing":
        seq = (np.round(np.arange(T, 0, -T / S)).astype(np.int64) - 1)[::-1].copy()
    elif spacing == "linspace":
        seq = np.linspace(0, T - 1, S).round().astype(np.int64)
    else:
        raise ScheduleError(f"unknown schedule {spacing!r}; supported: {', '.join(SPACINGS)}")
    if len(seq) != S or np.any(np.diff(seq) <= 0):
        raise ScheduleError(f"{spacing} spacing does not give {S} distinct steps for T={T}")
    return torch.from_numpy(seq)


def alpha_at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alpha-bar gathered per sample; t < 0 means the clean end of the chain, alpha-bar = 1."""
    t = t.to(alphas_cumprod.device)
    a = alphas_cumprod.gather(0, t.clamp(min=0))
    return torch.where(t < 0, torch.ones_like(a), a)


def flow_shift(sigma: np.ndarray, shift: float) -> np.ndarray:
    """diffusers' static timestep shift: shift sigma / (1 + (shift - 1) sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_sigmas(steps: int, num_train_timesteps: int = 1000, shift: float = 1.0) -> torch.Tensor:
    """The S + 1 descending sigmas of a flow run, ending at 0, exactly as diffusers'
    FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift).set_timesteps(S) gives them (float32 values):
    timesteps linspace(T sigma_max, T sigma_min, S) between the shifted training sigmas' ends, then shifted."""
    S, T = int(steps), int(num_train_timesteps)
    if S < 1:
        raise ScheduleError(f"steps must be at least 1, got {S}")
    if T < 1:
        raise ScheduleError(f"num_train_timesteps must be >= 1, got {T}")
    if not shift > 0:
        raise ScheduleError(f"shift must be positive, got {shift}")
    train = flow_shift(np.linspace(1, T, T, dtype=np.float32)[::-1] / T, shift).astype(np.float32)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = np.linspace(sigma_max * T, sigma_min * T, S) / T
    sigmas = flow_shift(sigmas, shift).astype(np.float32)
    return torch.cat([torch.from_numpy(sigmas), torch.zeros(1)])


def check_flow_config(config: Mapping[str, Any]) -> None:
    """Refuse, by name, every FlowMatchEulerDiscreteScheduler key that would change the sigmas we give."""
    for key in FLOW_UNSUPPORTED:
        if config.get(key):
            raise ScheduleError(f"{key}={config[key]!r} is not supported (only the static shift is); "
                                f"set it to false or remove it")
