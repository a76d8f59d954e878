"""The evaluation's resumable JSON cache: per-cell arrays that grow one finished batch at a time.

Every cell's items are indexed by seed (or test-image) order, so a cell holding m items serves
any run that needs n <= m of them, and a run that needs more continues from item m. The file is
tied to a fingerprint of the model and classifier files; a different fingerprint starts afresh.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CACHE_VERSION = 1
NOT_WEIGHTS = {"README.md", "training.json"}  # written beside the model, not part of it


def default_cache_path(model_name: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "ddim-serve" / "eval" / f"{model_name}.json"


def fingerprint(model_dir: Path, classifier: Path) -> str:
    """sha256 over the model folder's files (but its card) and the classifier weights."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name not in NOT_WEIGHTS)
    for p in [*files, classifier]:
        h.update(str(p.relative_to(model_dir) if p.is_relative_to(model_dir) else p.name).encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _encode(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}


def _decode(d: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["b64"]), dtype=np.dtype(d["dtype"])).reshape(d["shape"])


class EvalCache:
    """Cells by key; each has a count, named arrays of that length, and the seconds spent on it."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.cells: dict[str, dict[str, Any]] = {}
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("fingerprint") == fingerprint:
                self.cells = data.get("cells", {})
                log.info("resuming from %s (%d cells)", path, len(self.cells))
            else:
                log.warning("%s was made with other model or classifier weights; starting afresh", path)

    def count(self, key: str) -> int:
        return int(self.cells.get(key, {}).get("count", 0))

    def seconds(self, key: str) -> float:
        return float(self.cells.get(key, {}).get("seconds", 0.0))

    def arrays(self, key: str) -> dict[str, np.ndarray]:
        return {k: _decode(v) for k, v in self.cells.get(key, {}).get("arrays", {}).items()}

    def append(self, key: str, part: dict[str, np.ndarray], seconds: float) -> None:
        """Add the next items of a cell (every array the same length) and write the file."""
        lengths = {len(v) for v in part.values()}
        if len(lengths) != 1:
            raise ValueError(f"{key}: arrays of different lengths {lengths}")
        old = self.arrays(key)
        if old and set(old) != set(part):
            raise ValueError(f"{key}: cached arrays {sorted(old)} but new ones {sorted(part)}")
        merged = {k: np.concatenate([old[k], v]) if old else v for k, v in part.items()}
        self.cells[key] = {"count": self.count(key) + lengths.pop(), "seconds": self.seconds(key) + seconds,
                           "arrays": {k: _encode(v) for k, v in merged.items()}}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "fingerprint": self.fingerprint,
                                   "cells": self.cells}))
        tmp.replace(self.path)
