"""Conversions between model space ([-1, 1] float tensors) and images (PNG, GIF, .npy)."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image, ImageOps


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C]."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def pil_images(x: torch.Tensor) -> list[Image.Image]:
    """One PIL image per sample (mode L for one channel, RGB for three)."""
    arr = to_uint8(x)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def grid(images: list[Image.Image], ncols: int | None = None, pad: int = 2) -> Image.Image:
    """Images tiled in rows of ncols (default: a near-square grid)."""
    n = len(images)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    w, h = images[0].size
    canvas = Image.new(images[0].mode, (ncols * (w + pad) + pad, nrows * (h + pad) + pad))
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        canvas.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return canvas


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def gif_bytes(images: list[Image.Image], duration_ms: int = 120) -> bytes:
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return buf.getvalue()


def npy_bytes(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x.detach().float().cpu().numpy())
    return buf.getvalue()


def from_npy_bytes(data: bytes) -> np.ndarray:
    """Parse .npy bytes without ever unpickling, and without trusting the header's size."""
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(buf)
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if need > len(data) - buf.tell():
        raise ValueError(f"the header promises {need} bytes of data, the payload holds {len(data) - buf.tell()}")
    return np.load(io.BytesIO(data), allow_pickle=False)


def to_model_space(image: Image.Image, shape: tuple[int, int, int]) -> torch.Tensor:
    """Resize (shorter side) and centre-crop to (C, H, W), convert channels; -> [C, H, W] in [-1, 1]."""
    c, h, w = shape
    image = ImageOps.exif_transpose(image)
    image = image.convert("L" if c == 1 else "RGB")
    image = ImageOps.fit(image, (w, h), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
    arr = np.asarray(image, dtype=np.float32)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr / 127.5 - 1.0)
