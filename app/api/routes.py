"""HTTP routes: validate, negotiate, call the engine client, encode. No sampling or orchestration lives here."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from math import prod
from typing import Annotated, Any, TypeVar

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api import render
from app.api.codecs import b64decode, decode_image, decode_npy
from app.api.errors import ClientGone, NotReady
from app.api.negotiate import SSE, negotiate
from app.api.schemas import (
    EditRequest,
    Endpoint,
    ErrorResponse,
    GenerateRequest,
    InterpolateRequest,
    InvertRequest,
)
from app.config import Settings
from app.engine.client import Engine
from app.engine.errors import InvalidRequest
from app.engine.handle import RequestHandle
from app.engine.inputs import Inputs, pixel_shape
from app.engine.tasks import EditWork, End, GenerateWork, InterpolateWork, InvertWork, Work
from app.models import LoadedModel

router = APIRouter()
T = TypeVar("T")


# async: FastAPI runs a plain-def dependency in its thread pool, which would cost each request two
# thread hops (and wake-ups beside the eps-network's threads) for an attribute lookup
async def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    health = engine.health()
    if not health["serving"]:
        raise NotReady("the server is shutting down" if health["draining"] else
                       health["error"] or "models are still loading")
    return engine


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


EngineDep = Annotated[Engine, Depends(_engine)]
SettingsDep = Annotated[Settings, Depends(_settings)]


async def _offload(small: bool, fn: Callable[..., T], *args: Any) -> T:
    """CPU work off the event loop, in a worker thread; work on a few small images runs inline, where the
    thread hop would cost more than the work (and, on few cores, steal more from the eps-network)."""
    return fn(*args) if small else await asyncio.to_thread(fn, *args)


def _model(engine: Engine, request: Request, name: str | None) -> LoadedModel:
    model = engine.model(name)
    request.state.model = model.name
    return model


def _owner(request: Request) -> str | None:
    return getattr(request.state, "key_id", None)


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", ""))


# -- health and models ---------------------------------------------------------------------------
@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse, "description": "not ready yet"}})
async def readyz(request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    health = engine.health()
    if not health["ready"]:
        return JSONResponse({"detail": "the server is shutting down" if health["draining"] else
                             health["error"] or "models are still loading"}, status_code=503,
                            headers={"Retry-After": "5"})  # type: ignore[return-value]
    return {"status": "ready", "models": health["models"], "failed": health["failed"]}


@router.get("/models", responses={503: {"model": ErrorResponse, "description": "not ready yet"}})
async def models(request: Request) -> dict[str, Any]:
    """Every model of the store once loading is over: status "ready", or "failed" with its load error."""
    engine: Engine = request.app.state.engine
    if not engine.ready and engine.error is None:
        raise NotReady("models are still loading")
    return {"models": engine.stats()}


# -- reading a handle ----------------------------------------------------------------------------
async def _disconnect(request: Request) -> None:
    """Returns when the client hangs up (the body is read by now, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.5)  # a server that answers with more (empty) body messages: poll slowly


async def _await(request: Request, handle: RequestHandle) -> Any:
    """The handle's outcome; the client hanging up cancels it (499)."""
    result = asyncio.ensure_future(handle.result())
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not result.done():
        handle.cancel()
        await asyncio.gather(result, return_exceptions=True)
        raise ClientGone()
    request.state.queue_seconds = handle.queue_seconds
    return result.result()


def _stream(request: Request, handle: RequestHandle, *, cancel_on_disconnect: bool) -> StreamingResponse:
    events = handle.events()  # subscribed now, before the response starts: no event of the first steps is missed

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield await render.sse_event(event, handle)
        finally:
            if cancel_on_disconnect and not handle.finished:  # a synchronous request's client went away
                handle.cancel()
    return StreamingResponse(body(), media_type=SSE, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _answer(request: Request, engine: Engine, work: Work, body: Any, offered: list[str]) -> Any:
    """Submit, then answer with the result in the negotiated type, or stream the events."""
    accept = negotiate(request, [*offered, SSE])
    handle = engine.submit(work, timeout_s=body.timeout_s, owner=_owner(request), request_id=_request_id(request))
    handle.meta.update(render.options(body))
    if accept == SSE:
        return _stream(request, handle, cancel_on_disconnect=True)
    outcome = await _await(request, handle)
    return await _offload(render.is_small(outcome), render.response, handle, outcome, accept)


# -- the work endpoints --------------------------------------------------------------------------
async def _generate_work(request: Request, engine: Engine, settings: Settings, body: GenerateRequest) -> GenerateWork:
    x_T = decode_npy(body.x_T, "x_T") if body.x_T is not None else None
    image = None
    if body.image is not None:
        model = _model(engine, request, body.model)
        raw = b64decode(body.image, "image")
        image = await _offload(False, _decode_images, [raw], "image", model, settings.max_image_pixels, body)
    return GenerateWork(model=body.model, n=body.n, steps=body.steps, eta=body.eta, variance=body.variance,
                        image=image, strength=body.strength, schedule=body.schedule, seed=body.seed, x_T=x_T,
                        clip_denoised=body.clip_denoised,
                        class_label=body.class_label, guidance_scale=body.guidance_scale,
                        preview_every=body.preview_every, prompt=body.prompt, negative_prompt=body.negative_prompt,
                        width=body.width, height=body.height, sampler=body.sampler, solver_order=body.solver_order)


async def _images_of(request: Request, engine: Engine, settings: Settings,
                     schema: type[InvertRequest] | type[EditRequest]) -> tuple[Any, torch.Tensor]:
    """The body of /invert or /edit and its images, decoded to the size the model (and width x height) takes."""
    body, raws, field = await _invert_request(request, schema)
    model = _model(engine, request, body.model)
    if len(raws) > settings.max_n:
        raise InvalidRequest(field, f"at most {settings.max_n} images per request on this server")
    small = len(raws) * prod(model.sample_shape) <= render.INLINE_ELEMENTS
    return body, await _offload(small, _decode_images, raws, field, model, settings.max_image_pixels, body)


async def _edit_work(request: Request, engine: Engine, settings: Settings) -> tuple[EditRequest, EditWork]:
    body, images = await _images_of(request, engine, settings, EditRequest)
    return body, EditWork(model=body.model, images=images, steps=body.steps, strength=body.strength,
                          schedule=body.schedule, seed=body.seed, eta=body.eta, class_label=body.class_label,
                          guidance_scale=body.guidance_scale, prompt=body.prompt,
                          negative_prompt=body.negative_prompt, source_prompt=body.source_prompt,
                          source_class_label=body.source_class_label,
                          source_guidance_scale=body.source_guidance_scale, preview_every=body.preview_every,
                          width=body.width, height=body.height)


async def _invert_work(request: Request, engine: Engine, settings: Settings) -> tuple[InvertRequest, InvertWork]:
    body, images = await _images_of(request, engine, settings, InvertRequest)
    return body, InvertWork(model=body.model, images=images, steps=body.steps, schedule=body.schedule,
                            class_label=body.class_label, guidance_scale=body.guidance_scale,
                            preview_every=body.preview_every, return_reconstruction=body.return_reconstruction,
                            prompt=body.prompt, negative_prompt=body.negative_prompt, width=body.width,
                            height=body.height)


async def _interpolate_work(request: Request, engine: Engine, settings: Settings,
                            body: InterpolateRequest) -> InterpolateWork:
    model = _model(engine, request, body.model)
    start, end = [await asyncio.to_thread(_end, model, e, name, settings.max_image_pixels)
                  for e, name in ((body.start, "start"), (body.end, "end"))]
    return InterpolateWork(model=body.model, start=start, end=end, frames=body.frames, steps=body.steps,
                           schedule=body.schedule, method=body.method, class_label=body.class_label,
                           guidance_scale=body.guidance_scale, preview_every=body.preview_every,
                           prompt=body.prompt, negative_prompt=body.negative_prompt, width=body.width,
                           height=body.height, sampler=body.sampler, solver_order=body.solver_order)


@router.post("/generate", responses=render.RESPONSES["generate"])
async def generate(body: GenerateRequest, request: Request, engine: EngineDep, settings: SettingsDep) -> Any:
    request.state.params = {"n": body.n, "steps": body.steps, "eta": body.eta}
    _model(engine, request, body.model)
    work = await _generate_work(request, engine, settings, body)
    return await _answer(request, engine, work, body, render.OFFERED["generate"])


@router.post("/invert", responses=render.RESPONSES["invert"], openapi_extra=render.INVERT_BODY)
async def invert(request: Request, engine: EngineDep, settings: SettingsDep) -> Any:
    negotiate(request, [*render.OFFERED["invert"], SSE])  # a 406 before the upload is decoded
    body, work = await _invert_work(request, engine, settings)
    request.state.params = {"n": int(work.images.shape[0]), "steps": body.steps, "eta": 0.0}
    return await _answer(request, engine, work, body, render.OFFERED["invert"])


@router.post("/edit", responses=render.RESPONSES["edit"], openapi_extra=render.EDIT_BODY)
async def edit(request: Request, engine: EngineDep, settings: SettingsDep) -> Any:
    """Invert images under the source condition for k = int(steps x strength) steps, then generate them back
    under the target condition (docs/editing.md)."""
    negotiate(request, [*render.OFFERED["edit"], SSE])
    body, work = await _edit_work(request, engine, settings)
    request.state.params = {"n": int(work.images.shape[0]), "steps": body.steps, "eta": body.eta}
    return await _answer(request, engine, work, body, render.OFFERED["edit"])


@router.post("/interpolate", responses=render.RESPONSES["interpolate"])
async def interpolate(body: InterpolateRequest, request: Request, engine: EngineDep, settings: SettingsDep) -> Any:
    negotiate(request, [*render.OFFERED["interpolate"], SSE])
    request.state.params = {"n": body.frames, "steps": body.steps, "eta": 0.0}
    work = await _interpolate_work(request, engine, settings, body)
    return await _answer(request, engine, work, body, render.OFFERED["interpolate"])


# -- jobs ------------------------------------------------------------------------------------------
def _accepted(engine: Engine, request: Request, work: Work, body: Any) -> JSONResponse:
    handle = engine.submit(work, timeout_s=body.timeout_s, owner=_owner(request), retain=True,
                           request_id=_request_id(request))
    handle.meta.update(render.options(body))
    return JSONResponse(handle.state(), status_code=202, headers={"Location": f"/jobs/{handle.id}"})


@router.post("/jobs/generate", status_code=202, responses=render.JOB_RESPONSES)
async def job_generate(body: GenerateRequest, request: Request, engine: EngineDep,
                       settings: SettingsDep) -> JSONResponse:
    _model(engine, request, body.model)
    return _accepted(engine, request, await _generate_work(request, engine, settings, body), body)


@router.post("/jobs/edit", status_code=202, responses=render.JOB_RESPONSES, openapi_extra=render.EDIT_BODY)
async def job_edit(request: Request, engine: EngineDep, settings: SettingsDep) -> JSONResponse:
    body, work = await _edit_work(request, engine, settings)
    return _accepted(engine, request, work, body)


@router.post("/jobs/invert", status_code=202, responses=render.JOB_RESPONSES, openapi_extra=render.INVERT_BODY)
async def job_invert(request: Request, engine: EngineDep, settings: SettingsDep) -> JSONResponse:
    body, work = await _invert_work(request, engine, settings)
    return _accepted(engine, request, work, body)


@router.post("/jobs/interpolate", status_code=202, responses=render.JOB_RESPONSES)
async def job_interpolate(body: InterpolateRequest, request: Request, engine: EngineDep,
                          settings: SettingsDep) -> JSONResponse:
    return _accepted(engine, request, await _interpolate_work(request, engine, settings, body), body)


def _job(engine: Engine, request: Request, job_id: str) -> RequestHandle:
    handle = engine.jobs.get(job_id, _owner(request))
    if handle is None:
        raise StarletteHTTPException(404, f"no job {job_id!r} (unknown, or its result expired)")
    return handle


@router.get("/jobs/{job_id}", responses={404: render.ERROR})
async def job_state(job_id: str, request: Request, engine: EngineDep) -> dict[str, Any]:
    return _job(engine, request, job_id).state()


@router.get("/jobs/{job_id}/result", responses=render.RESULT_RESPONSES)
async def job_result(job_id: str, request: Request, engine: EngineDep) -> Any:
    handle = _job(engine, request, job_id)
    accept = negotiate(request, render.OFFERED[handle.task])
    if not handle.finished:
        raise StarletteHTTPException(409, f"job {job_id} is {handle.status}; its result is not ready")
    if handle.status == "cancelled":
        raise StarletteHTTPException(409, f"job {job_id} was cancelled; it has no result")
    outcome = await handle.result() if handle.status == "succeeded" else None
    if outcome is None:
        state = handle.state()["error"]
        return JSONResponse({"detail": state["detail"]}, status_code=state["status"])
    return await _offload(render.is_small(outcome), render.response, handle, outcome, accept)


@router.delete("/jobs/{job_id}", responses={404: render.ERROR})
async def job_cancel(job_id: str, request: Request, engine: EngineDep) -> dict[str, Any]:
    handle = _job(engine, request, job_id)
    if handle.cancel():
        await asyncio.gather(handle.result(), return_exceptions=True)
    return handle.state()


@router.get("/jobs/{job_id}/events", responses=render.EVENT_RESPONSES)
async def job_events(job_id: str, request: Request, engine: EngineDep) -> StreamingResponse:
    return _stream(request, _job(engine, request, job_id), cancel_on_disconnect=False)


# -- payload decoding ------------------------------------------------------------------------------
async def _invert_request(request: Request, schema: type[InvertRequest] | type[EditRequest] = InvertRequest
                          ) -> tuple[Any, list[bytes], str]:
    """JSON {images: [base64]} or a multipart form with files (other fields as form fields); returns the body, the
    raw images and the field the client used for them."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            async with request.form() as form:
                uploads = form.getlist("files")
                files = [await f.read() for f in uploads if not isinstance(f, str)]
                fields = {k: v for k, v in form.items() if k != "files"}
        except (StarletteHTTPException, ValueError) as e:
            raise InvalidRequest("files", f"the multipart form cannot be read ({getattr(e, 'detail', e)})") from e
        if len(files) < len(uploads):
            raise InvalidRequest("files", "files must be file uploads (curl -F files=@image.png), not text fields")
        if not files:
            raise InvalidRequest("files", "the multipart form has no files: send each image as a 'files' part")
        data: Any = {**fields, "images": ["-"] * len(files)}
        field = "files"
    else:
        raw = await request.body()
        if not raw.strip():
            raise InvalidRequest("body", "the body is empty: send JSON {\"images\": [base64 PNG or JPEG, ...]} or a "
                                         "multipart form with 'files'")
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise InvalidRequest("body", f"body is not valid JSON: {e}") from e
        files, field = None, "images"
    try:
        body = schema.model_validate(data)
    except ValidationError as e:  # multipart: the client sent files, not images
        raise RequestValidationError([{**err, "loc": (field, *err["loc"][1:]) if err["loc"][:1] == ("images",)
                                       else err["loc"]} for err in e.errors()]) from e
    if files is not None:
        return body, files, "files"
    return body, [b64decode(s, f"images.{i}") for i, s in enumerate(body.images)], "images"


def _decode_images(raws: list[bytes], field: str, model: LoadedModel, max_pixels: int,
                   size: Inputs | None = None) -> torch.Tensor:
    """Images resized (shorter side) and centre-cropped to the shape the task takes: the model's samples, or on a
    latent model its codec's pixels at the request's width x height."""
    shape = model.sample_shape if size is None else pixel_shape(model, size)
    one = len(raws) == 1 and field == "image"
    return torch.stack([decode_image(r, field if one else f"{field}.{i}", shape, max_pixels)
                        for i, r in enumerate(raws)])


def _end(model: LoadedModel, end: Endpoint, field: str, max_pixels: int) -> End:
    """Decode one end of an interpolation: a seed, a latent x_T, or an image to invert."""
    if end.seed is not None:
        return End(seed=end.seed)
    if end.x_T is not None:
        return End(x_T=decode_npy(end.x_T, f"{field}.x_T"))
    return End(image=decode_image(b64decode(str(end.image), f"{field}.image"), f"{field}.image", model.sample_shape,
                                  max_pixels))
