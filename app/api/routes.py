"""HTTP routes: parse, hand to the engine, encode. No sampling logic lives here."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from math import prod
from typing import Annotated, Any, TypeVar

import torch
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import ValidationError

from app.api.codecs import b64decode, b64encode, decode_image, decode_npy
from app.api.errors import ClientGone, NotReady
from app.api.negotiate import GIF, JSON, NPY, PNG, negotiate
from app.api.schemas import Endpoint, GenerateRequest, InterpolateRequest, InvertRequest
from app.config import Settings
from app.engine.client import Engine, InvalidRequest
from app.engine.jobs import SampleJob
from app.images import gif_bytes, grid, npy_bytes, pil_images, png_bytes
from app.models import LoadedModel
from app.sampling import draw, sample_generators

router = APIRouter()


# async: FastAPI runs a plain-def dependency in its thread pool, which would cost each request two
# thread hops (and wake-ups beside the eps-network's threads) for an attribute lookup
async def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    if not engine.ready:
        raise NotReady(engine.error or "models are still loading")
    return engine


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


T = TypeVar("T")
INLINE_ELEMENTS = 4 * 32 * 32 * 3  # up to four 32x32 RGB images are encoded on the event loop itself
EngineDep = Annotated[Engine, Depends(_engine)]
SettingsDep = Annotated[Settings, Depends(_settings)]


def _model(engine: Engine, request: Request, name: str | None) -> LoadedModel:
    model = engine.model(name)
    request.state.model = model.name
    return model


async def _run(engine: Engine, request: Request, model: LoadedModel, job: SampleJob) -> torch.Tensor:
    """Run a job, cancelling it if the client goes away; its queue time adds to the request's log line."""
    run = asyncio.ensure_future(engine.run(model, job))
    gone = asyncio.ensure_future(_disconnect(request))  # waits on the connection; no polling
    try:
        await asyncio.wait({run, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not run.done():
        run.cancel()  # engine.run cancels the job in the worker
        await asyncio.gather(run, return_exceptions=True)
        raise ClientGone()
    result = run.result()
    request.state.queue_seconds = getattr(request.state, "queue_seconds", 0.0) + result.queue_seconds
    return result.x


async def _offload(small: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """CPU work off the event loop, in a worker thread; work on a few small images runs inline, where the
    thread hop would cost more than the work (and, on few cores, steal more from the eps-network)."""
    return fn(*args, **kwargs) if small else await asyncio.to_thread(fn, *args, **kwargs)


async def _disconnect(request: Request) -> None:
    """Returns when the client hangs up (the body is read by now, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.5)  # a server that answers with more (empty) body messages: poll slowly


def _conditioning(model: LoadedModel, labels: torch.Tensor | None, w: float) -> dict[str, Any]:
    """What a conditional model's response echoes: the classes by name, and w."""
    if not model.conditional:
        return {}
    names = None if labels is None else [model.class_names[int(i)] for i in labels]
    return {"class_label": names, "guidance_scale": w}


def _png_list(x: torch.Tensor) -> list[str]:
    return [b64encode(png_bytes(im)) for im in pil_images(x)]


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    if not engine.ready:
        raise NotReady(engine.error or "models are still loading")
    return {"status": "ready", "models": sorted(engine.models)}


@router.get("/models")
async def models(engine: EngineDep) -> dict[str, Any]:
    out = []
    for name, m in sorted(engine.models.items()):
        waiting, active = engine.workers[name].load
        out.append({**m.info(), "default": name == engine.default_name, "waiting": waiting, "active": active})
    return {"models": out}


def _generate_response(accept: str, out: dict[str, Any], x_T: torch.Tensor, x_0: torch.Tensor,
                       return_latents: bool) -> Any:
    """Encode a generation (CPU work: run it off the event loop)."""
    if accept == PNG:
        images = pil_images(x_0)
        return Response(png_bytes(images[0] if len(images) == 1 else grid(images)), media_type=PNG)
    if accept == NPY:
        return Response(npy_bytes(x_0), media_type=NPY)
    out["images"] = _png_list(x_0)
    if return_latents:
        out["x_T"], out["x_0"] = b64encode(npy_bytes(x_T)), b64encode(npy_bytes(x_0))
    return out


@router.post("/generate", responses={200: {"content": {PNG: {}, NPY: {}}}})
async def generate(body: GenerateRequest, request: Request, engine: EngineDep, settings: SettingsDep) -> Any:
    accept = negotiate(request, [JSON, PNG, NPY])
    request.state.params = {"n": body.n, "steps": body.steps, "eta": body.eta}
    model = _model(engine, request, body.model)
    if body.n > settings.max_n:
        raise InvalidRequest("n", f"n must be at most {settings.max_n} on this server")
    x_T = decode_npy(body.x_T, "x_T") if body.x_T is not None else None
    small = body.n * prod(model.sample_shape) <= INLINE_ELEMENTS
    labels = engine.class_labels(model, body.class_label, body.n)
    job, seed = await _offload(
        small, engine.generate_job, model, n=body.n, steps=body.steps, eta=body.eta, large=body.variance == "large",
        schedule=body.schedule, seed=body.seed, x_T=x_T, clip=body.clip_denoised, class_labels=labels,
        guidance_scale=body.guidance_scale)
    start = job.x.clone()
    x_0 = await _run(engine, request, model, job)
    out = {"model": model.name, "seed": seed, "n": body.n, "steps": body.steps, "eta": body.eta,
           "variance": body.variance, "schedule": body.schedule or model.spacings[0],
           **_conditioning(model, labels, body.guidance_scale)}
    return await _offload(small, _generate_response, accept, out, start, x_0, body.return_latents)


async def _invert_request(request: Request) -> tuple[InvertRequest, list[bytes]]:
    """JSON {images: [base64]} or a multipart form with files (other fields as form fields)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            async with request.form() as form:
                files = [await f.read() for f in form.getlist("files") if hasattr(f, "read")]
                fields = {k: v for k, v in form.items() if k != "files"}
        except (StarletteHTTPException, ValueError) as e:
            raise InvalidRequest("files", f"the multipart form cannot be read ({getattr(e, 'detail', e)})") from e
        data: Any = {**fields, "images": ["-"] * len(files)}
    else:
        try:
            data = await request.json()
        except ValueError as e:
            raise InvalidRequest("body", f"body is not valid JSON ({e})") from e
        files = None
    try:
        body = InvertRequest.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from e
    return body, files if files is not None else [b64decode(s, f"images.{i}") for i, s in enumerate(body.images)]


def _decode_images(raws: list[bytes], field: str, model: LoadedModel, max_pixels: int) -> torch.Tensor:
    return torch.stack([decode_image(r, f"{field}.{i}" if len(raws) > 1 or field == "images" else field,
                                     model.sample_shape, max_pixels) for i, r in enumerate(raws)])


@router.post("/invert", responses={200: {"content": {NPY: {}}}})
async def invert(request: Request, engine: EngineDep, settings: SettingsDep) -> Any:
    accept = negotiate(request, [JSON, NPY])
    body, raws = await _invert_request(request)
    request.state.params = {"n": len(raws), "steps": body.steps, "eta": 0.0}
    model = _model(engine, request, body.model)
    if len(raws) > settings.max_n:
        raise InvalidRequest("images", f"at most {settings.max_n} images per request on this server")
    labels = engine.class_labels(model, body.class_label, len(raws))
    images = await asyncio.to_thread(_decode_images, raws, "images", model, settings.max_image_pixels)
    x_T = await _run(engine, request, model, engine.invert_job(model, images, steps=body.steps,
                                                               schedule=body.schedule, class_labels=labels,
                                                               guidance_scale=body.guidance_scale))
    if accept == NPY:
        return Response(npy_bytes(x_T), media_type=NPY)
    out: dict[str, Any] = {"model": model.name, "steps": body.steps, "schedule": body.schedule or model.spacings[0],
                           **_conditioning(model, labels, body.guidance_scale), "x_T": b64encode(npy_bytes(x_T))}
    if body.return_reconstruction:
        # the inversion never clips, so neither does its round trip (clipping x0 breaks the ODE's symmetry)
        job, _ = engine.generate_job(model, n=len(raws), steps=body.steps, eta=0.0, large=False,
                                     schedule=body.schedule, seed=None, x_T=x_T, clip=False, endpoint="invert",
                                     class_labels=labels, guidance_scale=body.guidance_scale)
        rec = await _run(engine, request, model, job)
        mse = (((rec.clamp(-1, 1) - images) / 2) ** 2).flatten(1).mean(1)
        out["reconstruction"] = await asyncio.to_thread(_png_list, rec)
        out["reconstruction_mse"] = mse.tolist()
    return out


def _end_input(engine: Engine, model: LoadedModel, end: Endpoint, field: str, max_pixels: int) -> torch.Tensor:
    """Decode and check one end: a latent [C, H, W] (seed or x_T), or an image [1, C, H, W] to invert."""
    if end.seed is not None:
        return draw(sample_generators(end.seed, 1), model.sample_shape)[0]
    if end.x_T is not None:
        x = decode_npy(end.x_T, f"{field}.x_T")
        return engine.check_latents(model, x[None] if x.dim() == 3 else x, 1, f"{field}.x_T")[0]
    raw = b64decode(str(end.image), f"{field}.image")
    return _decode_images([raw], f"{field}.image", model, max_pixels)


def _interpolate_response(accept: str, out: dict[str, Any], frames: torch.Tensor, latents: torch.Tensor,
                          return_latents: bool) -> Any:
    images = pil_images(frames)
    if accept == GIF:
        return Response(gif_bytes(images), media_type=GIF)
    if accept == PNG:
        return Response(png_bytes(grid(images, ncols=len(images))), media_type=PNG)
    out["images"] = [b64encode(png_bytes(im)) for im in images]
    if return_latents:
        out["x_T"] = b64encode(npy_bytes(latents))
    return out


@router.post("/interpolate", responses={200: {"content": {GIF: {}, PNG: {}}}})
async def interpolate(body: InterpolateRequest, request: Request, engine: EngineDep, settings: SettingsDep) -> Any:
    accept = negotiate(request, [JSON, GIF, PNG])
    request.state.params = {"n": body.frames, "steps": body.steps, "eta": 0.0}
    model = _model(engine, request, body.model)
    if body.frames > settings.max_n:
        raise InvalidRequest("frames", f"frames must be at most {settings.max_n} on this server")
    engine.check_steps(model, body.steps, body.schedule)
    labels = engine.class_labels(model, body.class_label, body.frames)
    w = body.guidance_scale
    # both ends are decoded and checked before any work is queued
    ends = [await asyncio.to_thread(_end_input, engine, model, end, field, settings.max_image_pixels)
            for end, field in ((body.start, "start"), (body.end, "end"))]
    jobs = {i: engine.invert_job(model, x, steps=body.steps, schedule=body.schedule, endpoint="interpolate",
                                 class_labels=None if labels is None else labels[[-i]], guidance_scale=w)
            for i, x in enumerate(ends) if x.dim() == 4}
    inverted = await asyncio.gather(*(_run(engine, request, model, j) for j in jobs.values()))
    x0, x1 = (dict(zip(jobs, (x[0] for x in inverted))).get(i, ends[i]) for i in (0, 1))
    latents = engine.interpolate(x0, x1, body.frames, body.method)
    job, _ = engine.generate_job(model, n=body.frames, steps=body.steps, eta=0.0, large=False, schedule=body.schedule,
                                 seed=None, x_T=latents, endpoint="interpolate", class_labels=labels, guidance_scale=w)
    frames = await _run(engine, request, model, job)
    out = {"model": model.name, "frames": body.frames, "steps": body.steps,
           "schedule": body.schedule or model.spacings[0], "method": body.method,
           **_conditioning(model, labels, w)}
    return await asyncio.to_thread(_interpolate_response, accept, out, frames, latents, body.return_latents)
