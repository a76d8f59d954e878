"""The three tasks a client can ask for, and how each runs as engine jobs.

- generate: one generation job from x_T (drawn from the seed, or given);
- invert: one inversion job, then (return_reconstruction) a generation job from its x_T;
- interpolate: the image ends inverted (one job each, side by side), slerp or lerp between the two latents,
  then one generation job over the frames;
- edit, and generate from an image (img2img): the tasks that start from real images (app/engine/editing.py, which
  also prepares invert).

Everything a task needs is validated by prepare(), before any job is queued: a bad request never costs a step.
On a latent pipeline x_T and x_0 are latents, and the images (the worker decodes them) come beside them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from app.config import Settings
from app.engine.errors import InvalidRequest
from app.engine.handle import Outcome, RequestHandle
from app.engine.inputs import prompt_fields, sample_shape, texts_of
from app.engine.jobs import SampleJob
from app.models import LoadedModel
from app.sampling import Direction, Plan, SolverPlan, Spacing, draw, lerp, sample_generators, slerp

__all__ = ["EditWork", "End", "GenerateWork", "InterpolateWork", "InvertWork", "Prepared", "Spacing", "Work",
           "prepare"]

ClassLabel = int | str | list[int | str] | None
Text = str | list[str] | None


class Engine(Protocol):
    """What a task needs of the engine (app/engine/client.py implements it): its models, validated jobs, and a way
    to run a job to its samples. A protocol, so that this module does not import the client that imports it."""

    settings: Settings

    def model(self, name: str | None) -> LoadedModel: ...

    def check_steps(self, model: LoadedModel, steps: int, schedule: str | None,
                    direction: Direction = "generate") -> Plan: ...

    def class_labels(self, model: LoadedModel, class_label: ClassLabel, n: int,
                     field: str = "class_label") -> torch.Tensor | None: ...

    def check_latents(self, model: LoadedModel, x: torch.Tensor, n: int, field: str,
                      shape: tuple[int, ...] | None = None) -> torch.Tensor: ...

    def check_solver(self, model: LoadedModel, sampler: str, steps: int, schedule: str | None, order: int | None,
                     eta: float, large: bool, clip: bool | None) -> tuple[SolverPlan, Plan]: ...

    def generate_job(self, model: LoadedModel, *, n: int, steps: int, eta: float, large: bool, schedule: str | None,
                     seed: int | None, x_T: torch.Tensor | None = None, clip: bool | None = None,
                     endpoint: str = "generate", class_labels: torch.Tensor | None = None,
                     guidance_scale: float = 1.0, shape: tuple[int, int, int] | None = None,
                     prompts: list[str] | None = None, negative_prompts: list[str] | None = None,
                     sampler: str = "ddim", solver_order: int | None = None, partial: int | None = None,
                     start: torch.Tensor | None = None) -> tuple[SampleJob, int | None]: ...

    def invert_job(self, model: LoadedModel, images: torch.Tensor, *, steps: int, schedule: str | None,
                   endpoint: str = "invert", class_labels: torch.Tensor | None = None,
                   guidance_scale: float = 1.0, prompts: list[str] | None = None,
                   negative_prompts: list[str] | None = None, partial: int | None = None,
                   shape: tuple[int, int, int] | None = None) -> SampleJob: ...

    async def run(self, model: LoadedModel, job: SampleJob, handle: RequestHandle | None = None) -> torch.Tensor: ...

    def count_images(self, model: LoadedModel, endpoint: str, n: int) -> None: ...


@dataclass
class _Common:
    model: str | None = None
    steps: int = 50
    schedule: str | None = None
    class_label: ClassLabel = None
    guidance_scale: float | None = None  # None: the model's default (its pipeline's; 1, no guidance, for UNet2DModel)
    preview_every: int = 0
    prompt: Text = None  # text models: one, or one per image
    negative_prompt: Text = None  # default ""
    width: int | None = None  # pixels; None: the model's default size
    height: int | None = None
    default_w: float = field(default=1.0, init=False)  # set by prepare: the model's default, where it applies

    @property
    def w(self) -> float:
        """The guidance scale this work runs with."""
        return self.default_w if self.guidance_scale is None else self.guidance_scale


@dataclass
class GenerateWork(_Common):
    n: int = 1
    sampler: str = "ddim"  # or "dpmsolver++", "unipc" (app/models/store.py SAMPLERS)
    solver_order: int | None = None  # the multistep samplers' order, 1-3 (default 2)
    eta: float = 0.0
    variance: Literal["eta", "large"] = "eta"
    seed: int | None = None
    x_T: torch.Tensor | None = None
    clip_denoised: bool | None = None
    image: torch.Tensor | None = None  # img2img: one image [1, C, H, W] in [-1, 1] (pixels, as the codec takes them)
    strength: float | None = None  # img2img: in (0, 1]; default 0.8 with an image
    task: str = field(default="generate", init=False)


@dataclass
class InvertWork(_Common):
    images: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [n, C, H, W] in [-1, 1]
    return_reconstruction: bool = False
    task: str = field(default="invert", init=False)


@dataclass
class EditWork(_Common):
    """Invert images under the source condition for the first k = strength_steps(S, strength) steps, then generate
    the same k steps back under the target (the _Common prompt / class_label / guidance_scale)."""

    images: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [n, C, H, W] pixels in [-1, 1]
    strength: float = 0.8
    eta: float = 0.0
    seed: int | None = None
    source_prompt: Text = None
    source_class_label: ClassLabel = None
    source_guidance_scale: float = 1.0
    task: str = field(default="edit", init=False)


@dataclass
class End:
    """One end of an interpolation: a seed, a latent x_T [C, H, W], or an image [C, H, W] to invert."""

    seed: int | None = None
    x_T: torch.Tensor | None = None
    image: torch.Tensor | None = None


@dataclass
class InterpolateWork(_Common):
    start: End = field(default_factory=End)
    end: End = field(default_factory=End)
    frames: int = 8
    method: Literal["slerp", "lerp"] = "slerp"
    sampler: str = "ddim"
    solver_order: int | None = None
    task: str = field(default="interpolate", init=False)


Work = GenerateWork | InvertWork | InterpolateWork | EditWork


@dataclass
class Prepared:
    """A validated task: its model, total steps (for progress), the jobs that start it (queued at once, so that a
    full queue is a 429 before anything else) and the coroutine factory that runs it."""

    model: LoadedModel
    steps: int
    run: Any  # Callable[[RequestHandle], Coroutine[Any, Any, Outcome]]
    first: list[SampleJob] = field(default_factory=list)
    n: int = 0  # images (or frames) the task makes


def _echo(model: LoadedModel, work: Work, labels: torch.Tensor | None) -> dict[str, Any]:
    sampler = getattr(work, "sampler", "ddim")
    out: dict[str, Any] = {"model": model.name, "steps": work.steps,
                           "schedule": work.schedule or model.schedule_for(sampler)}
    if not isinstance(work, InvertWork | EditWork):
        out["sampler"] = sampler
    if model.conditional:
        out["class_label"] = None if labels is None else [model.class_names[int(i)] for i in labels]
        out["guidance_scale"] = work.w
    if model.conditioning == "text":
        out["guidance_scale"] = work.w
    if model.codec is not None:
        _, h, w = sample_shape(model, work)
        out["width"], out["height"] = w * model.codec.factor, h * model.codec.factor
    return out


def prepare(engine: Engine, work: Work) -> Prepared:
    """Validate work against its model (raises InvalidRequest, UnknownModel); nothing is queued yet."""
    from app.engine import editing  # it builds on this module's types

    model = engine.model(work.model)
    if work.preview_every < 0:
        raise InvalidRequest("preview_every", "preview_every must be 0 (none) or a positive number of steps")
    if (model.conditioning == "text" or work.class_label is not None) and not isinstance(work, InvertWork):
        work.default_w = model.default_guidance  # inversion's default is 1, no guidance: the best round trip
    for name in ("width", "height"):
        if (getattr(work, name) or 0) ** 2 > engine.settings.max_image_pixels:
            raise InvalidRequest(name, f"{name} {getattr(work, name)} is past this server's size limit "
                                       f"(DDIM_MAX_IMAGE_PIXELS = {engine.settings.max_image_pixels} pixels)")
    if (work.width or 0) * (work.height or 0) > engine.settings.max_image_pixels:
        raise InvalidRequest("width", f"{work.width}x{work.height} is more than this server's "
                                      f"{engine.settings.max_image_pixels} pixels (DDIM_MAX_IMAGE_PIXELS)")
    _check_effective(model, work)
    if isinstance(work, GenerateWork) and work.image is not None:
        prepared = editing.prepare_img2img(engine, model, work)
    elif isinstance(work, GenerateWork):
        prepared = _prepare_generate(engine, model, work)
    elif isinstance(work, InvertWork):
        prepared = editing.prepare_invert(engine, model, work)
    elif isinstance(work, EditWork):
        prepared = editing.prepare_edit(engine, model, work)
    else:
        prepared = _prepare_interpolate(engine, model, work)
    prepared.n = _size(work)
    _check_work(engine, work, prepared)
    return prepared


def _size(work: Work) -> int:
    """The images a task makes: n, one per image inverted, or the frames."""
    if isinstance(work, GenerateWork):
        return work.n
    return work.frames if isinstance(work, InterpolateWork) else int(work.images.shape[0])  # invert, edit


def _check_effective(model: LoadedModel, work: Work) -> None:
    """A value that could not change the result is a 422 naming its field, not a silent no-op."""
    if model.conditioning != "text":
        for name in ("prompt", "negative_prompt"):
            if getattr(work, name) is not None:
                raise InvalidRequest(name, f"model {model.name!r} has no text encoder: {name} has no effect on it; "
                                           "leave it out")
    if model.codec is not None and isinstance(work, InterpolateWork):
        ends = [f"{name}.image" for name, e in (("start", work.start), ("end", work.end)) if e.image is not None]
        if ends:
            raise InvalidRequest(ends[0], f"model {model.name!r} is a latent pipeline: interpolating between image "
                                          "ends is not served for it; invert the images (/invert) and give x_T ends")
    sample_shape(model, work)
    if work.w != 1 and model.conditioning != "text":
        if not model.conditional:
            raise InvalidRequest("guidance_scale", f"model {model.name!r} is not class-conditional: guidance_scale "
                                                   "has no effect on it; leave it out")
        if work.class_label is None:
            raise InvalidRequest("guidance_scale", "guidance_scale needs a class_label: without one the samples are "
                                                   "unconditional and w has no effect; give class_label, or leave "
                                                   "out guidance_scale")
    if isinstance(work, GenerateWork):
        if work.strength is not None and work.image is None:
            raise InvalidRequest("strength", "strength is img2img's: give an image to start from, or leave it out")
        if work.variance == "large" and work.eta not in (0.0, 1.0):
            raise InvalidRequest("eta", "variance 'large' is the paper's sigma-hat row, whose mean is eta = 1's: "
                                        "eta has no effect with it; leave eta out")
        if work.x_T is not None and work.seed is not None and work.eta == 0 and work.variance == "eta":
            raise InvalidRequest("seed", "with x_T given and eta = 0 nothing is drawn, so seed has no effect; leave "
                                         "it out (or set eta > 0, whose noise it seeds)")


def _check_work(engine: Engine, work: Work, prepared: Prepared) -> None:
    """The work cap: samples x steps over the whole task, a guided sample counting twice."""
    n = prepared.n
    conditioned = work.class_label is not None or engine.model(work.model).conditioning == "text"
    rows = 2 if conditioned and work.w not in (0.0, 1.0) else 1
    cost, cap = n * prepared.steps * rows, engine.settings.max_work
    if cost > cap:
        field_name = {"generate": "n", "invert": "images", "interpolate": "frames", "edit": "images"}[work.task]
        raise InvalidRequest(field_name, f"this request is {cost} sample-steps ({n} samples x {prepared.steps} steps"
                                         f"{' x 2 rows for guidance' if rows == 2 else ''}); this server allows at "
                                         f"most {cap} (DDIM_MAX_WORK): ask for fewer samples or steps")


def _check_n(engine: Engine, n: int, field_name: str) -> None:
    s = engine.settings
    if n > s.max_n:
        raise InvalidRequest(field_name, f"{field_name} must be at most {s.max_n} on this server, got {n}")


def _prepare_generate(engine: Engine, model: LoadedModel, work: GenerateWork) -> Prepared:
    _check_n(engine, work.n, "n")
    labels = engine.class_labels(model, work.class_label, work.n)
    texts = texts_of(model, work, work.n)
    job, seed = engine.generate_job(model, n=work.n, steps=work.steps, eta=work.eta, large=work.variance == "large",
                                    schedule=work.schedule, seed=work.seed, x_T=work.x_T, clip=work.clip_denoised,
                                    class_labels=labels, guidance_scale=work.w, shape=sample_shape(model, work),
                                    prompts=None if texts is None else texts[0],
                                    negative_prompts=None if texts is None else texts[1], sampler=work.sampler,
                                    solver_order=work.solver_order)
    job.preview_every = work.preview_every
    x_T = job.x.clone()
    fields = {**_echo(model, work, labels), **prompt_fields(model, texts), "seed": seed, "n": work.n,
              "eta": work.eta, "variance": work.variance}

    async def run(handle: RequestHandle) -> Outcome:
        x_0 = await engine.run(model, _listen(job, handle), handle)
        engine.count_images(model, "generate", work.n)
        images = {} if job.images is None else {"images": job.images}
        return Outcome(fields, {"x_T": x_T, "x_0": x_0, **images})

    return Prepared(model, work.steps, run, [job])


def _end_latent(engine: Engine, model: LoadedModel, end: End, field_name: str,
                shape: tuple[int, int, int]) -> torch.Tensor | None:
    """The latent of a seed or x_T end [C, H, W]; None for an image end (it is inverted first)."""
    if end.seed is not None:
        return draw(sample_generators(end.seed, 1), shape)[0]
    if end.x_T is not None:
        x = end.x_T[None] if end.x_T.dim() == 3 else end.x_T
        return engine.check_latents(model, x, 1, f"{field_name}.x_T", shape)[0]
    return None


def _prepare_interpolate(engine: Engine, model: LoadedModel, work: InterpolateWork) -> Prepared:
    _check_n(engine, work.frames, "frames")
    if work.sampler == "ddim":
        engine.check_steps(model, work.steps, work.schedule)
        if work.solver_order is not None:
            raise InvalidRequest("solver_order", "solver_order is for the multistep samplers; leave it out for ddim")
    else:
        engine.check_solver(model, work.sampler, work.steps, work.schedule, work.solver_order, 0.0, False, None)
        if work.start.image is not None or work.end.image is not None:
            raise InvalidRequest("sampler", "image ends are inverted with DDIM, and only DDIM generates them back; "
                                            "use sampler 'ddim' with image ends")
    labels = engine.class_labels(model, work.class_label, work.frames)
    texts, shape = texts_of(model, work, work.frames), sample_shape(model, work)
    ends = {name: (end, _end_latent(engine, model, end, name, shape)) for name, end in (("start", work.start),
                                                                                         ("end", work.end))}
    inversions = {name: engine.invert_job(model, end.image[None], steps=work.steps, schedule=work.schedule,
                                          class_labels=None if labels is None else labels[[k]],
                                          guidance_scale=work.w)
                  for (name, (end, latent)), k in zip(ends.items(), (0, -1))
                  if latent is None and end.image is not None}
    fields = {**_echo(model, work, labels), **prompt_fields(model, texts), "frames": work.frames,
              "method": work.method}
    offset = work.steps if inversions else 0
    mix = slerp if work.method == "slerp" else lerp

    async def run(handle: RequestHandle) -> Outcome:
        inverted = await asyncio.gather(*(engine.run(model, _listen(j, handle), handle) for j in inversions.values()))
        latent: dict[str, torch.Tensor | None] = {name: latent for name, (_, latent) in ends.items()}
        latent |= {name: x[0] for name, x in zip(inversions, inverted)}
        x0, x1 = latent["start"], latent["end"]
        assert x0 is not None and x1 is not None
        latents = torch.stack([mix(x0, x1, i / (work.frames - 1)) for i in range(work.frames)])
        job, _ = engine.generate_job(model, n=work.frames, steps=work.steps, eta=0.0, large=False,
                                     schedule=work.schedule, seed=None, x_T=latents, class_labels=labels,
                                     guidance_scale=work.w, shape=shape, prompts=None if texts is None else texts[0],
                                     negative_prompts=None if texts is None else texts[1], sampler=work.sampler,
                                     solver_order=work.solver_order)
        job.preview_every = work.preview_every
        frames = await engine.run(model, _listen(job, handle, offset), handle)
        engine.count_images(model, "interpolate", work.frames)
        return Outcome(fields, {"frames": frames if job.images is None else job.images, "x_T": latents})

    return Prepared(model, offset + work.steps, run, list(inversions.values()))


def _listen(job: SampleJob, handle: RequestHandle, offset: int = 0) -> SampleJob:
    job.on_progress, job.tag = handle.progress_listener(asyncio.get_running_loop(), offset), handle.request_id
    return job
