"""Request bodies. Unknown fields are refused, so a misspelt option never passes silently."""

from __future__ import annotations

from typing import Annotated, Literal

from app.engine.tasks import Spacing
from pydantic import BaseModel, ConfigDict, Field, model_validator

Schedule = Spacing  # the schedule names: one definition, in app/sampling/schedules.py, passed on by the engine
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
    guidance_scale: float = Field(1.0, ge=0.0, le=20.0, description="classifier-free guidance w: the prediction "
                                  "is uncond + w (cond - uncond); 1 = plain conditional, 0 = unconditional")


class GenerateRequest(_Guided):
    model: str | None = Field(None, description="model name; the server's default if omitted")
    n: int = Field(1, ge=1, description="number of images; image i uses seed + i")
    steps: int = Field(50, ge=1, description="S, the number of sampling steps")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="0 = DDIM (deterministic), 1 = DDPM")
    variance: Literal["eta", "large"] = Field("eta", description="large: the paper's sigma-hat (DDPM fixed_large; "
                                              "VP models only)")
    schedule: Schedule | None = Field(None, description=SCHEDULE_DOC)
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="chosen at random and echoed back if omitted")
    x_T: str | None = Field(None, description="start latents: base64 .npy, float32, shape (n, C, H, W)")
    clip_denoised: bool | None = Field(None, description="clip predicted x0 to [-1, 1]; default: the model's")
    return_latents: bool = False


class InvertRequest(_Guided):
    model: str | None = None
    images: list[str] = Field(..., min_length=1, description="base64 PNG or JPEG images")
    steps: int = Field(50, ge=1)
    schedule: Schedule | None = Field(None, description=SCHEDULE_DOC)
    return_reconstruction: bool = False


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
    return_latents: bool = False
