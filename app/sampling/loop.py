"""Offline sampling and inversion loops over the step functions, for the CLI, tests and benchmarks.

The server does not use these: its engine batches single steps across requests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from app.sampling.noise import draw
from app.sampling.step import ddim_step, invert_step

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[Sequence[Any]], Iterable[Any]]  # e.g. a tqdm factory; the loop itself prints nothing


def _quiet(steps: Sequence[Any]) -> Iterable[Any]:
    return steps


def _full(value: float | bool, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n,), value, dtype=dtype)


def sample(
    eps_model: EpsModel,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    eta: float = 0.0,
    large: bool = False,
    prediction_type: str = "epsilon",
    clip_denoised: bool = False,
    generators: list[torch.Generator] | None = None,
    progress: Progress = _quiet,
) -> torch.Tensor:
    """Run tau_S -> ... -> tau_1 -> alpha-bar = 1 from x_T; timesteps ascending, as timestep_sequence.

    With eta > 0 or large, the noise of step k comes from generators (one per sample), in step order.
    """
    n = x_T.shape[0]
    stochastic = eta > 0 or large
    if stochastic and generators is None:
        raise ValueError("eta > 0 or large variance needs one generator per sample")
    x = x_T
    seq = timesteps.tolist()
    pairs = list(zip(reversed(seq), [*reversed(seq[:-1]), -1]))
    for t, t_prev in progress(pairs):
        tt = torch.full((n,), t, dtype=torch.long, device=x.device)
        out = eps_model(x, tt)
        noise = draw(generators, tuple(x.shape[1:])).to(x) if stochastic else None  # type: ignore[arg-type]
        x = ddim_step(out, x, tt, torch.full_like(tt, t_prev), _full(eta, n, x.dtype), alphas_cumprod,
                      large=_full(large, n, torch.bool), prediction_type=prediction_type,
                      clip_denoised=clip_denoised, noise=noise).prev_sample
    return x


def invert(
    eps_model: EpsModel,
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    prediction_type: str = "epsilon",
    progress: Progress = _quiet,
) -> torch.Tensor:
    """DDIM inversion alpha-bar = 1 -> tau_1 -> ... -> tau_S (eta = 0); returns x_T."""
    n = x0.shape[0]
    x = x0
    seq = timesteps.tolist()
    for t_from, t in progress(list(zip([-1, *seq[:-1]], seq))):
        tt = torch.full((n,), t, dtype=torch.long, device=x.device)
        x = invert_step(eps_model(x, tt), x, torch.full_like(tt, t_from), tt, alphas_cumprod,
                        prediction_type=prediction_type).prev_sample
    return x
