"""POST /v1/images/generations and /v1/images/edits, OpenAI's images API on this server's engine (the official `openai`
client works).

Body {model, prompt, n, size: "WxH", response_format: "b64_json"}, answered with {created, data: [{b64_json}]}, plus
the fields other servers accept: negative_prompt, seed, steps (or num_inference_steps), guidance_scale. A url
response is refused, and so is every other error, in OpenAI's error body {error: {message, type, param, code}}.
Keys are the server's own (Authorization: Bearer, as the client sends them).

/v1/images/edits is img2img (SDEdit, /generate with an image): a multipart form with one `image` file and the
prompt, with `strength` (default 0.8) beside the generation fields; a `mask` (inpainting) is refused.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.codecs import b64encode
from app.api.routes import EngineDep, SettingsDep, _await, _decode_images, _model, _offload, _owner, _request_id
from app.api.schemas import SEED_MAX
from app.engine.client import Engine
from app.engine.errors import InvalidRequest
from app.engine.tasks import GenerateWork
from app.images import pil_images, png_bytes

router = APIRouter(prefix="/v1")


class ImagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = Field(None, pattern=r"^\d+x\d+$", description="WxH in pixels; default: the model's")
    response_format: Literal["b64_json", "url"] = "b64_json"
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    steps: int | None = Field(None, ge=1)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0.0, le=20.0)
    # OpenAI's own fields that have no meaning here; accepted so that its clients work, and ignored
    quality: str | None = None
    style: str | None = None
    user: str | None = None


class ImageData(BaseModel):
    b64_json: str = Field(description="a PNG, base64")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix seconds")
    data: list[ImageData]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": ImagesRequest.model_json_schema()}}}}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": ImagesResponse, "description": "the images"},
    400: {"model": OpenAIError, "description": "an invalid request, in OpenAI's error body (param names the field)"},
    503: {"description": "not ready yet, or shutting down (Retry-After)"},
    504: {"description": "deadline exceeded"}}
class EditsRequest(ImagesRequest):
    """The form fields of /v1/images/edits beside its image file."""

    strength: float | None = Field(None, gt=0.0, le=1.0, description="img2img: k = int(steps x strength); "
                                   "default 0.8")
    input_fidelity: str | None = None  # OpenAI's; ignored
    output_format: Literal["png"] | None = None


def _error(status: int, message: str, param: str | None, code: str = "invalid_value") -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


@router.post("/images/generations", openapi_extra=BODY, responses=RESPONSES)
async def images_generations(request: Request, engine: EngineDep) -> Any:
    try:
        body = ImagesRequest.model_validate(await request.json())
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(x) for x in first["loc"]]
        return _error(400, f"{'.'.join(loc) or 'body'}: {first['msg']}", loc[0] if loc else None)
    except ValueError as e:
        return _error(400, f"the body is not JSON: {e}", None)
    return await _images(request, engine, body)


@router.post("/images/edits")
async def images_edits(request: Request, engine: EngineDep, settings: SettingsDep) -> Any:
    try:
        async with request.form() as form:
            uploads = [*form.getlist("image"), *form.getlist("image[]")]
            files = [await f.read() for f in uploads if not isinstance(f, str)]
            fields = {k: v for k, v in form.items() if k not in ("image", "image[]")}
    except (StarletteHTTPException, ValueError, AssertionError) as e:
        return _error(400, f"send a multipart form with an image file and a prompt ({getattr(e, 'detail', e)})",
                      "image")
    if "mask" in fields:
        return _error(400, "mask (inpainting) is not supported by this server: edits are img2img", "mask",
                      "unsupported_value")
    if len(files) != 1:
        return _error(400, f"give exactly one image file (got {len(files)})", "image")
    try:
        body = EditsRequest.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        return _error(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}", str(first["loc"][0]))
    try:
        model = _model(engine, request, body.model)
        width, height = _size(body)
        size = GenerateWork(prompt=body.prompt, width=width, height=height)
        image = await _offload(False, _decode_images, files, "image", model, settings.max_image_pixels, size)
    except InvalidRequest as e:
        return _error(400, str(e), {"width": "size", "height": "size"}.get(e.field, e.field))
    return await _images(request, engine, body, image, body.strength or 0.8)


def _size(body: ImagesRequest) -> tuple[int | None, int | None]:
    if not body.size:
        return None, None
    width, height = (int(v) for v in body.size.split("x"))
    return width, height


async def _images(request: Request, engine: Engine, body: ImagesRequest, image: Any = None,
                  strength: float | None = None) -> Any:
    """Generate (from an image, with strength: img2img) and answer in OpenAI's shape."""
    if body.response_format == "url":
        return _error(400, "response_format 'url' is not supported by this server: ask for b64_json",
                      "response_format", "unsupported_value")
    width, height = _size(body)
    try:
        model = _model(engine, request, body.model)
        if model.conditioning != "text":
            raise InvalidRequest("model", f"model {model.name!r} has no text encoder: it takes no prompt")
        work = GenerateWork(model=model.name, prompt=body.prompt, negative_prompt=body.negative_prompt, n=body.n,
                            steps=body.steps or body.num_inference_steps or 50, seed=body.seed,
                            guidance_scale=body.guidance_scale, width=width, height=height, image=image,
                            strength=strength)
        handle = engine.submit(work, owner=_owner(request), request_id=_request_id(request))
    except InvalidRequest as e:
        return _error(400, str(e), {"width": "size", "height": "size"}.get(e.field, e.field))
    outcome = await _await(request, handle)
    images = outcome.tensors.get("images", outcome.tensors["x_0"])
    return {"created": int(time.time()), "data": [{"b64_json": b64encode(png_bytes(im))} for im in pil_images(images)]}
