"""What the engine works on: a SampleJob is one request's n samples, all with the same plan."""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

import torch

Direction = Literal["generate", "invert"]
_ids = itertools.count()


class EngineError(RuntimeError):
    """Base of the engine's own errors."""


class QueueFull(EngineError):
    """Admission would exceed the model's bound on waiting + active samples."""

    def __init__(self, model: str, retry_after: float) -> None:
        super().__init__(f"the queue of model {model!r} is full; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class JobCancelled(EngineError):
    """The job was cancelled before it finished."""


@dataclass(frozen=True)
class JobResult:
    """The final samples (x_0 for generation, x_T for inversion) and where the time went."""

    x: torch.Tensor
    queue_seconds: float
    compute_seconds: float


@dataclass(eq=False)
class SampleJob:
    """n samples that walk one timestep sequence (ascending tau_1..tau_S) in one direction.

    x is x_T [n, C, H, W] for generation, the clean images for inversion. With eta > 0 or
    large variance, generators hold one torch.Generator per sample (the seed contract).
    """

    direction: Direction
    x: torch.Tensor
    timesteps: torch.Tensor
    eta: float = 0.0
    large: bool = False
    clip_denoised: bool = False
    generators: list[torch.Generator] | None = None
    endpoint: str | None = "generate"  # whose output these samples are (ddim_images_total); None: a step on the way
    id: int = field(default_factory=lambda: next(_ids))
    submitted_at: float = field(default_factory=time.monotonic)
    future: Future[JobResult] = field(default_factory=Future)
    # filled in by the worker
    first_step_at: float | None = None
    remaining: int = 0
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.remaining = self.n
        self.out = torch.empty_like(self.x, device="cpu", dtype=torch.float32)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def stochastic(self) -> bool:
        return self.direction == "generate" and (self.eta > 0 or self.large)

    def path(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels [S + 1], model timesteps [S]): x moves levels[k] -> levels[k + 1] at step k,
        the network is called at model_t[k]; level -1 is the clean end (alpha-bar = 1)."""
        seq = self.timesteps.long()
        clean = torch.tensor([-1])
        if self.direction == "generate":
            desc = seq.flip(0)
            return torch.cat([desc, clean]), desc
        return torch.cat([clean, seq]), seq
