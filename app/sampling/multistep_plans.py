"""Plans of multistep solver runs (DPM-Solver++, UniPC), as values: the network timesteps and the sigma grid.

A plan is what diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler hold after set_timesteps(S),
built from the model's own scheduler config as `Solver.from_config(config, **diffusers_overrides(...))`:

- timesteps [S] int64, the network's timestep at each step, exactly as the scheduler's `timesteps`;
- sigmas [S + 1] float32, the scheduler's `sigmas`, ending at 0 (final_sigmas_type="zero"). On VP sigma is the
  noise-to-signal ratio sqrt((1 - alpha-bar) / alpha-bar); on a flow path it is the flow's s = 1 - a.

From sigma follow (Lu et al. 2022, Sec. 2) alpha_t, sigma_t and the half log-SNR lambda_t = log alpha_t - log sigma_t
(solver_levels); lambda is +inf at the final sigma 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch

from app.sampling.paths import PathKind
from app.sampling.schedules import ScheduleError, alphas_cumprod_from_config, flow_shift
from app.sampling.step import VP_PREDICTION_TYPES, PredictionType, coefficient_dtype

Sampler = Literal["dpmsolver++", "unipc"]
SAMPLERS: tuple[Sampler, ...] = get_args(Sampler)
SolverSpacing = Literal["leading", "trailing", "linspace", "karras"]
SOLVER_SPACINGS: tuple[SolverSpacing, ...] = get_args(SolverSpacing)
FLOW_SOLVER_SPACINGS: tuple[str, ...] = ("flow",)  # use_flow_sigmas=True: the flow grid has no spacing choice
MAX_SOLVER_ORDER = 3
# scheduler-config keys whose non-default values change the run and that no override of ours resets
UNSUPPORTED_KEYS = ("rescale_betas_zero_snr", "sigma_min", "sigma_max")
LEARNED_VARIANCE = ("learned", "learned_range")  # the network's output carries a variance half: not handled


@dataclass(frozen=True)
class SolverPlan:
    """One row's multistep run: sampler, solver order, prediction type, path kind, and diffusers' grid.

    timesteps [S] int64 (the network's input at step k); sigmas [S + 1] float32 (level k is where x is before
    step k; level S is 0, the clean end).
    """

    sampler: Sampler
    order: int
    prediction_type: PredictionType
    path: PathKind
    timesteps: torch.Tensor
    sigmas: torch.Tensor

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel())

    def levels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t, lambda_t) [S + 1] in float64 (solver_levels)."""
        return solver_levels(self.sigmas, self.path)


def solver_levels(sigmas: torch.Tensor, path: PathKind,
                  dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t, lambda_t) of a sigma grid, as diffusers' _sigma_to_alpha_sigma_t (coefficient dtype).

    VP: alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha_t; flow: alpha_t = 1 - sigma, sigma_t = sigma.
    lambda_t = log alpha_t - log sigma_t (+inf where sigma = 0).
    """
    s = sigmas.to(dtype or coefficient_dtype(sigmas.device))
    if path == "flow":
        alpha_t, sigma_t = 1 - s, s
    else:
        alpha_t = 1 / (s**2 + 1).sqrt()
        sigma_t = s * alpha_t
    return alpha_t, sigma_t, alpha_t.log() - sigma_t.log()


def _check_common(sampler: str, steps: int, order: int) -> None:
    if sampler not in SAMPLERS:
        raise ScheduleError(f"unknown sampler {sampler!r}; supported: {', '.join(SAMPLERS)}")
    if not 1 <= order <= MAX_SOLVER_ORDER:
        raise ScheduleError(f"solver order must be 1, 2 or 3, got {order}")
    if steps < 1:
        raise ScheduleError(f"steps must be at least 1, got {steps}")


def check_solver_config(config: Mapping[str, Any]) -> None:
    """Refuse, by name, the scheduler-config values that would change a solver run and that we do not implement."""
    for key in UNSUPPORTED_KEYS:
        if config.get(key) not in (None, False):
            raise ScheduleError(f"{key}={config[key]!r} is not supported by the multistep solvers; remove it")
    if config.get("variance_type") in LEARNED_VARIANCE:
        raise ScheduleError(f"variance_type={config['variance_type']!r} (a learned variance) is not supported "
                            f"by the multistep solvers")


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' _sigma_to_t: the fractional timestep of sigma, interpolating log sigma over the training table."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t: np.ndarray = (1 - w) * low_idx + w * high_idx
    return t.reshape(np.shape(sigma))


def _karras(table: np.ndarray, steps: int) -> np.ndarray:
    """Karras et al. 2022, Eq. 5 with rho = 7, between the training table's smallest and largest sigma."""
    sigma_min, sigma_max = float(table[0]), float(table[-1])
    ramp = np.linspace(0, 1, steps)
    rho = 7.0
    out: np.ndarray = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return out


def _spaced_timesteps(spacing: str, steps: int, T: int, steps_offset: int) -> np.ndarray:
    """diffusers' timestep_spacing of the multistep schedulers (S + 1 points, the last dropped), descending."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = T // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.arange(T, 0, -T / steps).round().copy().astype(np.int64) - 1
    raise ScheduleError(f"unknown spacing {spacing!r}; supported: {', '.join(SOLVER_SPACINGS)}")


def vp_solver_plan(config: Mapping[str, Any], sampler: Sampler, steps: int, spacing: str,
                   order: int = 2) -> SolverPlan:
    """The plan of an S-step solver run on a VP model, from the model's DDPM/DDIM scheduler config.

    Leading keeps the config's steps_offset; karras is use_karras_sigmas=True (timesteps from the Karras sigmas
    by log-sigma interpolation, rounded; DPM-Solver leaves squaredcos_cap_v2's unrounded, then truncates).
    """
    _check_common(sampler, steps, order)
    check_solver_config(config)
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in VP_PREDICTION_TYPES:
        raise ScheduleError(f"unknown prediction_type {prediction!r}; supported: {', '.join(VP_PREDICTION_TYPES)}")
    ac = alphas_cumprod_from_config(config)
    T = int(ac.numel())
    if steps >= T:
        raise ScheduleError(f"steps must be below {T} (the model's num_train_timesteps), got {steps}")
    table = (((1 - ac) / ac) ** 0.5).numpy()  # float32, as diffusers
    if spacing == "karras":
        sig = _karras(table, steps)
        t = np.array([_sigma_to_t(s, np.log(table)) for s in sig])
        if sampler == "unipc" or config.get("beta_schedule", "linear") != "squaredcos_cap_v2":
            t = t.round()
        timesteps = torch.from_numpy(t).to(torch.int64)
    else:
        spaced = _spaced_timesteps(spacing, steps, T, int(config.get("steps_offset", 0)))
        sig = np.interp(spaced, np.arange(0, T), table)
        timesteps = torch.from_numpy(spaced).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
    return SolverPlan(sampler, order, prediction, "vp", timesteps, sigmas)


def flow_solver_plan(sampler: Sampler, steps: int, *, num_train_timesteps: int = 1000, shift: float = 1.0,
                     order: int = 2) -> SolverPlan:
    """The plan of an S-step solver run on a rectified-flow model (use_flow_sigmas=True, flow_shift=shift).

    The two samplers' grids differ: DPM-Solver++ shifts 1 - linspace(1, 1/T, S + 1) and drops its 0 (it starts
    at shift(1 - 1/T)); UniPC shifts linspace(1, 1/T, S + 1)[:-1] and moves a first sigma of 1 to 1 - 1e-6.
    The network timesteps are T sigma cast to int64 (truncated), as diffusers does.
    """
    _check_common(sampler, steps, order)
    T = int(num_train_timesteps)
    if T < 1 or not shift > 0:
        raise ScheduleError(f"num_train_timesteps must be >= 1 and shift > 0, got {T} and {shift}")
    if sampler == "dpmsolver++":
        sig = np.flip(flow_shift(1.0 - np.linspace(1, 1 / T, steps + 1), shift))[:-1].copy()
    else:
        sig = flow_shift(np.linspace(1, 1 / T, steps + 1)[:-1], shift)
        if math.fabs(sig[0] - 1) < 1e-6:
            sig[0] -= 1e-6  # diffusers: keeps log(alpha) finite at the first step
    timesteps = torch.from_numpy(sig * T).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
    return SolverPlan(sampler, order, "flow", "flow", timesteps, sigmas)


def diffusers_overrides(sampler: Sampler, order: int, spacing: str, *, shift: float | None = None) -> dict[str, Any]:
    """The keyword overrides that make `DPMSolverMultistepScheduler` / `UniPCMultistepScheduler.from_config(model's
    config, **overrides)` run the plan vp_solver_plan (shift None) or flow_solver_plan (shift given) builds.

    They pin every option we implement to diffusers' default (no thresholding, final sigma 0, lower-order final
    steps; DPM-Solver++ midpoint; UniPC bh2 predicting x0 with the corrector on), whatever the config says.
    """
    common: dict[str, Any] = {
        "solver_order": order, "thresholding": False, "lower_order_final": True, "final_sigmas_type": "zero",
        "use_karras_sigmas": spacing == "karras", "use_exponential_sigmas": False, "use_beta_sigmas": False,
        "use_flow_sigmas": shift is not None, "use_dynamic_shifting": False,
    }
    if shift is not None:
        common |= {"flow_shift": float(shift), "prediction_type": "flow_prediction"}
    elif spacing != "karras":
        common["timestep_spacing"] = spacing
    if sampler == "dpmsolver++":
        return common | {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "euler_at_final": False,
                         "use_lu_lambdas": False, "lambda_min_clipped": -float("inf"), "variance_type": None}
    return common | {"solver_type": "bh2", "predict_x0": True, "disable_corrector": [], "solver_p": None,
                     "shift_terminal": None}
