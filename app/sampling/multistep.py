"""Multistep solvers (DPM-Solver++ and UniPC) with their memory as per-row state, so rows share one update.

diffusers keeps a solver's memory on the scheduler object (model_outputs, lower_order_nums, last_sample,
this_order, step_index); here it is columns of the batch (MultistepState), and each row's plan is columns too
(SolverRows). One call advances rows at different steps, orders, step counts, samplers and prediction types.

Every step is written as one linear combination per row,

    x' = c_x x~ + c_0 x0_k + sum_i c_i x0_{k-i},   x~ = x, or UniC's corrected x on UniPC rows,

whose [B] weights (float64) follow from the row's lambda grid and its order this step (multistep_coefficients).
Shapes: x and model_output [B, C, H, W]; history [B, 3, C, H, W].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from app.sampling.multistep_plans import MAX_SOLVER_ORDER, SAMPLERS, SolverPlan
from app.sampling.step import PREDICTION_TYPES, coefficient_dtype, predict_x0_eps

DPM, UNIPC = SAMPLERS.index("dpmsolver++"), SAMPLERS.index("unipc")
HISTORY = MAX_SOLVER_ORDER  # x0 at k-1, k-2, k-3: UniC-3 at step k reaches back to x0_{k-3}


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] per-row values as a column broadcasting over x [B, ...], in x's dtype."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    """Widen [B, w] to [B, width], repeating the last column."""
    return torch.cat([t, t[:, -1:].expand(-1, width - t.shape[1])], 1) if width > t.shape[1] else t


@dataclass(frozen=True)
class SolverRows:
    """Each row's plan as batch columns, padded to the widest plan W: sampler (index into SAMPLERS), solver order,
    prediction type (index into PREDICTION_TYPES) and S, [B]; network timesteps [B, W] (int64); and the levels
    alpha_t, sigma_t, lambda_t [B, W + 1] in the coefficient dtype."""

    sampler: torch.Tensor
    order: torch.Tensor
    prediction: torch.Tensor
    steps: torch.Tensor
    timesteps: torch.Tensor
    alpha_t: torch.Tensor
    sigma_t: torch.Tensor
    lambda_t: torch.Tensor

    @classmethod
    def from_plans(cls, plans: Sequence[SolverPlan], device: torch.device | str = "cpu") -> SolverRows:
        dev = torch.device(device)
        width = max(p.steps for p in plans)
        levels = [p.levels() for p in plans]

        def ints(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=dev)

        def column(i: int) -> torch.Tensor:
            return torch.stack([_pad_to(lv[i][None], width + 1)[0] for lv in levels]).to(dev, coefficient_dtype(dev))

        return cls(ints([SAMPLERS.index(p.sampler) for p in plans]), ints([p.order for p in plans]),
                   ints([PREDICTION_TYPES.index(p.prediction_type) for p in plans]), ints([p.steps for p in plans]),
                   torch.stack([_pad_to(p.timesteps[None], width)[0] for p in plans]).to(dev),
                   column(0), column(1), column(2))

    def select(self, idx: torch.Tensor) -> SolverRows:
        """The rows idx (gather; also how a finished or cancelled row is dropped)."""
        return SolverRows(*(getattr(self, f.name).index_select(0, idx) for f in fields(self)))

    def cat(self, other: SolverRows) -> SolverRows:
        """These rows, then other's (admission), the plan columns padded to the wider of the two."""
        w = max(self.timesteps.shape[1], other.timesteps.shape[1])

        def widen(name: str, t: torch.Tensor) -> torch.Tensor:  # timesteps [B, W], levels [B, W + 1]
            return t if t.dim() == 1 else _pad_to(t, w if name == "timesteps" else w + 1)

        return SolverRows(*(torch.cat([widen(f.name, getattr(self, f.name)), widen(f.name, getattr(other, f.name))])
                            for f in fields(self)))

    def model_timesteps(self, step_index: torch.Tensor) -> torch.Tensor:
        """The network's timestep for each row at its step k, [B] int64."""
        k = step_index.clamp(max=self.timesteps.shape[1] - 1)[:, None]
        return self.timesteps.gather(1, k).squeeze(1)


@dataclass(frozen=True)
class MultistepState:
    """A row's solver memory as batch columns (diffusers' scheduler attributes, per row).

    history [B, 3, ...]: x0-hat of steps k-1, k-2, k-3 (slot 0 the newest; zeros before they exist);
    last_sample [B, ...]: the sample UniPC's last predictor started from (its corrector's base);
    lower_order_nums [B]: steps taken, capped at the solver order (the warm-up counter);
    step_index [B]: k, the step the row takes next; this_order [B]: the order of its last predictor
    (UniPC's corrector order this step), 0 before the first step.
    """

    history: torch.Tensor
    last_sample: torch.Tensor
    lower_order_nums: torch.Tensor
    step_index: torch.Tensor
    this_order: torch.Tensor

    @classmethod
    def initial(cls, x: torch.Tensor) -> MultistepState:
        """The empty memory of rows that start at x (step 0)."""
        n, zeros = x.shape[0], torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return cls(x.new_zeros((n, HISTORY, *x.shape[1:])), torch.zeros_like(x), zeros, zeros.clone(), zeros.clone())

    def select(self, idx: torch.Tensor) -> MultistepState:
        """The rows idx (gather; also how a finished or cancelled row is dropped)."""
        return MultistepState(*(getattr(self, f.name).index_select(0, idx) for f in fields(self)))

    def cat(self, other: MultistepState) -> MultistepState:
        """These rows, then other's (admission)."""
        return MultistepState(*(torch.cat([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)))

    def put(self, idx: torch.Tensor, rows: MultistepState) -> MultistepState:
        """This state with rows idx replaced by rows (scatter after updating a subset)."""
        return MultistepState(*(getattr(self, f.name).index_copy(0, idx, getattr(rows, f.name).to(
            getattr(self, f.name).dtype)) for f in fields(self)))


@dataclass(frozen=True)
class MultistepCoefficients:
    """One step's per-row weights, [B] in the coefficient dtype ([B, 3] for the history slots).

    Conversion to x0 at level k: alpha, sigma, prediction (codes). UniC on rows where corrected:
    x~ = d_last last_sample + d_new x0_k + sum_i d_hist[:, i] history[:, i]. The predictor:
    x' = c_x x~ + c_new x0_k + sum_i c_hist[:, i] history[:, i], of order `order` [B] (solver_order: the row's).
    """

    alpha: torch.Tensor
    sigma: torch.Tensor
    prediction: torch.Tensor
    corrected: torch.Tensor
    d_last: torch.Tensor
    d_new: torch.Tensor
    d_hist: torch.Tensor
    c_x: torch.Tensor
    c_new: torch.Tensor
    c_hist: torch.Tensor
    order: torch.Tensor
    solver_order: torch.Tensor


@dataclass(frozen=True)
class MultistepOutput:
    """x at the next level, the x0 predicted from this step's model output, and the rows' new memory."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor
    state: MultistepState


def _solve(rks: torch.Tensor, b: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """rho [B, 3] with sum_j rks_j^i rho_j = b_i for i, j < n per row, 0 beyond n (UniPC's R rho = b)."""
    i = torch.arange(HISTORY, device=rks.device)
    inside = (i[:, None] < n[:, None, None]) & (i[None, :] < n[:, None, None])
    powers = rks[:, None, :] ** i[None, :, None]
    eye = torch.eye(HISTORY, dtype=rks.dtype, device=rks.device).expand_as(powers)
    rhs = torch.where(i[None, :] < n[:, None], b, torch.zeros_like(b))
    rho: torch.Tensor = torch.linalg.solve(torch.where(inside, powers, eye), rhs)
    return rho


def _b_vector(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """UniPC's (b [B, 3], B(h)) with B(h) = e^{-h} - 1 (bh2, predicting x0): b_i = i! h phi_{i+1}(-h) / B(h)."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)
    h_phi_k, fact, bs = h_phi_1 / hh - 1, 1, []
    for i in range(1, HISTORY + 1):
        bs.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return torch.stack(bs, 1), b_h


def multistep_coefficients(rows: SolverRows, state: MultistepState) -> MultistepCoefficients:
    """The weights of each row's step k = state.step_index (the plan's levels k + 1, k, ..., k - 3).

    DPM-Solver++ (Lu et al. 2022b): DPM-Solver++(1) = DDIM, (2M) midpoint (Alg. 2), (3M); order
    min(solver order, warm-up + 1, 1 at the last step, 2 at the second-last when S < 15). UniPC (Zhao et al.
    2023), B(h) = e^{-h} - 1: UniC-p with p the last predictor's order, then UniP-p with
    p = min(solver order, S - k, warm-up + 1). rho_p = 1/2 for UniP-2 and rho_c = 1/2 for UniC-1, as diffusers.
    """
    k, S, order = state.step_index, rows.steps, rows.order
    width = rows.lambda_t.shape[1] - 1
    pos = (k[:, None] + 1 - torch.arange(5, device=k.device)[None, :]).clamp(0, width)  # k+1, k, ..., k-3
    lam, alpha, sigma = (v.gather(1, pos) for v in (rows.lambda_t, rows.alpha_t, rows.sigma_t))
    dpm, unipc = rows.sampler == DPM, rows.sampler == UNIPC
    one = torch.ones_like(k)

    cap = torch.where(k == S - 1, one, torch.where((k == S - 2) & (S < 15), 2 * one, 3 * one))
    p = torch.minimum(torch.minimum(order, state.lower_order_nums + 1), torch.where(dpm, cap, S - k))

    # predictor from level k to k + 1; order 1 is DPM-Solver++(1) = UniP-1 = DDIM
    h = lam[:, 0] - lam[:, 1]
    a_t = alpha[:, 0]
    big_a = -a_t * torch.expm1(-h)
    zero = torch.zeros_like(h)
    c_x, c_new, c_hist = sigma[:, 0] / sigma[:, 1], big_a, torch.zeros((len(k), HISTORY), dtype=h.dtype,
                                                                         device=h.device)
    r0, r1 = (lam[:, 1] - lam[:, 2]) / h, (lam[:, 2] - lam[:, 3]) / h
    # DPM-Solver++(2M): D1 = (x0_k - x0_{k-1}) / r0, x' -= 1/2 alpha_t (e^{-h} - 1) D1
    dpm2 = dpm & (p == 2)
    c_new = torch.where(dpm2, big_a + big_a / (2 * r0), c_new)
    c_hist[:, 0] = torch.where(dpm2, -big_a / (2 * r0), c_hist[:, 0])
    # DPM-Solver++(3M): D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0+r1)
    dpm3 = dpm & (p == 3)
    b1 = a_t * (torch.expm1(-h) / h + 1)
    b2 = -a_t * ((torch.expm1(-h) + h) / h**2 - 0.5)
    on_d10 = b1 * (1 + r0 / (r0 + r1)) + b2 / (r0 + r1)
    on_d11 = -b1 * r0 / (r0 + r1) - b2 / (r0 + r1)
    c_new = torch.where(dpm3, big_a + on_d10 / r0, c_new)
    c_hist[:, 0] = torch.where(dpm3, -on_d10 / r0 + on_d11 / r1, c_hist[:, 0])
    c_hist[:, 1] = torch.where(dpm3, -on_d11 / r1, c_hist[:, 1])
    # UniP-p: x' -= alpha_t B(h) sum_i rho_i (x0_{k-i} - x0_k) / r_i, r_i = (lambda_{k-i} - lambda_k) / h
    rks = torch.stack([(lam[:, 1 + i] - lam[:, 1]) / h for i in (1, 2)] + [torch.ones_like(h)], 1)
    b, b_h = _b_vector(h)
    n_p = torch.where(unipc & (p == 3), 2 * one, 0 * one)
    rho = _solve(rks, b, n_p)
    rho[:, 0] = torch.where(unipc & (p == 2), 0.5 * torch.ones_like(h), rho[:, 0])
    for i in range(HISTORY - 1):
        use = unipc & (p >= i + 2)
        w = a_t * b_h * rho[:, i] / rks[:, i]
        c_new = torch.where(use, c_new + w, c_new)
        c_hist[:, i] = torch.where(use, -w, c_hist[:, i])

    # UniC-p on UniPC rows past their first step: level k - 1 to k again, now with x0_k known
    pc = state.this_order
    corrected = unipc & (pc > 0)
    hc = lam[:, 1] - lam[:, 2]
    a_c = alpha[:, 1]
    rks_c = torch.stack([(lam[:, 2 + i] - lam[:, 2]) / hc for i in (1, 2)] + [torch.ones_like(hc)], 1)
    j = torch.arange(HISTORY, device=k.device)[None, :]
    rks_c = torch.where(j == (pc - 1)[:, None], 1.0, rks_c)  # (r_1, ..., r_{p-1}, 1)
    bc, bc_h = _b_vector(hc)
    rho_c = _solve(rks_c, bc, torch.where(corrected, pc, 0 * one))
    rho_c[:, 0] = torch.where(corrected & (pc == 1), 0.5 * torch.ones_like(hc), rho_c[:, 0])
    rho_last = rho_c.gather(1, (pc - 1).clamp(min=0)[:, None]).squeeze(1)
    d_new = -a_c * bc_h * rho_last
    d_h0 = -a_c * torch.expm1(-hc) + a_c * bc_h * rho_last
    d_hist = torch.zeros_like(c_hist)
    for i in range(1, HISTORY):
        use = corrected & (pc > i)
        w = a_c * bc_h * rho_c[:, i - 1] / rks_c[:, i - 1]
        d_h0 = torch.where(use, d_h0 + w, d_h0)
        d_hist[:, i] = torch.where(use, -w, zero)
    d_hist[:, 0] = torch.where(corrected, d_h0, zero)

    return MultistepCoefficients(
        alpha=alpha[:, 1], sigma=sigma[:, 1], prediction=rows.prediction, corrected=corrected,
        d_last=torch.where(corrected, sigma[:, 1] / sigma[:, 2], zero), d_new=torch.where(corrected, d_new, zero),
        d_hist=d_hist, c_x=c_x, c_new=c_new, c_hist=c_hist, order=p, solver_order=order)


def multistep_update(x: torch.Tensor, model_output: torch.Tensor, coef: MultistepCoefficients,
                     state: MultistepState) -> MultistepOutput:
    """One multistep step per row: x0_k from the model output at level k, UniC where due, then the predictor.

    coef is multistep_coefficients(rows, state) for the same rows; a row past its last step (k = S) has no
    next level and must have been dropped. The new state holds x0_k as the newest history, the (corrected)
    sample as last_sample, and k + 1.
    """
    x0, _ = predict_x0_eps(x, model_output, coef.alpha, coef.sigma, coef.prediction)
    hist = state.history

    def combine(base: torch.Tensor, c_base: torch.Tensor, c_new: torch.Tensor, c_hist: torch.Tensor) -> torch.Tensor:
        out = _col(c_base, x) * base + _col(c_new, x) * x0
        for i in range(HISTORY):
            out = out + _col(c_hist[:, i], x) * hist[:, i]
        return out

    x_c = torch.where(_col(coef.corrected, x).bool(),
                      combine(state.last_sample, coef.d_last, coef.d_new, coef.d_hist), x)
    prev = combine(x_c, coef.c_x, coef.c_new, coef.c_hist)
    new_state = MultistepState(
        history=torch.cat([x0[:, None], hist[:, :-1]], 1), last_sample=x_c,
        lower_order_nums=torch.minimum(state.lower_order_nums + 1, coef.solver_order),
        step_index=state.step_index + 1, this_order=coef.order)
    return MultistepOutput(prev_sample=prev, pred_original_sample=x0, state=new_state)
