"""The tasks that start from real images, each as engine jobs:

- invert: one inversion job under the images' condition (class labels, or prompts with CFG; guidance_scale 1 by
  default), then (return_reconstruction) a generation job back under the same condition;
- edit: an inversion job under the source condition for the first k steps of the plan (to level t_k), then a
  generation job over the same k steps back under the target condition (k = strength_steps(S, strength));
- img2img (generate with an image, SDEdit): the image put at t_k as x = a_k x0 + s_k eps, eps the seed contract's
  draw, then the last k steps of the plan under the request's condition.

A latent model's images are encoded first (the codec: the VAE posterior's mean, then (z - shift) * scale), in a
thread off the event loop; its jobs are queued once that is done, so a full queue fails such a task as a job (429)
rather than refusing it up front. A pixel model's first job is queued at once, as every other task's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import torch

from app.engine.errors import InvalidRequest
from app.engine.handle import Outcome, RequestHandle
from app.engine.inputs import pixel_shape, prompt_fields, sample_shape, texts_of
from app.engine.jobs import SampleJob
from app.engine.tasks import EditWork, Engine, GenerateWork, InvertWork, Prepared, _check_n, _echo, _listen
from app.models import LoadedModel
from app.sampling import strength_steps

DEFAULT_STRENGTH = 0.8  # img2img's and /edit's: diffusers' StableDiffusionImg2ImgPipeline default


@dataclass
class _Texts:
    """A condition's prompts, as texts_of reads them."""

    prompt: str | list[str] | None
    negative_prompt: str | list[str] | None
    width: int | None = None
    height: int | None = None


def check_images(model: LoadedModel, work: Any, images: torch.Tensor, field_name: str) -> torch.Tensor:
    """Images [n, C, H, W] in [-1, 1] of the shape the task's model and size take (the routes decode them so)."""
    want = pixel_shape(model, work)
    if tuple(images.shape[1:]) != want:
        raise InvalidRequest(field_name, f"{field_name} must be images of shape {want} (C, H, W) for model "
                                         f"{model.name!r}, got {tuple(images.shape[1:])}")
    if not bool(torch.isfinite(images).all()):
        raise InvalidRequest(field_name, f"{field_name} holds NaN or infinite values")
    return images.float()


def partial_steps(steps: int, strength: float) -> int:
    """k = int(S strength) as diffusers' img2img init_timestep; strength outside (0, 1] or k = 0 is a 422."""
    if not 0 < strength <= 1:
        raise InvalidRequest("strength", f"strength must be in (0, 1], got {strength}")
    k = strength_steps(steps, strength)
    if k == 0:
        raise InvalidRequest("strength", f"strength {strength} of {steps} steps is k = int({steps} x {strength}) = 0 "
                                         "steps: nothing would change; raise strength or steps")
    return k


async def encoded(model: LoadedModel, images: torch.Tensor) -> torch.Tensor:
    """The clean samples of images in the stepper's space: the images themselves, or their latents (off the loop)."""
    codec = model.codec
    if codec is None:
        return images
    return (await asyncio.to_thread(codec.encode, images)).cpu()


def _texts(model: LoadedModel, texts: tuple[list[str], list[str]] | None) -> dict[str, Any]:
    return {"prompts": None if texts is None else texts[0], "negative_prompts": None if texts is None else texts[1]}


def _pixels(job: SampleJob, x: torch.Tensor) -> torch.Tensor:
    """A generation's images: decoded on a latent model, else its samples."""
    return job.images if job.images is not None else x


def _mse_psnr(images: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: MSE of pixels in [0, 1] and PSNR (dB, peak 1)."""
    mse = (((images.clamp(-1, 1) - source) / 2) ** 2).flatten(1).mean(1)
    return mse, 10 * torch.log10(1 / mse.clamp(min=1e-12))


def prepare_invert(engine: Engine, model: LoadedModel, work: InvertWork) -> Prepared:
    n = int(work.images.shape[0])
    _check_n(engine, n, "images")
    images = check_images(model, work, work.images, "images")
    labels = engine.class_labels(model, work.class_label, n)
    texts, shape = texts_of(model, work, n), sample_shape(model, work)

    def inversion(x: torch.Tensor) -> SampleJob:
        job = engine.invert_job(model, x, steps=work.steps, schedule=work.schedule, class_labels=labels,
                                guidance_scale=work.w, shape=shape, **_texts(model, texts))
        job.preview_every = work.preview_every
        return job

    first = [inversion(images)] if model.codec is None else []
    if not first:
        inversion(torch.zeros(n, *shape))  # validated now: the real job waits for the encoder
    fields = {**_echo(model, work, labels), **prompt_fields(model, texts)}

    async def run(handle: RequestHandle) -> Outcome:
        job = first[0] if first else inversion(await encoded(model, images))
        x_T = await engine.run(model, _listen(job, handle), handle)
        tensors = {"x_T": x_T}
        if work.return_reconstruction:
            # the inversion never clips, so neither does its round trip (clipping x0 breaks the ODE's symmetry)
            back, _ = engine.generate_job(model, n=n, steps=work.steps, eta=0.0, large=False, schedule=work.schedule,
                                          seed=None, x_T=x_T, clip=False, class_labels=labels,
                                          guidance_scale=work.w, shape=shape, **_texts(model, texts))
            back.preview_every = work.preview_every
            x_0 = await engine.run(model, _listen(back, handle, offset=work.steps), handle)
            rec = _pixels(back, x_0)
            tensors["reconstruction"] = rec
            tensors["reconstruction_mse"], tensors["reconstruction_psnr"] = _mse_psnr(rec, images)
        engine.count_images(model, "invert", n)
        return Outcome(fields, tensors)

    return Prepared(model, work.steps * (2 if work.return_reconstruction else 1), run, first)


def _check_source(model: LoadedModel, work: EditWork) -> None:
    """The source condition: what the model can take, and a guidance scale that has a condition to guide."""
    if work.source_prompt is not None and model.conditioning != "text":
        raise InvalidRequest("source_prompt", f"model {model.name!r} has no text encoder: source_prompt has no "
                                              "effect on it; leave it out")
    if work.source_guidance_scale != 1 and model.conditioning != "text":
        if not model.conditional:
            raise InvalidRequest("source_guidance_scale", f"model {model.name!r} is not class-conditional: "
                                                          "source_guidance_scale has no effect on it; leave it out")
        if work.source_class_label is None:
            raise InvalidRequest("source_guidance_scale", "source_guidance_scale needs a source_class_label; give "
                                                          "one, or leave out source_guidance_scale")


def prepare_edit(engine: Engine, model: LoadedModel, work: EditWork) -> Prepared:
    n = int(work.images.shape[0])
    _check_n(engine, n, "images")
    images = check_images(model, work, work.images, "images")
    k = partial_steps(work.steps, work.strength)
    _check_source(model, work)
    if work.seed is not None and work.eta == 0:
        raise InvalidRequest("seed", "an edit with eta = 0 draws nothing, so seed has no effect; leave it out (or set "
                                     "eta > 0, whose noise it seeds)")
    seed = work.seed if work.seed is not None or work.eta == 0 else int(torch.randint(0, 2**31 - 1, (1,)).item())
    source_labels = engine.class_labels(model, work.source_class_label, n, "source_class_label")
    labels = engine.class_labels(model, work.class_label, n)
    source_texts = texts_of(model, _Texts(work.source_prompt, work.negative_prompt), n)
    texts, shape = texts_of(model, work, n), sample_shape(model, work)

    def inversion(x: torch.Tensor) -> SampleJob:
        job = engine.invert_job(model, x, steps=work.steps, schedule=work.schedule, class_labels=source_labels,
                                guidance_scale=work.source_guidance_scale, partial=k, shape=shape,
                                **_texts(model, source_texts))
        job.preview_every = work.preview_every
        return job

    def generation(x_t: torch.Tensor) -> SampleJob:
        # no clipping: the generation leg retraces the inversion's ODE, which never clips
        job, _ = engine.generate_job(model, n=n, steps=work.steps, eta=work.eta, large=False, schedule=work.schedule,
                                     seed=seed, x_T=x_t, clip=False, class_labels=labels, guidance_scale=work.w,
                                     shape=shape, partial=k, **_texts(model, texts))
        job.preview_every = work.preview_every
        return job

    first = [inversion(images)] if model.codec is None else []
    if not first:
        inversion(torch.zeros(n, *shape))
    generation(torch.zeros(n, *shape))  # validated now, built when the inversion is done
    fields = {**_echo(model, work, labels), **prompt_fields(model, texts), "n": n, "seed": seed, "eta": work.eta,
              "strength": work.strength, "strength_steps": k, "source_guidance_scale": work.source_guidance_scale}
    if source_labels is not None:
        fields["source_class_label"] = [model.class_names[int(i)] for i in source_labels]
    if source_texts is not None:
        fields["source_prompt"] = source_texts[0]

    async def run(handle: RequestHandle) -> Outcome:
        job = first[0] if first else inversion(await encoded(model, images))
        x_t = await engine.run(model, _listen(job, handle), handle)
        back = generation(x_t)
        x_0 = await engine.run(model, _listen(back, handle, offset=k), handle)
        engine.count_images(model, "edit", n)
        shown = {} if back.images is None else {"images": back.images}
        return Outcome(fields, {"x_T": x_t, "x_0": x_0, **shown})

    return Prepared(model, 2 * k, run, first)


def prepare_img2img(engine: Engine, model: LoadedModel, work: GenerateWork) -> Prepared:
    assert work.image is not None
    _check_n(engine, work.n, "n")
    if work.x_T is not None:
        raise InvalidRequest("x_T", "img2img starts from the image at level t_k: give image or x_T, not both")
    if work.sampler != "ddim":
        raise InvalidRequest("sampler", "img2img runs DDIM's steps from level t_k: use sampler 'ddim' with an image, "
                                        f"not {work.sampler!r}")
    image = check_images(model, work, work.image, "image")
    if image.shape[0] != 1:
        raise InvalidRequest("image", f"image is one image; got {image.shape[0]}")
    strength = DEFAULT_STRENGTH if work.strength is None else work.strength
    k = partial_steps(work.steps, strength)
    seed = work.seed if work.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
    labels = engine.class_labels(model, work.class_label, work.n)
    texts, shape = texts_of(model, work, work.n), sample_shape(model, work)

    def job_from(x0: torch.Tensor) -> SampleJob:
        job, _ = engine.generate_job(model, n=work.n, steps=work.steps, eta=work.eta, large=work.variance == "large",
                                     schedule=work.schedule, seed=seed, clip=work.clip_denoised, class_labels=labels,
                                     guidance_scale=work.w, shape=shape, solver_order=work.solver_order, partial=k,
                                     start=x0.expand(work.n, *shape), **_texts(model, texts))
        job.preview_every = work.preview_every
        return job

    first = [job_from(image)] if model.codec is None else []
    if not first:
        job_from(torch.zeros(1, *shape))
    fields = {**_echo(model, work, labels), **prompt_fields(model, texts), "seed": seed, "n": work.n,
              "eta": work.eta, "variance": work.variance, "strength": strength, "strength_steps": k}

    async def run(handle: RequestHandle) -> Outcome:
        job = first[0] if first else job_from(await encoded(model, image))
        x_T = job.x.clone()
        x_0 = await engine.run(model, _listen(job, handle), handle)
        engine.count_images(model, "generate", work.n)
        shown = {} if job.images is None else {"images": job.images}
        return Outcome(fields, {"x_T": x_T, "x_0": x_0, **shown})

    return Prepared(model, k, run, first)


__all__ = ["DEFAULT_STRENGTH", "check_images", "encoded", "partial_steps", "prepare_edit", "prepare_img2img",
           "prepare_invert"]
