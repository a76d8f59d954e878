"""What the engine works on: a SampleJob is one request's n samples, all with the same plan."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from app.engine.errors import EngineError, JobCancelled, QueueFull
from app.models.conditioning import Cond
from app.sampling import Direction, Plan, SolverPlan, is_stochastic

__all__ = ["EngineError", "JobCancelled", "JobResult", "QueueFull", "SampleJob"]

_ids = itertools.count()


@dataclass(frozen=True)
class JobResult:
    """The final samples (x_0 for generation, x_T for inversion) and where the time went."""

    x: torch.Tensor
    queue_seconds: float
    compute_seconds: float


@dataclass(eq=False)
class SampleJob:
    """n samples that walk one plan (levels and network timesteps) in one direction.

    x is x_T [n, C, H, W] for generation, the clean images for inversion. With eta > 0 or
    large variance, generators hold one torch.Generator per sample (the seed contract).
    class_labels [n] are a conditional model's labels (None: its null label, unconditional); with a
    guidance_scale other than 1 each sample also gets an unconditional row in the same forward.
    A text model's job gives texts [n] (and negative_texts [n] when guided). The worker turns labels or texts into
    cond [n, ...], what each row's forward is conditioned on (per denoiser keyword), and uncond, the unconditional
    row's input of a guided sample, when it admits the job (texts of jobs admitted together: one encode).
    x is in the stepper's space (latents for a latent pipeline): with decode, the worker decodes the final samples
    into images when the job finishes.
    """

    direction: Direction
    x: torch.Tensor
    plan: Plan
    eta: float = 0.0
    large: bool = False
    clip_denoised: bool = False
    generators: list[torch.Generator] | None = None
    endpoint: str | None = "generate"  # whose output these samples are (ddim_images_total); None: a step on the way
    tag: str = ""  # the request's id, for the log
    class_labels: torch.Tensor | None = None
    guidance_scale: float = 1.0
    solver: SolverPlan | None = None  # a multistep sampler's plan (plan then holds its levels); None: DDIM
    cond: Cond | None = None  # set at admission
    uncond: Cond | None = None
    texts: list[str] | None = None
    negative_texts: list[str] | None = None
    decode: bool = False
    images: torch.Tensor | None = None  # the decoded final samples, with decode
    # progress: called from the worker thread after each step with (steps done, x0 predictions or None); the x0
    # predictions [n, C, H, W] come every preview_every steps (0: never)
    on_progress: Callable[[int, torch.Tensor | None], None] | None = None
    preview_every: int = 0
    id: int = field(default_factory=lambda: next(_ids))
    submitted_at: float = field(default_factory=time.monotonic)
    future: Future[JobResult] = field(default_factory=Future)
    # filled in by the worker
    first_step_at: float | None = None
    submitted: bool = False
    reported: int = 0  # steps last passed to on_progress
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
        return self.plan.steps

    @property
    def stochastic(self) -> bool:
        return self.direction == "generate" and is_stochastic(self.eta, self.large)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance: a conditional and an unconditional row per sample."""
        return self.guidance_scale != 1.0 and (self.class_labels is not None or self.texts is not None)

    @property
    def rows_per_sample(self) -> int:
        return 2 if self.guided else 1


def resolve(job: SampleJob, result: JobResult | None = None, error: BaseException | None = None) -> None:
    """Settle a job's future once; a future already settled (or cancelled) is left as it is."""
    try:
        if not job.future.done():
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:
        pass
