"""Request bodies. Unknown fields are refused, so a misspelt option never passes silently."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.engine.tasks import Spacing

Schedule = Spacing | Literal["karras"]  # the ddim schedules (app/sampling/schedules.py) and the solvers' karras
Sampler = Literal["ddim", "dpmsolver++", "unipc"]
SAMPLER_DOC = ("ddim (the default: the paper's generalized step, eta and variance apply), dpmsolver++ (DPM-Solver++ "
               "multistep, diffusers' DPMSolverMultistepScheduler) or unipc (UniPC bh2 with its corrector); the "
               "multistep samplers are deterministic (eta 0) and never clip x0")
SEED_MAX = 2**62
ClassLabel = Annotated[int, Field(ge=0)] | str
SCHEDULE_DOC = ("timestep spacing; default: the model's (uniform on VP models; linspace, diffusers' "
                "FlowMatchEulerDiscreteScheduler timesteps, on flow models, which offer only that)")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class _Work(_Body):
    timeout_s: float | None = Field(None, gt=0, description="give up after this many seconds, queueing included "
                                    "(504, or a failed job); capped by the server's DDIM_MAX_REQUEST_SECONDS")
    preview_every: int = Field(0, ge=0, description="with an event stream: a preview of the predicted x0 every k "
                               "steps (base64 PNG, a grid when n > 1); 0: none")


class _Guided(_Work):
    class_label: ClassLabel | list[ClassLabel] | None = Field(
        None, description="class-conditional models: a class index or name (any case), or a list with one per "
        "image; omitted: unconditional samples. /models lists each model's classes")
    guidance_scale: float | None = Field(None, ge=0.0, le=20.0, description="classifier-free guidance w: the "
                                         "prediction is uncond + w (cond - uncond); 1 = plain conditional, 0 = "
                                         "unconditional. Default: the model's (/models default_guidance_scale: its "
                                         "pipeline's own, e.g. SD 7.5, SD3 7.0, DiT 4.0; 1 for UNet2DModel "
                                         "folders). On a class model it needs a class_label: a value other than 1 "
                                         "without one, or on a model that is not conditional, is a 422")
    prompt: str | list[str] | None = Field(None, description="text models: the prompt, or one per image; a model "
                                           "without a text encoder refuses it (422). Past the tokenizer's limit "
                                           "(/models prompt_token_limit) it is truncated, and the response says so")
    negative_prompt: str | list[str] | None = Field(None, description="text models: the prompt of the unconditional "
                                                    "row of guidance, or one per image; default \"\"")
    width: int | None = Field(None, ge=1, description="pixels; a multiple of the model's size_multiple (VAE factor "
                              "x patch size); default: the model's default_size")
    height: int | None = Field(None, ge=1, description="pixels, as width")


class GenerateRequest(_Guided):
    model: str | None = Field(None, description="model name; the server's default if omitted")
    n: int = Field(1, ge=1, description="number of images; image i uses seed + i")
    steps: int = Field(50, ge=1, description="S, the number of sampling steps")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="0 = DDIM (deterministic), 1 = DDPM; with variance 'large' "
                       "only 0 or 1 (its mean is eta = 1's)")
    variance: Literal["eta", "large"] = Field("eta", description="large: the paper's sigma-hat (DDPM fixed_large; "
                                              "VP models only)")
    schedule: Schedule | None = Field(None, description=SCHEDULE_DOC)
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="chosen at random and echoed back if omitted; "
                             "with x_T and eta = 0 nothing is drawn, and a seed is a 422")
    x_T: str | None = Field(None, description="start latents: base64 .npy, float32, shape (n, C, H, W)")
    clip_denoised: bool | None = Field(None, description="clip predicted x0 to [-1, 1]; default: the model's "
                                       "(ddim only)")
    sampler: Sampler = Field("ddim", description=SAMPLER_DOC)
    solver_order: int | None = Field(None, ge=1, le=3, description="dpmsolver++ and unipc: the solver order, 1-3 "
                                     "(default 2, DPM++ 2M)")
    return_latents: bool = Field(False, description="JSON answers only: add x_T and x_0 (base64 .npy); "
                                 "an image/png or .npy answer carries the images or x_0 alone")
    image: str | None = Field(None, description="img2img (SDEdit): one base64 PNG or JPEG to start from, resized and "
                              "centre-cropped to the output size; each of the n images starts from it with its own "
                              "seed (seed + i). Sampler ddim only; not with x_T")
    strength: float | None = Field(None, gt=0.0, le=1.0, description="img2img: the share of the plan run from the "
                                   "image, k = int(steps x strength) steps (diffusers' init_timestep; k = 0 is a "
                                   "422); default 0.8 with an image, a 422 without one")


IMAGES_DOC = ("base64 PNG or JPEG images, resized (shorter side) and centre-cropped to the model's size (width x "
              "height on a latent model)")


class InvertRequest(_Guided):
    model: str | None = None
    images: list[str] = Field(..., min_length=1, description=IMAGES_DOC)
    sampler: Literal["ddim"] = Field("ddim", description="inversion is DDIM's (Eq. 14): only 'ddim'")
    steps: int = Field(50, ge=1)
    schedule: Schedule | None = Field(None, description=SCHEDULE_DOC)
    return_reconstruction: bool = Field(False, description="generate back under the same condition; report each "
                                        "image's pixel MSE and PSNR")


class EditRequest(_Guided):
    """Invert under the source condition for the first k steps, then generate them back under the target's
    (prompt / class_label / guidance_scale; guidance_scale defaults to the model's)."""

    model: str | None = None
    images: list[str] = Field(..., min_length=1, description=IMAGES_DOC)
    steps: int = Field(50, ge=1, description="S, the plan's steps; the edit runs k = int(S x strength) of them each "
                       "way")
    strength: float = Field(0.8, gt=0.0, le=1.0, description="how far the images travel: 1 is full inversion to x_T "
                            "and back; default 0.8, enough room for a new class or prompt while keeping the layout")
    schedule: Schedule | None = Field(None, description=SCHEDULE_DOC)
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="eta > 0 only: seeds the generation leg's noise")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="the generation leg's eta (the inversion is deterministic)")
    source_prompt: str | list[str] | None = Field(None, description="text models: the prompt the images are inverted "
                                                  "under; default \"\"")
    source_class_label: ClassLabel | list[ClassLabel] | None = Field(None, description="class models: the images' "
                                                                     "class; omitted: inverted unconditionally")
    source_guidance_scale: float = Field(1.0, ge=0.0, le=20.0, description="the inversion's guidance; default 1, "
                                         "none, the best round trip")
    return_latents: bool = Field(False, description="JSON answers only: add x_T (the level-t_k latents) and x_0")


class Endpoint(_Body):
    """One end of an interpolation: exactly one of seed, x_T (base64 .npy) or image (base64 PNG/JPEG)."""

    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    x_T: str | None = None
    image: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Endpoint:
        given = [k for k in ("seed", "x_T", "image") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of seed, x_T or image (got {', '.join(given) or 'none'})")
        return self


class InterpolateRequest(_Guided):
    model: str | None = None
    start: Endpoint
    end: Endpoint
    frames: int = Field(8, ge=2)
    steps: int = Field(50, ge=1)
    schedule: Schedule | None = Field(None, description=SCHEDULE_DOC)
    method: Literal["slerp", "lerp"] = "slerp"
    sampler: Sampler = Field("ddim", description=SAMPLER_DOC + "; seed and x_T ends only (image ends are "
                             "inverted with DDIM)")
    solver_order: int | None = Field(None, ge=1, le=3, description="dpmsolver++ and unipc: the order, 1-3 (default 2)")
    return_latents: bool = False


# -- responses, as documented in /openapi.json (the routes return plain dicts of these shapes) ----------------

class GenerateResponse(BaseModel):
    model: str
    seed: int | None = Field(None, description="the seed used (null when x_T was given and eta = 0)")
    n: int
    steps: int
    eta: float
    variance: str
    schedule: str
    sampler: str = "ddim"
    class_label: list[str] | None = Field(None, description="conditional models: the class of each image, by name")
    guidance_scale: float | None = Field(None, description="conditional models: w")
    prompt: list[str] | None = Field(None, description="text models: each image's prompt")
    negative_prompt: list[str] | None = Field(None, description="text models: each image's negative prompt")
    prompt_truncated: list[bool] | None = Field(None, description="text models: whether each prompt was cut at "
                                                "the tokenizer's limit")
    negative_prompt_truncated: list[bool] | None = None
    prompt_token_limit: int | None = None
    width: int | None = Field(None, description="latent models: the images' width in pixels")
    height: int | None = Field(None, description="latent models: the images' height in pixels")
    images: list[str] = Field(description="base64 PNGs, one per sample (decoded RGB for latent models)")
    x_T: str | None = Field(None, description="with return_latents: the start latents, base64 .npy")
    x_0: str | None = Field(None, description="with return_latents: the final samples, base64 .npy")


class InvertResponse(BaseModel):
    model: str
    steps: int
    schedule: str
    class_label: list[str] | None = Field(None, description="conditional models: the class of each image, by name")
    guidance_scale: float | None = Field(None, description="conditional models: w")
    x_T: str = Field(description="the inverted latents, base64 .npy, float32 (n, C, H, W)")
    reconstruction: list[str] | None = Field(None, description="with return_reconstruction: base64 PNGs")
    reconstruction_mse: list[float] | None = Field(None, description="per image, pixels in [0, 1]")
    reconstruction_psnr: list[float] | None = Field(None, description="per image, dB (peak 1)")
    prompt: list[str] | None = Field(None, description="text models: each image's prompt")
    negative_prompt: list[str] | None = None


class EditResponse(BaseModel):
    model: str
    n: int = Field(description="the number of images edited")
    steps: int = Field(description="S, the plan's steps")
    schedule: str
    strength: float
    strength_steps: int = Field(description="k = int(S x strength), the steps run each way")
    seed: int | None = Field(None, description="the generation leg's seed (eta > 0 only)")
    eta: float
    class_label: list[str] | None = Field(None, description="class models: each image's target class")
    guidance_scale: float | None = Field(None, description="the target's w")
    source_class_label: list[str] | None = Field(None, description="class models: each image's source class")
    source_guidance_scale: float = Field(1.0, description="the inversion's w")
    prompt: list[str] | None = Field(None, description="text models: each image's target prompt")
    source_prompt: list[str] | None = Field(None, description="text models: each image's source prompt")
    negative_prompt: list[str] | None = None
    prompt_truncated: list[bool] | None = None
    negative_prompt_truncated: list[bool] | None = None
    prompt_token_limit: int | None = None
    width: int | None = None
    height: int | None = None
    images: list[str] = Field(description="base64 PNGs, one per image (decoded RGB for latent models)")
    x_T: str | None = Field(None, description="with return_latents: the level-t_k latents, base64 .npy")
    x_0: str | None = Field(None, description="with return_latents: the final samples, base64 .npy")


class InterpolateResponse(BaseModel):
    model: str
    frames: int
    steps: int
    schedule: str
    sampler: str = "ddim"
    method: str
    class_label: list[str] | None = Field(None, description="conditional models: the class of each image, by name")
    guidance_scale: float | None = Field(None, description="conditional models: w")
    prompt: list[str] | None = None
    negative_prompt: list[str] | None = None
    prompt_truncated: list[bool] | None = None
    negative_prompt_truncated: list[bool] | None = None
    prompt_token_limit: int | None = None
    width: int | None = None
    height: int | None = None
    images: list[str] = Field(description="base64 PNGs, one per frame")
    x_T: str | None = Field(None, description="with return_latents: the frames' latents, base64 .npy")


class FieldError(BaseModel):
    field: str = Field(description="the field as the client sent it, e.g. n, images.0, files.1, start.x_T, body")
    msg: str
    type: str


class ErrorResponse(BaseModel):
    detail: list[FieldError] | str


BINARY = {"schema": {"type": "string", "format": "binary"}}
_ERRORS = {422: "invalid input; detail names the field", 404: "unknown model or job",
           424: "the model failed to load (the detail quotes its load error; retrying will not help)",
           406: "an Accept this endpoint cannot produce", 413: "body or image too large",
           429: "the model's queue or the job store is full (Retry-After)", 499: "the client disconnected",
           500: "internal error (the detail names the request id)",
           503: "not ready yet, or shutting down (Retry-After)", 504: "deadline exceeded (timeout_s)"}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in _ERRORS.items()}


def invert_request_body(schema: type[BaseModel] | None = None) -> dict[str, Any]:
    """openapi_extra for /invert (and /edit), which read their body themselves: the JSON form (InvertRequest,
    EditRequest) and the multipart form, whose files replace images and whose other fields are the JSON form's."""
    json_schema = (schema or InvertRequest).model_json_schema()
    files = {"type": "array", "minItems": 1, "description": "PNG or JPEG files",
             "items": {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}}
    fields = {k: v for k, v in json_schema["properties"].items() if k != "images"}
    form = {"title": "InvertForm", "type": "object", "properties": {"files": files, **fields},
            "required": ["files"], "additionalProperties": False}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": json_schema},
        "multipart/form-data": {"schema": form, "encoding": {"files": {"contentType": "image/png, image/jpeg"}}}}}}
