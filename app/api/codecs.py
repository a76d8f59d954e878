"""Decoding client payloads (base64 .npy and images) into tensors, with errors that name the field."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from app.engine.errors import InvalidRequest, PayloadTooLarge
from app.images import from_npy_bytes, to_model_space

# The server's own limit (max_image_pixels, checked on the header before any pixel is decoded) replaces Pillow's
# decompression-bomb check, so that every image over it gets the same message, whatever its size.
Image.MAX_IMAGE_PIXELS = None

__all__ = ["PayloadTooLarge", "b64decode", "b64encode", "decode_image", "decode_npy"]


def b64decode(data: str, field: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(field, f"{field} is not valid base64 ({e})") from e


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_npy(data: str, field: str) -> torch.Tensor:
    """base64 .npy -> float32 tensor (never unpickles)."""
    raw = b64decode(data, field)
    try:
        arr = from_npy_bytes(raw)
    except (ValueError, OSError, EOFError, MemoryError) as e:
        raise InvalidRequest(field, f"{field} is not a readable .npy array ({e})") from e
    if arr.dtype.kind not in "fiu":
        raise InvalidRequest(field, f"{field} must be a numeric array, got dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def decode_image(raw: bytes, field: str, shape: tuple[int, int, int], max_pixels: int) -> torch.Tensor:
    """PNG/JPEG bytes -> [C, H, W] in [-1, 1], resized and centre-cropped to the model's shape."""
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only
    except UnidentifiedImageError as e:  # its message holds the repr of our buffer: say what it means instead
        raise InvalidRequest(field, f"{field} is not an image in a format this server reads (PNG, JPEG, ...)") from e
    except (OSError, SyntaxError, ValueError, TypeError) as e:
        raise InvalidRequest(field, f"{field} cannot be decoded as an image ({e})") from e
    if image.width * image.height > max_pixels:
        raise PayloadTooLarge(field, f"{field} is {image.width}x{image.height} pixels; this server takes at most "
                                     f"{max_pixels} pixels per image")
    try:
        image.load()
        return to_model_space(image, shape)
    except (OSError, SyntaxError, ValueError, TypeError) as e:
        raise InvalidRequest(field, f"{field} cannot be decoded as an image ({e})") from e
