"""The running batch: per-sample state held as tensors, so a step needs no per-sample Python loop
(the only loop left draws step noise from the per-sample generators that the seed contract names).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from app.engine.jobs import SampleJob
from app.sampling import alpha_at, step_sigmas


@dataclass
class Row:
    """One admitted sample: its job and its index within the job."""

    job: SampleJob
    index: int


class ActiveBatch:
    """x [B, C, H, W] plus each row's path, position, eta, variance kind and clipping."""

    def __init__(self, alphas_cumprod: torch.Tensor, device: torch.device) -> None:
        self.device = device
        self.coef_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.alphas_cumprod = alphas_cumprod.to(device, self.coef_dtype)
        self.rows: list[Row] = []
        self.x: torch.Tensor | None = None
        self.levels = torch.empty(0, 1, dtype=torch.long, device=device)
        self.model_t = torch.empty(0, 1, dtype=torch.long, device=device)
        self.pos = torch.empty(0, dtype=torch.long, device=device)
        self.n_steps = torch.empty(0, dtype=torch.long, device=device)
        self.eta = torch.empty(0, dtype=self.coef_dtype, device=device)
        self.large = torch.empty(0, dtype=torch.bool, device=device)
        self.clip = torch.empty(0, dtype=torch.bool, device=device)
        self.stochastic = torch.empty(0, dtype=torch.bool, device=device)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list[Row]) -> None:
        """Append newly admitted samples (a step boundary: every row is between steps)."""
        if not rows:
            return
        paths = [r.job.path() for r in rows]
        width = max([self.model_t.shape[1], *(p[1].numel() for p in paths)])
        pad = lambda t, w: F.pad(t, (0, w - t.shape[-1]), value=-1)  # noqa: E731
        dev = self.device
        new_x = torch.stack([r.job.x[r.index] for r in rows])
        if dev.type == "cuda":  # a pinned host buffer makes the copy truly asynchronous
            new_x = new_x.pin_memory()
        new_x = new_x.to(dev, non_blocking=True)
        self.x = new_x if self.x is None or not len(self.rows) else torch.cat([self.x, new_x])
        self.levels = torch.cat([pad(self.levels, width + 1),
                                 torch.stack([pad(p[0], width + 1) for p in paths]).to(dev)])
        self.model_t = torch.cat([pad(self.model_t, width), torch.stack([pad(p[1], width) for p in paths]).to(dev)])
        self.pos = torch.cat([self.pos, torch.zeros(len(rows), dtype=torch.long, device=dev)])
        self.n_steps = torch.cat([self.n_steps, torch.tensor([r.job.steps for r in rows], device=dev)])
        self.eta = torch.cat([self.eta, torch.tensor([r.job.eta for r in rows], dtype=self.coef_dtype, device=dev)])
        self.large = torch.cat([self.large, torch.tensor([r.job.large for r in rows], device=dev)])
        self.clip = torch.cat([self.clip, torch.tensor([r.job.clip_denoised for r in rows], device=dev)])
        self.stochastic = torch.cat([self.stochastic, torch.tensor([r.job.stochastic for r in rows], device=dev)])
        self.rows.extend(rows)

    def _pick(self, t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return t if idx is None else t.index_select(0, idx)

    def timesteps(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The timestep each row's network call sees this step, [B] (rows idx only, when given)."""
        return self._pick(self.model_t, idx).gather(1, self._pick(self.pos, idx)[:, None]).squeeze(1)

    def coefficients(self, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(alpha-bar at x's level, at the target level, sigma, noise std), each [B] float64."""
        pos, levels = self._pick(self.pos, idx)[:, None], self._pick(self.levels, idx)
        here, there = levels.gather(1, pos).squeeze(1), levels.gather(1, pos + 1).squeeze(1)
        alpha, alpha_next = alpha_at(self.alphas_cumprod, here), alpha_at(self.alphas_cumprod, there)
        sigma, noise_std = step_sigmas(alpha, alpha_next, self._pick(self.eta, idx), self._pick(self.large, idx))
        return alpha, alpha_next, sigma, noise_std

    def inputs(self, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, timesteps, clip flags) of the rows idx (all rows when None)."""
        assert self.x is not None
        return self._pick(self.x, idx), self.timesteps(idx), self._pick(self.clip, idx)

    def noise(self, idx: torch.Tensor | None = None) -> torch.Tensor | None:
        """This step's noise for rows idx: one draw from each stochastic row's own generator, in step order."""
        stochastic = self._pick(self.stochastic, idx)
        if self.x is None or not bool(stochastic.any()):
            return None
        rows = stochastic.nonzero().squeeze(1).tolist()  # the loop runs over stochastic rows only
        order = None if idx is None else idx.tolist()
        shape = (1, *self.x.shape[1:])
        noise = torch.zeros((len(stochastic), *shape[1:]), dtype=torch.float32, pin_memory=self.device.type == "cuda")
        for k in rows:
            r = self.rows[k if order is None else order[k]]
            noise[k] = torch.randn(shape, generator=r.job.generators[r.index])[0]  # type: ignore[index]
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
            r.job.out[r.index] = xi
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
        for name in ("levels", "model_t", "pos", "n_steps", "eta", "large", "clip", "stochastic"):
            setattr(self, name, getattr(self, name).index_select(0, idx))
