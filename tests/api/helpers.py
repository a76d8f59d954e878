"""Small client-side helpers: decode what the server returns."""

from __future__ import annotations

import base64
import io
import re

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
