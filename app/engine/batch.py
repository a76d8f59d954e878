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
        self.stochastic: list[int] = []

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
        new_x = torch.stack([r.job.x[r.index] for r in rows]).to(dev, non_blocking=True)
        self.x = new_x if self.x is None or not len(self.rows) else torch.cat([self.x, new_x])
        self.levels = torch.cat([pad(self.levels, width + 1),
                                 torch.stack([pad(p[0], width + 1) for p in paths]).to(dev)])
        self.model_t = torch.cat([pad(self.model_t, width), torch.stack([pad(p[1], width) for p in paths]).to(dev)])
        self.pos = torch.cat([self.pos, torch.zeros(len(rows), dtype=torch.long, device=dev)])
        self.n_steps = torch.cat([self.n_steps, torch.tensor([r.job.steps for r in rows], device=dev)])
        self.eta = torch.cat([self.eta, torch.tensor([r.job.eta for r in rows], dtype=self.coef_dtype, device=dev)])
        self.large = torch.cat([self.large, torch.tensor([r.job.large for r in rows], device=dev)])
        self.clip = torch.cat([self.clip, torch.tensor([r.job.clip_denoised for r in rows], device=dev)])
        self.rows.extend(rows)
        self._index_stochastic()

    def _index_stochastic(self) -> None:
        self.stochastic = [i for i, r in enumerate(self.rows) if r.job.stochastic]

    def timesteps(self) -> torch.Tensor:
        """The timestep each row's network call sees this step, [B]."""
        return self.model_t.gather(1, self.pos[:, None]).squeeze(1)

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha-bar at x's level, at the target level, sigma, noise std), each [B] float64."""
        here = self.levels.gather(1, self.pos[:, None]).squeeze(1)
        there = self.levels.gather(1, (self.pos + 1)[:, None]).squeeze(1)
        alpha, alpha_next = alpha_at(self.alphas_cumprod, here), alpha_at(self.alphas_cumprod, there)
        sigma, noise_std = step_sigmas(alpha, alpha_next, self.eta, self.large)
        return alpha, alpha_next, sigma, noise_std

    def noise(self) -> torch.Tensor | None:
        """This step's noise: one draw from each stochastic row's own generator, in step order."""
        if not self.stochastic or self.x is None:
            return None
        shape = (1, *self.x.shape[1:])
        noise = torch.zeros(self.x.shape, dtype=torch.float32, pin_memory=self.device.type == "cuda")
        for i in self.stochastic:
            r = self.rows[i]
            noise[i] = torch.randn(shape, generator=r.job.generators[r.index])[0]  # type: ignore[index]
        return noise.to(self.device, non_blocking=True)

    def advance(self, x_next: torch.Tensor) -> list[Row]:
        """Store the step's result, move every row one step on; returns (and drops) finished rows."""
        self.x = x_next
        self.pos = self.pos + 1
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
        for name in ("levels", "model_t", "pos", "n_steps", "eta", "large", "clip"):
            setattr(self, name, getattr(self, name).index_select(0, idx))
        self._index_stochastic()
