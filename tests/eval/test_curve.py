"""The training curve (issue 25): each EMA snapshot of a `ddim train` workdir is measured once, recorded in the
model folder's training.json, and rendered (with the history of which machine trained which steps) into the docs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from app.eval.classifier import load_classifier
from app.eval.curve import CurveConfig, curve_md, plot, record, update
from app.models.folder import random_model_folder
from app.train.data import CLASSES
from app.train.ddpm import save_snapshot
from tests.eval.test_quality import TINY_32

FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


@pytest.mark.dataset("fashion-mnist")  # FID-FMNIST reads the test images
def test_each_snapshot_is_measured_once_recorded_and_rendered(tmp_path: Path) -> None:
    unet = {**TINY_32, "num_class_embeds": len(CLASSES) + 1}
    folder = tmp_path / "store" / "tiny-flow"
    random_model_folder(folder, unet, FLOW, seed=0, class_names=list(CLASSES))
    (folder / "training.json").write_text(json.dumps({"step": 3, "wall_seconds": 7200, "history": [
        {"steps": "0-3", "machine": "2 CPU cores", "wall_seconds": 7200, "note": "a test"}]}))
    work = tmp_path / "work"
    for step, seed in ((1000, 1), (2000, 2)):
        torch.manual_seed(seed)
        save_snapshot(work, UNet2DModel(**unet), step)
    (work / "loss.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in (50, 100, 100)))
    cfg = CurveConfig(n=6, steps=2, agreement_steps=2, batch_size=4)
    clf = load_classifier()

    points = update(work, folder, clf, cfg)
    assert sorted(points) == [1000, 2000]
    assert all(set(p) == {"fid_eta0", "fid_eta1", "agreement"} for p in points.values())
    assert all(np.isfinite(p["fid_eta0"]) and 0 <= p["agreement"] <= 1 for p in points.values())
    assert points[1000] != points[2000]  # different weights, different samples
    assert update(work, folder, clf, cfg) == points  # measured once: the cache answers the second time

    record(folder, points, cfg)
    text = curve_md(folder, "img/training-tiny-flow.png")
    assert "![training curve of tiny-flow](img/training-tiny-flow.png)" in text
    assert f"| 2,000 | {points[2000]['fid_eta0']:.2f} | {points[2000]['fid_eta1']:.2f} |" in text
    assert "steps 0-3: 2 CPU cores, 2.0 h; a test" in text
    plot("tiny-flow", work, points, cfg, tmp_path / "curve.png")
    assert Image.open(tmp_path / "curve.png").size[0] > 500


def test_no_curve_section_before_a_point_is_recorded(tmp_path: Path) -> None:
    random_model_folder(tmp_path / "m", TINY_32, FLOW, seed=0)
    (tmp_path / "m" / "training.json").write_text('{"step": 1}')
    assert curve_md(tmp_path / "m", "img/x.png") == ""
