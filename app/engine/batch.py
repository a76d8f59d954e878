"""The running batch: per-sample state held as tensors, so a step needs no per-sample Python loop
(the only loop left draws step noise from the per-sample generators that the seed contract names).

Samples of different shapes (latent sizes) share the batch: x holds each row flattened, zero-padded to the widest
row, so that the per-sample update (elementwise) runs on all rows at once; the forward runs once per shape
(rows_by_shape), on the rows viewed in their own shape. Each row carries its conditioning (cond) and its guided
row's unconditional input (uncond) as tensors, gathered per forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from app.engine.jobs import SampleJob
from app.models.conditioning import Cond, take
from app.sampling import (
    MultistepState,
    SolverPlan,
    SolverRows,
    StepCoefficients,
    coefficient_dtype,
    multistep_coefficients,
    multistep_update,
    step_coefficients,
)

# The solver columns of a DDIM row, once a batch holds multistep rows: never read, only kept aligned.
_NO_SOLVER = SolverPlan("dpmsolver++", 1, "epsilon", "vp", torch.zeros(1, dtype=torch.long), torch.tensor([1.0, 0.0]))


@dataclass
class Row:
    """One admitted sample: its job and its index within the job."""

    job: SampleJob
    index: int


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]), value=0)


COEFFICIENTS = len(StepCoefficients.__dataclass_fields__)  # a, s, a_next, c_eps, sigma, noise_std


def coefficient_table(a: torch.Tensor, s: torch.Tensor, steps: torch.Tensor, eta: torch.Tensor,
                      large: torch.Tensor) -> torch.Tensor:
    """Every step's coefficients of rows with levels a, s [n, width + 1] (zero-padded past each row's steps + 1):
    [n, COEFFICIENTS, width], step k's in column k (zero past the row's steps). The same elementwise float64 math as
    step_coefficients at each step, done once when the rows join."""
    coef = step_coefficients(a[:, :-1], s[:, :-1], a[:, 1:], s[:, 1:], eta[:, None], large[:, None])
    table = torch.stack([getattr(coef, f) for f in StepCoefficients.__dataclass_fields__], 1)
    valid = torch.arange(table.shape[2], device=table.device) < steps[:, None]
    return torch.where(valid[:, None], table, torch.zeros((), dtype=table.dtype, device=table.device))


class ActiveBatch:
    """x [B, width] (each row's sample flattened) plus each row's plan (every step's coefficients, from its levels,
    eta and variance kind, and network timesteps), position, clipping, conditioning and guidance scale. Once a
    multistep-solver row (DPM-Solver++, UniPC) joins, every row also has solver columns: its solver plan
    (SolverRows) and memory (MultistepState), placeholders on DDIM rows."""

    PER_ROW = ("coef", "model_t", "pos", "n_steps", "clip", "stochastic", "w", "guided", "multistep")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.coef_dtype = coefficient_dtype(device)
        self.cond: Cond = {}
        self.uncond: Cond = {}
        self.rows: list[Row] = []
        self.x: torch.Tensor | None = None
        def empty(dtype: torch.dtype, width: int | None = None) -> torch.Tensor:
            return torch.empty((0,) if width is None else (0, width), dtype=dtype, device=device)

        self.coef = torch.empty((0, COEFFICIENTS, 0), dtype=self.coef_dtype, device=device)
        self.model_t = empty(torch.float32, 0)
        self.pos, self.n_steps = (empty(torch.long) for _ in range(2))
        self.w = empty(self.coef_dtype)
        self.clip, self.stochastic, self.guided, self.multistep = (empty(torch.bool) for _ in range(4))
        self.solver_rows: SolverRows | None = None
        self.solver_state: MultistepState | None = None
        self._count()

    def _count(self) -> None:
        """Counts of the rows kept in Python, so that a step asks no tensor what they say."""
        jobs = [r.job for r in self.rows]
        self.n_guided = sum(j.guided for j in jobs)
        self.n_stochastic = sum(j.stochastic for j in jobs)
        self.n_clip = sum(bool(j.clip_denoised) for j in jobs)
        self.fewest_steps = min((j.steps for j in jobs), default=0)
        self.most_steps = max((j.steps for j in jobs), default=0)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def forward_rows(self) -> int:
        """Rows the next full forward holds: one per sample, two per guided sample."""
        return len(self.rows) + self.n_guided

    def add(self, rows: list[Row]) -> None:
        """Append newly admitted samples (a step boundary: every row is between steps)."""
        if not rows:
            return
        plans = [r.job.plan for r in rows]
        width = max([self.model_t.shape[1], *(p.steps for p in plans)])
        dev = self.device
        old = self.x is not None and len(self.rows) > 0
        numel = max([self.x.shape[1] if old and self.x is not None else 0, *(r.job.x[0].numel() for r in rows)])
        new_x = torch.stack([_pad(r.job.x[r.index].flatten().float(), numel) for r in rows])
        if dev.type == "cuda":  # a pinned host buffer makes the copy truly asynchronous
            new_x = new_x.pin_memory()
        new_x = new_x.to(dev, non_blocking=True)
        self.x = torch.cat([_pad(self.x, numel), new_x]) if old and self.x is not None else new_x
        self._add_cond(rows)

        def grow(old: torch.Tensor, new: list[torch.Tensor], w: int) -> torch.Tensor:
            return torch.cat([_pad(old, w), torch.stack([_pad(v, w) for v in new]).to(dev, old.dtype)])

        def extend(old: torch.Tensor, values: list[object]) -> torch.Tensor:
            return torch.cat([old, torch.tensor(values, dtype=old.dtype, device=dev)])

        jobs = [r.job for r in rows]
        a, s = (torch.stack([_pad(v, width + 1) for v in vs]).to(dev, self.coef_dtype)
                for vs in ([p.a for p in plans], [p.s for p in plans]))
        table = coefficient_table(a, s, torch.tensor([p.steps for p in plans], device=dev),
                                  torch.tensor([j.eta for j in jobs], dtype=self.coef_dtype, device=dev),
                                  torch.tensor([j.large for j in jobs], device=dev))
        self.coef = torch.cat([_pad(self.coef, width), table])
        self.model_t = grow(self.model_t, [p.model_t for p in plans], width)
        self.pos = extend(self.pos, [0] * len(rows))
        self.n_steps = extend(self.n_steps, [j.steps for j in jobs])
        self.clip = extend(self.clip, [j.clip_denoised for j in jobs])
        self.stochastic = extend(self.stochastic, [j.stochastic for j in jobs])
        self.w = extend(self.w, [j.guidance_scale for j in jobs])
        self.guided = extend(self.guided, [j.guided for j in jobs])
        self._add_solvers([j.solver for j in jobs], new_x)
        self.rows.extend(rows)
        self._count()

    def _add_solvers(self, plans: list[SolverPlan | None], new_x: torch.Tensor) -> None:
        """The solver columns of newly admitted rows (first creating them for the rows already here)."""
        self.multistep = torch.cat([self.multistep, torch.tensor([p is not None for p in plans], device=self.device)])
        if self.solver_rows is None:
            if all(p is None for p in plans):
                return
            assert self.x is not None
            old = len(self.rows)
            self.solver_rows = SolverRows.from_plans([_NO_SOLVER] * old, self.device) if old else None
            self.solver_state = MultistepState.initial(self.x[:old]) if old else None
        rows = SolverRows.from_plans([p or _NO_SOLVER for p in plans], self.device)
        state = MultistepState.initial(new_x)
        self.solver_rows = rows if self.solver_rows is None else self.solver_rows.cat(rows)
        if self.solver_state is not None and self.solver_state.last_sample.shape[1] < new_x.shape[1]:
            # a wider sample joined (rows are flattened and padded to the widest): the memory pads alike
            st, width = self.solver_state, new_x.shape[1]
            self.solver_state = MultistepState(_pad(st.history, width), _pad(st.last_sample, width),
                                               st.lower_order_nums, st.step_index, st.this_order)
        self.solver_state = state if self.solver_state is None else self.solver_state.cat(state)

    def multistep_step(self, idx: torch.Tensor, x: torch.Tensor,
                       model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One solver step of the multistep rows idx (their x and network outputs): (x', x0-hat); their memory is
        updated in place of the batch's columns."""
        assert self.solver_rows is not None and self.solver_state is not None
        rows, state = self.solver_rows.select(idx), self.solver_state.select(idx)
        out = multistep_update(x, model_output, multistep_coefficients(rows, state), state)
        self.solver_state = self.solver_state.put(idx, out.state)
        return out.prev_sample, out.pred_original_sample
    def _add_cond(self, rows: list[Row]) -> None:
        """Each new row's cond, and its uncond (its cond again where it is not guided: that slot is never read)."""
        def rows_of(which: str) -> Cond:
            conds = []
            for r in rows:
                c = getattr(r.job, which) if which == "cond" or r.job.uncond is not None else r.job.cond
                assert c is not None, "a job joins the batch once its conditioning is set"
                conds.append(take(c, [r.index]))
            return {k: torch.cat([c[k] for c in conds]).to(self.device, non_blocking=True) for k in conds[0]}

        for name in ("cond", "uncond"):
            new = rows_of(name)
            old = getattr(self, name)
            setattr(self, name, {k: torch.cat([old[k], v]) if len(self.rows) and k in old else v
                                 for k, v in new.items()})

    def shapes(self, idx: torch.Tensor | None = None) -> list[tuple[int, ...]]:
        """Each row's sample shape (rows idx only, when given)."""
        rows = self.rows if idx is None else [self.rows[i] for i in idx.tolist()]
        return [tuple(r.job.x.shape[1:]) for r in rows]

    def rows_by_shape(self, idx: torch.Tensor | None = None) -> list[tuple[tuple[int, ...], torch.Tensor | None]]:
        """The rows (positions within idx, or all rows) of each sample shape; None: every row has that shape."""
        shapes = self.shapes(idx)
        kinds = list(dict.fromkeys(shapes))
        if len(kinds) == 1:
            return [(kinds[0], None)]
        return [(k, torch.tensor([i for i, s in enumerate(shapes) if s == k], device=self.device)) for k in kinds]

    def _pick(self, t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return t if idx is None else t.index_select(0, idx)

    def timesteps(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The timestep each row's network call sees this step, [B] (rows idx only, when given)."""
        return self._pick(self.model_t, idx).gather(1, self._pick(self.pos, idx)[:, None]).squeeze(1)

    def coefficients(self, idx: torch.Tensor | None = None) -> StepCoefficients:
        """This step's coefficients for rows idx: sampling's step_coefficients of each row's levels here and next
        (from the table made when the rows joined)."""
        pos = self._pick(self.pos, idx)[:, None, None].expand(-1, COEFFICIENTS, 1)
        return StepCoefficients(*self._pick(self.coef, idx).gather(2, pos).squeeze(2).unbind(1))

    def inputs(self, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | bool]:
        """(x, timesteps, clip flags) of the rows idx (all rows when None); the flags are False when no row
        clips."""
        assert self.x is not None
        return self._pick(self.x, idx), self.timesteps(idx), self._pick(self.clip, idx) if self.n_clip else False

    def conditioning(self, idx: torch.Tensor | None = None) -> tuple[Cond, Cond, torch.Tensor, torch.Tensor]:
        """(cond, uncond, guided flags, guidance scales) of rows idx."""
        cond = self.cond if idx is None else take(self.cond, idx)
        uncond = self.uncond if idx is None else take(self.uncond, idx)
        return cond, uncond, self._pick(self.guided, idx), self._pick(self.w, idx)

    def noise(self, idx: torch.Tensor | None = None) -> torch.Tensor | None:
        """This step's noise for rows idx: one draw from each stochastic row's own generator, in step order."""
        if self.x is None or not self.n_stochastic:
            return None
        stochastic = self._pick(self.stochastic, idx)
        if not bool(stochastic.any()):
            return None
        rows = stochastic.nonzero().squeeze(1).tolist()  # the loop runs over stochastic rows only
        order = None if idx is None else idx.tolist()
        width = self.x.shape[1]
        noise = torch.zeros((len(stochastic), width), dtype=torch.float32, pin_memory=self.device.type == "cuda")
        for k in rows:
            r = self.rows[k if order is None else order[k]]
            assert r.job.generators is not None
            z = torch.randn((1, *r.job.x.shape[1:]), generator=r.job.generators[r.index]).flatten()
            noise[k, :z.numel()] = z
        return noise.to(self.device, non_blocking=True)

    def advance(self, x_next: torch.Tensor, idx: torch.Tensor | None = None) -> list[Row]:
        """Store the step's result for rows idx (all when None), move them one step on; returns (and drops)
        the rows that finished."""
        if idx is None:
            self.x, self.pos = x_next, self.pos + 1
        else:
            assert self.x is not None
            self.x = self.x.index_copy(0, idx, x_next.to(self.x.dtype))
            self.pos = self.pos.index_add(0, idx, torch.ones_like(idx))
        done = self.pos >= self.n_steps
        if not bool(done.any()):
            return []
        finished = [r for r, d in zip(self.rows, done.tolist()) if d]
        out = self.x[done].float().cpu()
        for r, xi in zip(finished, out):
            r.job.out[r.index] = xi[:r.job.out[r.index].numel()].view_as(r.job.out[r.index])
        self.keep(~done)
        return finished

    def keep(self, mask: torch.Tensor) -> None:
        """Keep only the rows where mask is True."""
        mask = mask.to(self.device)
        idx = mask.nonzero().squeeze(1)
        keep_list = mask.tolist()
        self.rows = [r for r, k in zip(self.rows, keep_list) if k]
        if self.x is not None:
            self.x = self.x.index_select(0, idx)
        for name in self.PER_ROW:
            setattr(self, name, getattr(self, name).index_select(0, idx))
        if self.solver_rows is not None and self.solver_state is not None:  # a row's history leaves with it
            if not bool(self.multistep.any()):
                self.solver_rows = self.solver_state = None
            else:
                self.solver_rows, self.solver_state = self.solver_rows.select(idx), self.solver_state.select(idx)
        self.cond, self.uncond = take(self.cond, idx), take(self.uncond, idx)
        self._count()
