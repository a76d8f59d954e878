"""Offline sampling and inversion loops over the step functions, for the CLI, tests and benchmarks.

The server does not use these: its engine batches single steps across requests. Both walk a Plan
(app/sampling/paths.py) with the same step, so they agree sample for sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from app.sampling.multistep import MultistepState, SolverRows, multistep_coefficients, multistep_update
from app.sampling.multistep_plans import SolverPlan
from app.sampling.noise import draw, is_stochastic
from app.sampling.paths import Plan, first_steps, last_steps, vp_plan
from app.sampling.step import step_coefficients, take_step

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[Sequence[Any]], Iterable[Any]]  # e.g. a tqdm factory; the loop itself prints nothing


def _quiet(steps: Sequence[Any]) -> Iterable[Any]:
    return steps


def run_plan(
    model: EpsModel,
    x: torch.Tensor,
    plan: Plan,
    *,
    eta: float = 0.0,
    large: bool = False,
    prediction_type: str = "epsilon",
    clip_denoised: bool = False,
    generators: list[torch.Generator] | None = None,
    progress: Progress = _quiet,
) -> torch.Tensor:
    """Walk x through the plan's levels. With eta > 0 or large, the noise of step k comes from generators
    (one per sample), in step order (the seed contract)."""
    n = x.shape[0]
    stochastic = is_stochastic(eta, large)
    if stochastic and generators is None:
        raise ValueError("eta > 0 or large variance needs one generator per sample")
    eta_t, large_t = torch.full((n,), float(eta), dtype=torch.float64), torch.full((n,), large)
    for k in progress(range(plan.steps)):
        t = plan.model_t[k].expand(n).to(x.device)
        out = model(x, t)
        noise = draw(generators, tuple(x.shape[1:])).to(x) if stochastic else None  # type: ignore[arg-type]
        coef = step_coefficients(plan.a[k].expand(n), plan.s[k].expand(n), plan.a[k + 1].expand(n),
                                 plan.s[k + 1].expand(n), eta_t, large_t)
        x = take_step(x, out, coef, prediction_type=prediction_type, clip_denoised=clip_denoised,
                      noise=noise).prev_sample
    return x


def run_solver(model: EpsModel, x: torch.Tensor, plan: SolverPlan, *, progress: Progress = _quiet) -> torch.Tensor:
    """Walk x through a multistep solver's plan (DPM-Solver++ or UniPC), as the engine's rows of that plan do."""
    rows = SolverRows.from_plans([plan] * x.shape[0], x.device)
    state = MultistepState.initial(x)
    for _ in progress(range(plan.steps)):
        out = model(x, rows.model_timesteps(state.step_index).to(x.device).float())
        stepped = multistep_update(x, out, multistep_coefficients(rows, state), state)
        x, state = stepped.prev_sample, stepped.state
    return x


def _integer_timesteps(model: EpsModel) -> EpsModel:
    return lambda x, t: model(x, t.long())


def sample(
    eps_model: EpsModel,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    **kwargs: Any,
) -> torch.Tensor:
    """VP: run tau_S -> ... -> tau_1 -> alpha-bar = 1 from x_T; timesteps ascending, as timestep_sequence."""
    plan = vp_plan(alphas_cumprod, timesteps, "generate")
    return run_plan(_integer_timesteps(eps_model), x_T, plan, **kwargs)


def invert(
    eps_model: EpsModel,
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    prediction_type: str = "epsilon",
    progress: Progress = _quiet,
) -> torch.Tensor:
    """VP DDIM inversion alpha-bar = 1 -> tau_1 -> ... -> tau_S (eta = 0); returns x_T."""
    plan = vp_plan(alphas_cumprod, timesteps, "invert")
    return run_plan(_integer_timesteps(eps_model), x0, plan, prediction_type=prediction_type, progress=progress)


def edit(
    source: EpsModel,
    target: EpsModel,
    x0: torch.Tensor,
    invert_plan: Plan,
    generate_plan: Plan,
    k: int,
    *,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    generators: list[torch.Generator] | None = None,
    progress: Progress = _quiet,
) -> tuple[torch.Tensor, torch.Tensor]:
    """/edit offline: invert x0 under source for the first k steps of the S-step inversion plan (to level t_k),
    then generate the last k steps of the S-step generation plan under target. Returns (x_{t_k}, x_0)."""
    x_t = run_plan(source, x0, first_steps(invert_plan, k), prediction_type=prediction_type, progress=progress)
    out = run_plan(target, x_t, last_steps(generate_plan, k), eta=eta, prediction_type=prediction_type,
                   generators=generators, progress=progress)
    return x_t, out


def sdedit(
    model: EpsModel,
    x0: torch.Tensor,
    generate_plan: Plan,
    k: int,
    generators: list[torch.Generator],
    *,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    clip_denoised: bool = False,
    progress: Progress = _quiet,
) -> torch.Tensor:
    """img2img (SDEdit) offline: x = a_k x0 + s_k eps at level t_k, eps the generators' first draw (the seed
    contract's x_T draw), then the last k steps of the generation plan."""
    plan = last_steps(generate_plan, k)
    eps = draw(generators, tuple(x0.shape[1:])).to(x0)
    x = float(plan.a[0]) * x0 + float(plan.s[0]) * eps
    return run_plan(model, x, plan, eta=eta, prediction_type=prediction_type, clip_denoised=clip_denoised,
                    generators=generators, progress=progress)
