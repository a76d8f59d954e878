"""Small client-side helpers: decode what the server returns."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import Iterator

import httpx
import numpy as np
from PIL import Image


def npy(b64_or_bytes: str | bytes) -> np.ndarray:
    raw = base64.b64decode(b64_or_bytes) if isinstance(b64_or_bytes, str) else b64_or_bytes
    return np.load(io.BytesIO(raw), allow_pickle=False)


def npy_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, arr)
    return base64.b64encode(buf.getvalue()).decode()


def png(b64_or_bytes: str | bytes) -> Image.Image:
    raw = base64.b64decode(b64_or_bytes) if isinstance(b64_or_bytes, str) else b64_or_bytes
    im = Image.open(io.BytesIO(raw))
    im.load()
    return im


def png_b64(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def forwards(client: httpx.Client, model: str) -> int:
    """ε-network forwards so far, read from /metrics (the count of ddim_batch_size)."""
    text = client.get("/metrics").text
    m = re.search(rf'^ddim_batch_size_count\{{model="{re.escape(model)}"\}} ([0-9.e+]+)$', text, re.M)
    return int(float(m.group(1))) if m else 0


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs of a text/event-stream response, as they arrive."""
    kind, data = "message", []
    for line in response.iter_lines():
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            yield kind, json.loads("\n".join(data))
            kind, data = "message", []


def wait_for(client: httpx.Client, job_id: str, statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
             polls: int = 600) -> dict:
    """Poll GET /jobs/{id} until its status is one of statuses (bounded: polls x 0.05 s)."""
    for _ in range(polls):
        state = client.get(f"/jobs/{job_id}").json()
        if state["status"] in statuses:
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {state['status']}")
