"""Encoding a task's outcome for HTTP: JSON, PNG, GIF, .npy, and server-sent events; and the OpenAPI description
of every body and response."""

from __future__ import annotations

import asyncio
import json
from math import prod
from typing import Any

from fastapi import Response

from app.api.codecs import b64encode
from app.api.negotiate import GIF, JSON, NPY, PNG, SSE
from app.api.schemas import (
    BINARY,
    ERROR_RESPONSES,
    EditRequest,
    EditResponse,
    ErrorResponse,
    GenerateResponse,
    InterpolateResponse,
    InvertResponse,
    invert_request_body,
)
from app.engine.handle import Event, Outcome, RequestHandle
from app.images import gif_bytes, grid, npy_bytes, pil_images, png_bytes

OFFERED = {"generate": [JSON, PNG, NPY], "invert": [JSON, NPY], "interpolate": [JSON, GIF, PNG],
           "edit": [JSON, PNG, NPY]}
INLINE_ELEMENTS = 4 * 32 * 32 * 3  # up to four 32x32 RGB images are encoded on the event loop itself


def options(body: Any) -> dict[str, bool]:
    """What the request asked to get back, beyond the default."""
    return {k: bool(getattr(body, k)) for k in ("return_latents", "return_reconstruction") if hasattr(body, k)}


def is_small(outcome: Outcome) -> bool:
    return sum(prod(t.shape) for t in outcome.tensors.values()) <= 2 * INLINE_ELEMENTS


def _pngs(x: Any) -> list[str]:
    return [b64encode(png_bytes(im)) for im in pil_images(x)]


def _npy(x: Any) -> str:
    return b64encode(npy_bytes(x))


def _shown(t: dict[str, Any]) -> Any:
    """The images of a generation: decoded where the model is a latent pipeline, else x_0 itself."""
    return t["images"] if "images" in t else t["x_0"]


def as_json(handle: RequestHandle, outcome: Outcome) -> dict[str, Any]:
    """The JSON answer of the task, as the synchronous endpoint gives it."""
    t, want, out = outcome.tensors, handle.meta, dict(outcome.fields)
    if handle.task in ("generate", "edit"):
        out["images"] = _pngs(_shown(t))
        if want.get("return_latents"):
            out["x_T"], out["x_0"] = _npy(t["x_T"]), _npy(t["x_0"])
    elif handle.task == "invert":
        out["x_T"] = _npy(t["x_T"])
        if "reconstruction" in t:
            out["reconstruction"] = _pngs(t["reconstruction"])
            out["reconstruction_mse"] = t["reconstruction_mse"].tolist()
            out["reconstruction_psnr"] = t["reconstruction_psnr"].tolist()
    else:
        out["images"] = _pngs(t["frames"])
        if want.get("return_latents"):
            out["x_T"] = _npy(t["x_T"])
    return out


def response(handle: RequestHandle, outcome: Outcome, accept: str) -> Any:
    """The outcome in the negotiated media type (CPU work: the routes run it off the event loop when large)."""
    t = outcome.tensors
    if accept == JSON:
        return as_json(handle, outcome)
    if accept == NPY:
        return Response(npy_bytes(t["x_T"] if handle.task == "invert" else t["x_0"]), media_type=NPY)
    images = pil_images(t["frames"] if handle.task == "interpolate" else _shown(t))
    if accept == GIF:
        return Response(gif_bytes(images), media_type=GIF)
    if handle.task == "interpolate":
        return Response(png_bytes(grid(images, ncols=len(images))), media_type=PNG)
    return Response(png_bytes(images[0] if len(images) == 1 else grid(images)), media_type=PNG)


async def sse_event(event: Event, handle: RequestHandle) -> bytes:
    """One server-sent event: progress {step, steps, at, preview?}, result (the JSON answer), error, cancelled."""
    data: dict[str, Any] = dict(event.data)
    if event.preview is not None:
        images = pil_images(event.preview)
        data["preview"] = b64encode(png_bytes(images[0] if len(images) == 1 else grid(images)))
    if event.outcome is not None:
        data = await asyncio.to_thread(as_json, handle, event.outcome)
    return f"event: {event.kind}\ndata: {json.dumps(data)}\n\n".encode()


# -- OpenAPI ---------------------------------------------------------------------------------------
ERROR = {"model": ErrorResponse, "description": "an error: JSON {detail}"}
_EVENT_DOC = "one server-sent event: `event` is progress, result, error or cancelled; `data` is its JSON"
_EVENTS: dict[str, Any] = {SSE: {"schema": {"type": "object", "description": _EVENT_DOC, "properties": {
    "event": {"type": "string", "enum": ["progress", "result", "error", "cancelled"]}, "data": {"type": "string"}}},
    "example": 'event: progress\ndata: {"step": 3, "steps": 50, "at": 1796287284.05}\n\n'}}
RESPONSES: dict[str, dict[int | str, dict[str, Any]]] = {
    "generate": {200: {"model": GenerateResponse, "content": {PNG: BINARY, NPY: BINARY, **_EVENTS},
                       "description": "JSON, a PNG (a grid when n > 1), x_0 as .npy, or an event stream"},
                 **ERROR_RESPONSES},
    "invert": {200: {"model": InvertResponse, "content": {NPY: BINARY, **_EVENTS},
                     "description": "JSON, x_T as .npy, or an event stream"}, **ERROR_RESPONSES},
    "edit": {200: {"model": EditResponse, "content": {PNG: BINARY, NPY: BINARY, **_EVENTS},
                   "description": "JSON, a PNG (a grid when several images), x_0 as .npy, or an event stream"},
             **ERROR_RESPONSES},
    "interpolate": {200: {"model": InterpolateResponse, "content": {GIF: BINARY, PNG: BINARY, **_EVENTS},
                          "description": "JSON, an animated GIF, a PNG strip, or an event stream"}, **ERROR_RESPONSES},
}
_JOB_STATE = {JSON: {"schema": {"type": "object", "properties": {
    "id": {"type": "string"}, "task": {"type": "string"}, "model": {"type": "string"},
    "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
    "progress": {"type": "object", "properties": {"step": {"type": "integer"}, "steps": {"type": "integer"}}},
    "created_at": {"type": "number"}, "started_at": {"type": "number"}, "finished_at": {"type": "number"},
    "error": {"type": "object"}}}}}
JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"description": "the job, queued; Location: /jobs/{id}", "content": _JOB_STATE}, **ERROR_RESPONSES}
RESULT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the synchronous endpoint's answer, negotiated by Accept",
          "content": {PNG: BINARY, NPY: BINARY, GIF: BINARY}},
    409: {**ERROR, "description": "the job is unfinished or was cancelled"}, **ERROR_RESPONSES}
EVENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "progress events, then one result, error or cancelled event", "content": _EVENTS},
    **ERROR_RESPONSES}
INVERT_BODY = invert_request_body()
EDIT_BODY = invert_request_body(EditRequest)
