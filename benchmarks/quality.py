"""Does a fast path cost sample quality? FID-FMNIST of the same seeds under fp32 and a fast dtype.

Both runs sample the same seeds with the same steps (eta = 0, deterministic), so the only
difference is the arithmetic. "Noise" is the bootstrap standard deviation of the fp32 FID
(resampling its samples), the spread one would see from a different draw of seeds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.eval.classifier import embed, load_classifier
from app.eval.fid import fid, gaussian_stats
from app.eval.quality import Variant, from_seeds
from app.models import load_model
from app.train.data import load_split, to_model_space

DDIM = Variant("eta=0.0", 0.0)


def samples(folder: Path, dtype: str, channels_last: bool, steps: int, n: int, batch: int) -> torch.Tensor:
    model = load_model(folder, dtype=dtype, channels_last=channels_last)
    return torch.cat([from_seeds(model, model.eps, steps, DDIM, first, min(batch, n - first))
                      for first in range(0, n, batch)])


def bootstrap_sd(features: np.ndarray, reference: Any, rounds: int = 50) -> float:
    rng = np.random.default_rng(0)
    return float(np.std([fid(features[rng.integers(0, len(features), len(features))], reference)
                         for _ in range(rounds)]))


def dtype_quality(folder: Path, fast: dict[str, Any], steps: tuple[int, ...], n: int,
                  batch: int = 64) -> list[dict[str, Any]]:
    """One row per S: FID of fp32 and of the fast path on the same seeds, with the noise level."""
    clf = load_classifier()
    test, _ = load_split("test")
    reference = gaussian_stats(embed(clf, to_model_space(test)).features)
    rows = []
    for s in steps:
        started = time.perf_counter()
        plain = samples(folder, "float32", False, s, n, batch)
        quick = samples(folder, fast["dtype"], fast["channels_last"], s, n, batch)
        e_plain, e_quick = embed(clf, plain), embed(clf, quick)
        rows.append({"steps": s, "n": n, "fid_fp32": fid(e_plain.features, reference),
                     "fid_fast": fid(e_quick.features, reference),
                     "noise_sd": bootstrap_sd(e_plain.features, reference),
                     "same_class": float((e_plain.classes == e_quick.classes).mean()),
                     "mean_abs_diff": float((plain - quick).abs().mean()),
                     "seconds": time.perf_counter() - started})
        print(rows[-1], flush=True)
    return rows
