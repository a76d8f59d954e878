"""Fashion-MNIST from the Debian package dataset-fashion-mnist (gzipped IDX files).

DDIM_FASHION_MNIST_DIR points elsewhere: a folder holding the same four files, on systems without the package.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path(os.environ.get("DDIM_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) for split 'train' or 't10k'/'test'."""
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}[split]
    images = root / f"{prefix}-images-idx3-ubyte.gz"
    labels = root / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (images, labels):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: apt-get install dataset-fashion-mnist, or set "
                                    "DDIM_FASHION_MNIST_DIR to a folder with the four files")
    return read_idx(images), read_idx(labels)


def to_model_space(images: np.ndarray, size: int = 32) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, size, size] in [-1, 1], zero-padded (black) around."""
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    pad = (size - x.shape[-1]) // 2
    if pad > 0:
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)
    return x
