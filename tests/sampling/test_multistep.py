"""DPM-Solver++ and UniPC as per-row state against diffusers' DPMSolverMultistepScheduler and
UniPCMultistepScheduler, each built as users do: `from_config(the model's scheduler config, **overrides)`.

Plans (timesteps and sigmas) must be equal; a run of ours equals a loop of the scheduler within 1e-5 relative
(max-norm) with a fixed stand-in network; a mixed batch equals each row alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, SchedulerMixin, UniPCMultistepScheduler

from app.sampling import (
    MultistepState,
    ScheduleError,
    SolverPlan,
    SolverRows,
    alphas_cumprod_from_config,
    diffusers_overrides,
    flow_solver_plan,
    multistep_coefficients,
    multistep_update,
    vp_solver_plan,
)
from tests.conftest import FLOW_SCHEDULER

# diffusers' set_timesteps calls np.array(torch tensor) the numpy-2 way that warns
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")
RTOL = 1e-5
STEPS = [1, 2, 3, 5, 10, 20, 25, 50]
# a model folder's DDPMScheduler config, as model_store/fashion-mnist ships it
DDPM: dict[str, Any] = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                        "beta_start": 0.0001, "beta_end": 0.02, "variance_type": "fixed_small", "clip_sample": True,
                        "prediction_type": "epsilon"}
SOLVERS: dict[str, type[SchedulerMixin]] = {"dpmsolver++": DPMSolverMultistepScheduler,
                                            "unipc": UniPCMultistepScheduler}
Net = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reference(config: dict[str, Any], sampler: str, order: int, spacing: str, steps: int,
              precise: bool = False) -> Any:
    """diffusers' solver for a model's config, set to S steps (spacing "flow": the flow grid).

    precise: its sigma grid held in float64 (the same float32 values), so that its coefficient math runs in float64
    as ours does; the samples stay float32 on both sides.
    """
    shift = config.get("shift", 1.0) if spacing == "flow" else None
    sched = SOLVERS[sampler].from_config(config, **diffusers_overrides(sampler, order, spacing, shift=shift))  # type: ignore[arg-type]
    sched.set_timesteps(steps)
    if precise:
        sched.sigmas = sched.sigmas.double()
    return sched


def ours(config: dict[str, Any], sampler: str, order: int, spacing: str, steps: int) -> SolverPlan:
    if spacing == "flow":
        return flow_solver_plan(sampler, steps, num_train_timesteps=config["num_train_timesteps"],  # type: ignore[arg-type]
                                shift=config["shift"], order=order)
    return vp_solver_plan(config, sampler, steps, spacing, order)  # type: ignore[arg-type]


def stand_in(config: dict[str, Any], prediction: str) -> Net:
    """A fixed network that behaves like a trained one: the exact denoiser of data ~ N(0, 0.5^2) at the level
    the timestep names, plus a seeded conv term that depends on t, returned as the model's prediction type."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1).requires_grad_(False)
    T = config["num_train_timesteps"]
    ac = None if prediction == "flow" else alphas_cumprod_from_config(config)

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.long().view(-1, 1, 1, 1)
        if ac is None:
            s = (t.float() / T).clamp(min=1e-3)
            a = 1 - s
        else:
            a, s = ac[t].sqrt(), (1 - ac[t]).sqrt()
        x0 = 0.25 * a * x / (0.25 * a**2 + s**2) + 0.1 * torch.tanh(conv(x)) * (0.5 + t / T)
        eps = (x - a * x0) / s
        return {"epsilon": eps, "v_prediction": a * eps - s * x0, "flow": eps - x0, "sample": x0}[prediction]

    return net


def run_reference(sched: Any, net: Net, x: torch.Tensor) -> torch.Tensor:
    for t in sched.timesteps:
        x = sched.step(net(x, t.view(1)), t, x).prev_sample
    return x


def run_ours(plan: SolverPlan, net: Net, x: torch.Tensor) -> torch.Tensor:
    rows, state = SolverRows.from_plans([plan]), MultistepState.initial(x)
    for _ in range(plan.steps):
        out = multistep_update(x, net(x, rows.model_timesteps(state.step_index)),
                               multistep_coefficients(rows, state), state)
        x, state = out.prev_sample, out.state
    return x


def x_T(seed: int = 0, n: int = 1) -> torch.Tensor:
    return torch.randn((n, 1, 4, 4), generator=torch.Generator().manual_seed(seed))


def assert_relative(got: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    err = float((got - ref).abs().max()) / float(ref.abs().max())
    assert err <= rtol, f"max-norm relative difference {err:.2e} > {rtol:.0e}"


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


# --- runs --------------------------------------------------------------------------------------------------------

RUNS = [("epsilon", s) for s in ("leading", "trailing", "linspace", "karras")] + \
       [("v_prediction", s) for s in ("leading", "trailing", "linspace", "karras")] + [("flow", "flow")]


def model_config(prediction: str) -> dict[str, Any]:
    return FLOW_SCHEDULER if prediction == "flow" else {**DDPM, "prediction_type": prediction}


@pytest.mark.parametrize("S", STEPS)
@pytest.mark.parametrize("prediction,spacing", RUNS)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("sampler", list(SOLVERS))
def test_run_equals_diffusers(sampler: str, order: int, prediction: str, spacing: str, S: int) -> None:
    """diffusers' own step math, its sigma grid in float64 (precise): within 1e-5 (seen: 1.3e-6 at most)."""
    cfg = model_config(prediction)
    net, x = stand_in(cfg, prediction), x_T(S)
    plan, sched = ours(cfg, sampler, order, spacing, S), reference(cfg, sampler, order, spacing, S, precise=True)
    assert torch.equal(plan.timesteps, sched.timesteps)
    assert_relative(run_ours(plan, net, x), run_reference(sched, net, x))


@pytest.mark.parametrize("S", [1, 5, 25])
@pytest.mark.parametrize("prediction,spacing", RUNS)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("sampler", list(SOLVERS))
def test_run_equals_stock_diffusers(sampler: str, order: int, prediction: str, spacing: str, S: int) -> None:
    """Stock diffusers computes alpha_t, sigma_t from its float32 sigmas in float32. At the noisiest level
    (alpha_t ~ 0.006) x0 = (x - sigma_t eps) / alpha_t turns a one-ulp difference in sigma_t into ~1e-5 of x,
    which dominates a run of few eps-prediction steps (seen: 2e-4 at S = 1, 2e-5 at S = 5); elsewhere 1e-5."""
    cfg = model_config(prediction)
    net, x = stand_in(cfg, prediction), x_T(S)
    plan, sched = ours(cfg, sampler, order, spacing, S), reference(cfg, sampler, order, spacing, S)
    rtol = 3e-4 if prediction == "epsilon" and S <= 5 else RTOL
    assert_relative(run_ours(plan, net, x), run_reference(sched, net, x), rtol)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("sampler", list(SOLVERS))
def test_sample_prediction_equals_diffusers(sampler: str, order: int) -> None:
    cfg = model_config("sample")
    net, x = stand_in(cfg, "sample"), x_T()
    plan, sched = ours(cfg, sampler, order, "trailing", 10), reference(cfg, sampler, order, "trailing", 10, True)
    assert_relative(run_ours(plan, net, x), run_reference(sched, net, x))


@pytest.mark.parametrize("sampler", list(SOLVERS))
def test_state_mirrors_the_schedulers_memory(sampler: str) -> None:
    """After each step: history = the scheduler's model_outputs (newest first), lower_order_nums, and on UniPC
    this_order and last_sample."""
    cfg, S = model_config("epsilon"), 6
    net, x = stand_in(cfg, "epsilon"), x_T()
    plan, sched = ours(cfg, sampler, 3, "karras", S), reference(cfg, sampler, 3, "karras", S, precise=True)
    rows, state, y = SolverRows.from_plans([plan]), MultistepState.initial(x), x.clone()
    for k, t in enumerate(sched.timesteps):
        x = sched.step(net(x, t.view(1)), t, x).prev_sample
        out = multistep_update(y, net(y, t.view(1)), multistep_coefficients(rows, state), state)
        y, state = out.prev_sample, out.state
        kept = min(k + 1, 3)
        for i in range(kept):
            assert_relative(state.history[:, i], sched.model_outputs[-1 - i])
        assert int(state.lower_order_nums) == sched.lower_order_nums and int(state.step_index) == k + 1
        if sampler == "unipc":
            assert int(state.this_order) == sched.this_order
            assert_relative(state.last_sample, sched.last_sample)
    assert int(state.this_order) == 1  # lower_order_final: the last step is first order


# --- mixed batches -----------------------------------------------------------------------------------------------

MIX = [  # (sampler, order, prediction, spacing, S, the forward it joins at)
    ("dpmsolver++", 2, "epsilon", "leading", 10, 0), ("unipc", 3, "epsilon", "karras", 7, 0),
    ("unipc", 2, "v_prediction", "trailing", 5, 2), ("dpmsolver++", 3, "flow", "flow", 12, 1),
    ("unipc", 1, "flow", "flow", 4, 3), ("dpmsolver++", 1, "v_prediction", "linspace", 3, 4),
    ("unipc", 3, "epsilon", "linspace", 20, 1), ("dpmsolver++", 3, "epsilon", "karras", 25, 0),
    ("dpmsolver++", 2, "sample", "trailing", 1, 6), ("unipc", 2, "flow", "flow", 16, 5),
]


def test_mixed_batch_equals_each_row_alone() -> None:
    """Rows of both samplers, orders 1-3, several S, prediction types and paths, admitted at different forwards
    and dropped when done, advance in one update per forward; every forward also steps only a subset (put)."""
    plans = [ours(model_config(p), smp, o, sp, S) for smp, o, p, sp, S, _ in MIX]
    nets = [stand_in(model_config(p), p) for _, _, p, *_ in MIX]
    starts = [x_T(100 + i) for i in range(len(MIX))]
    alone = [run_ours(plan, net, x) for plan, net, x in zip(plans, nets, starts)]

    done: dict[int, torch.Tensor] = {}
    ids: list[int] = []
    rows: SolverRows | None = None
    state: MultistepState | None = None
    x = torch.empty(0, 1, 4, 4)
    forward = 0
    while len(done) < len(MIX):
        new = [i for i, m in enumerate(MIX) if m[-1] == forward]
        if new:
            new_rows, new_state = SolverRows.from_plans([plans[i] for i in new]), MultistepState.initial(
                torch.cat([starts[i] for i in new]))
            rows = new_rows if rows is None else rows.cat(new_rows)
            state = new_state if state is None else state.cat(new_state)
            x, ids = torch.cat([x, *(starts[i] for i in new)]), ids + new
        assert rows is not None and state is not None
        # odd forwards leave the batch's last row out (it waits a forward): a subset step, scattered back
        idx = torch.arange(len(ids) - (forward % 2 and len(ids) > 1))
        sub_rows, sub_state, sub_x = rows.select(idx), state.select(idx), x[idx]
        t = sub_rows.model_timesteps(sub_state.step_index)
        model_output = torch.cat([nets[ids[j]](sub_x[j:j + 1], t[j:j + 1]) for j in range(len(idx))])
        out = multistep_update(sub_x, model_output, multistep_coefficients(sub_rows, sub_state), sub_state)
        x, state = x.index_copy(0, idx, out.prev_sample), state.put(idx, out.state)
        finished = state.step_index >= rows.steps
        for j in finished.nonzero().squeeze(1).tolist():
            done[ids[j]] = x[j:j + 1]
        keep = (~finished).nonzero().squeeze(1)
        rows, state, x, ids = rows.select(keep), state.select(keep), x[keep], [ids[j] for j in keep.tolist()]
        forward += 1
    for i in range(len(MIX)):
        assert torch.equal(done[i], alone[i]), f"row {i} {MIX[i]}"
