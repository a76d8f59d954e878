"""`ddim train` on the real Fashion-MNIST files with a tiny UNet: a stopped run resumes to the very weights of an
unstopped one, keeps its EMA snapshots and loss curve, starts from a model folder, and exports a loadable folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.train.ddpm import TrainConfig, export, snapshots, train

UNET = {"sample_size": 32, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
        "layers_per_block": 1, "norm_num_groups": 4,
        "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}

pytestmark = pytest.mark.dataset("fashion-mnist")


def config(steps: int, objective: str = "epsilon") -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, warmup=2, checkpoint_every=2, snapshot_every=2, threads=1,
                       objective=objective, num_classes=10 if objective == "flow" else 0, unet=dict(UNET))


def ema(workdir: Path) -> dict[str, torch.Tensor]:
    return torch.load(workdir / "checkpoint.pt", map_location="cpu", weights_only=False)["ema"]


@pytest.mark.parametrize("objective", ["epsilon", "flow"])
def test_a_stopped_run_resumes_to_the_weights_of_an_unstopped_one(tmp_path: Path, objective: str) -> None:
    train(config(6, objective), tmp_path / "whole")
    train(config(4, objective), tmp_path / "parts")  # stopped at step 4 ...
    train(config(6, objective), tmp_path / "parts")  # ... and resumed from its checkpoint
    whole, parts = ema(tmp_path / "whole"), ema(tmp_path / "parts")
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert sorted(snapshots(tmp_path / "parts")) == [2, 4, 6]
    last = load_file(snapshots(tmp_path / "parts")[6])
    assert all(torch.equal(last[k], whole[k]) for k in whole)  # a snapshot is the EMA at its step
    first = load_file(snapshots(tmp_path / "parts")[2])
    assert any(not torch.equal(first[k], whole[k]) for k in whole)
    assert not (tmp_path / "whole" / "loss.jsonl").read_text()  # under 50 steps: no mean written yet


def test_init_from_starts_at_the_folders_step_and_exports_a_loadable_folder(tmp_path: Path) -> None:
    train(config(4), tmp_path / "first")
    export(tmp_path / "first", tmp_path / "model")
    info = json.loads((tmp_path / "model" / "training.json").read_text())
    assert info["step"] == 4 and info["objective"] == "epsilon"
    shipped = load_file(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(shipped[k], v) for k, v in ema(tmp_path / "first").items())

    train(config(6), tmp_path / "more", init_from=tmp_path / "model")
    state = torch.load(tmp_path / "more" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 6 and state["warm_from"] == 4
    assert sorted(snapshots(tmp_path / "more")) == [6]  # steps 5 and 6 were this run's; 4 was the folder's
    assert any(not torch.equal(state["ema"][k], shipped[k]) for k in shipped)  # it trained on from there
