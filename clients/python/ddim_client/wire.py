"""What travels over HTTP, with no I/O: request bodies from Python values, results and events from JSON, the
server-sent events format, errors from responses, and the retry policy. Client and AsyncClient share it."""

from __future__ import annotations

import base64
import email.utils
import io
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from PIL import Image

from ddim_client.errors import APIError, JobCancelled, error_for

TASKS = ("generate", "invert", "interpolate", "edit")
ImageLike = Union[Image.Image, str, "os.PathLike[str]", bytes, np.ndarray]


# -- Python values -> JSON fields --------------------------------------------------------------------
def encode_npy(array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_npy(data: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(data)), allow_pickle=False)


def decode_png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def encode_image(image: ImageLike) -> str:
    """base64 of an image file: a path's or bytes' content as they are; a PIL image or an array as PNG.
    Arrays are (H, W) or (H, W, C) with C in 1, 3, 4: uint8, or floats in [0, 1]."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            raw = f.read()
    elif isinstance(image, bytes):
        raw = image
    else:
        if isinstance(image, np.ndarray):
            image = _array_image(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"an image must be a PIL image, a path, bytes or a numpy array, not {type(image).__name__}")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        raw = buf.getvalue()
    return base64.b64encode(raw).decode("ascii")


def _array_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"an image array must be (H, W) or (H, W, C) with C 1, 3 or 4; got shape {array.shape} "
                         "(pass a list of arrays for several images)")
    if array.dtype != np.uint8:
        array = (np.clip(np.asarray(array, dtype=np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(array)


def _endpoint(value: Any) -> dict[str, Any]:
    """One end of an interpolation: an int is a seed, a 4-d array (1, C, H, W) an x_T, anything else an image."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return {"seed": int(value)}
    if isinstance(value, np.ndarray) and value.ndim == 4:
        return {"x_T": encode_npy(value)}
    return {"image": encode_image(value)}


def body(task: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body of a task from keyword fields; numpy arrays and images are encoded, the rest passes as is
    (the server refuses unknown fields by name)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    out = {k: v for k, v in fields.items() if v is not None}
    if isinstance(out.get("x_T"), np.ndarray):
        out["x_T"] = encode_npy(out["x_T"])
    if task == "generate" and "image" in out:  # img2img: one image to start from
        out["image"] = encode_image(out["image"])
    if task in ("invert", "edit") and "images" in out:
        images = out["images"]
        many = isinstance(images, (list, tuple))
        out["images"] = [encode_image(im) for im in (images if many else [images])]
    if task == "interpolate":
        for end in ("start", "end"):
            if end in out:
                out[end] = _endpoint(out[end])
    return out


# -- JSON -> Python values ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    """A task's answer. images: generated images, interpolation frames or inversion reconstructions;
    x_T, x_0: numpy arrays when the answer has them; raw: the JSON as the server sent it."""

    images: list[Image.Image]
    x_T: np.ndarray | None
    x_0: np.ndarray | None
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Result:
        images = raw.get("images", raw.get("reconstruction", []))
        return cls(images=[decode_png(s) for s in images],
                   x_T=decode_npy(raw["x_T"]) if raw.get("x_T") else None,
                   x_0=decode_npy(raw["x_0"]) if raw.get("x_0") else None, raw=raw)


@dataclass(frozen=True)
class Event:
    """One event of a run: kind is progress, result, error or cancelled. A progress event has step, steps and
    maybe a preview (the predicted x0, a grid when n > 1); a result event the Result; an error event the error."""

    kind: str
    step: int = 0
    steps: int = 0
    preview: Image.Image | None = None
    result: Result | None = None
    error: APIError | None = None

    @classmethod
    def from_sse(cls, kind: str, data: dict[str, Any], job: str = "") -> Event:
        if kind == "progress":
            preview = decode_png(data["preview"]) if data.get("preview") else None
            return cls(kind, step=int(data.get("step", 0)), steps=int(data.get("steps", 0)), preview=preview)
        if kind == "result":
            return cls(kind, result=Result.from_json(data))
        if kind == "cancelled":
            return cls(kind, error=JobCancelled(f"{job or 'the request'} was cancelled"))
        return cls("error", error=error_for(int(data.get("status", 500)), data.get("detail", data)))

    @property
    def final(self) -> bool:
        return self.kind != "progress"

    def outcome(self) -> Result:
        """The result of a final event; raises its error."""
        if self.result is not None:
            return self.result
        raise self.error or APIError("the event stream ended without a result")


def sse(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs from the lines of a text/event-stream."""
    decoder = SSEDecoder()
    for line in lines:
        event = decoder.feed(line)
        if event is not None:
            yield event


class SSEDecoder:
    """Lines in, (event, data) out once an event is complete."""

    def __init__(self) -> None:
        self.kind, self.data = "message", []  # type: tuple[str, list[str]]

    def feed(self, line: str) -> tuple[str, dict[str, Any]] | None:
        if line.startswith("event:"):
            self.kind = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].strip())
        elif not line and self.data:
            out = self.kind, json.loads("\n".join(self.data))
            self.kind, self.data = "message", []
            return out
        return None


def error_from(status: int, content: bytes, headers: Mapping[str, str]) -> APIError:
    """The typed error of an error response: its JSON detail, or its text when it is not JSON."""
    try:
        detail = json.loads(content)["detail"]
    except (ValueError, KeyError, TypeError):
        detail = content.decode("utf-8", "replace").strip() or f"HTTP {status}"
    return error_for(status, detail, retry_after_seconds(headers.get("retry-after")))


# -- retries ---------------------------------------------------------------------------------------------
def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class RetryPolicy:
    """Retry 429 and 503 (the server did no work) up to `retries` times, waiting what Retry-After says, at most
    `max_wait` seconds each time; without Retry-After, 1, 2, 4... seconds."""

    retries: int = 3
    max_wait: float = 30.0

    def wait(self, status: int, headers: Mapping[str, str], attempt: int) -> float | None:
        """Seconds to wait before attempt + 1, or None to give the answer as it is."""
        if status not in (429, 503) or attempt >= self.retries:
            return None
        advised = retry_after_seconds(headers.get("retry-after"))
        return min(self.max_wait, advised if advised is not None else 2.0 ** attempt)
