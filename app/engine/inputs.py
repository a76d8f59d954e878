"""A task's text-model and latent-model inputs, checked against its model: the stepper's sample shape of its width and
height, its prompts and negative prompts (one for every image, or one each), and what the response says of them.
Each refusal is an InvalidRequest naming the field (422)."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from app.engine.errors import InvalidRequest
from app.models import LoadedModel

log = logging.getLogger(__name__)


class Inputs(Protocol):
    """What a task's work gives of them (tasks._Common)."""

    width: int | None
    height: int | None
    prompt: str | list[str] | None
    negative_prompt: str | list[str] | None


def sample_shape(model: LoadedModel, work: Inputs) -> tuple[int, int, int]:
    """The stepper's sample shape of the work's width x height."""
    try:
        return model.latent_shape(work.width, work.height)
    except ValueError as e:
        field_name, _, message = str(e).partition(": ")
        raise InvalidRequest(field_name, message) from e


def pixel_shape(model: LoadedModel, work: Inputs) -> tuple[int, int, int]:
    """The shape of the images a task of this width x height takes in (the codec's pixels on a latent model)."""
    c, h, w = sample_shape(model, work)
    if model.codec is None:
        return c, h, w
    f = model.codec.factor
    return model.codec.image_channels, h * f, w * f


def texts_of(model: LoadedModel, work: Inputs, n: int) -> tuple[list[str], list[str]] | None:
    """A text model's prompts and negative prompts [n] (one given is used for every image); None for other models.
    Prompts past the tokenizer's limit are truncated as diffusers truncates them; the response says which."""
    if model.conditioner is None:
        return None
    out = []
    for name, value in (("prompt", work.prompt), ("negative_prompt", work.negative_prompt)):
        values = value if isinstance(value, list) else [value or ""] * n
        if len(values) != n:
            raise InvalidRequest(name, f"{name} has {len(values)} texts for {n} images; give one, or one per image")
        out.append([str(v) for v in values])
    return out[0], out[1]


def prompt_fields(model: LoadedModel, texts: tuple[list[str], list[str]] | None) -> dict[str, Any]:
    """The response's prompt fields, with which prompts were cut at the tokenizer's limit (logged too)."""
    if texts is None or model.conditioner is None:
        return {}
    prompts, negatives = texts
    cut = [model.conditioner.truncated(t) for t in prompts]
    cut_negative = [model.conditioner.truncated(t) for t in negatives]
    if any(cut) or any(cut_negative):
        log.warning("prompts longer than the %d tokens of model %s were truncated (as diffusers truncates them)",
                    model.conditioner.token_limit, model.name)
    return {"prompt": prompts, "negative_prompt": negatives, "prompt_truncated": cut,
            "negative_prompt_truncated": cut_negative, "prompt_token_limit": model.conditioner.token_limit}
