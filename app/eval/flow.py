"""`ddim eval-flow`: the flow model beside the DDPM model, by S: FID-FMNIST unconditional and guided, how often
the classifier agrees with the requested class, and the reconstruction error of flow and DDIM inversion.

The same seeds for every cell (the seed contract); guided cells ask for class i % 10 of seed i, so every class
is asked for equally. Not resumable: at the default sizes it runs in minutes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from app.eval.classifier import FMNISTClassifier, embed
from app.eval.curve import curve_md, history_md, image_name
from app.eval.fid import fid, gaussian_stats
from app.eval.samplers import samples
from app.models import LoadedModel
from app.sampling.loop import run_plan
from app.train.data import load_split, to_model_space

UNCONDITIONAL = None


@dataclass(frozen=True)
class FlowEvalConfig:
    n: int = 200
    steps: tuple[int, ...] = (5, 10, 20, 50, 100)
    scales: tuple[float, ...] = (1.0, 2.0, 3.0)
    n_recon: int = 32
    recon_steps: tuple[int, ...] = (5, 10, 20, 50, 100)
    batch_size: int = 100


@dataclass
class FlowResults:
    fid: dict[tuple[str, int], float] = field(default_factory=dict)  # (row, S)
    agreement: dict[tuple[str, int], float] = field(default_factory=dict)
    recon: dict[tuple[str, int], float] = field(default_factory=dict)  # (model kind, S) -> MSE, pixels in [0, 1]
    seconds: float = 0.0


def _reconstruction(model: LoadedModel, x0: torch.Tensor, steps: int) -> float:
    """Invert at eta = 0 and generate back (no clipping either way); per-pixel MSE with pixels in [0, 1]."""
    plan = model.spacings[0]
    x_T = run_plan(model.eps, x0.to(model.device), model.plan(steps, plan, "invert"),
                   prediction_type=model.prediction_type)
    back = run_plan(model.eps, x_T, model.plan(steps, plan, "generate"), prediction_type=model.prediction_type)
    return float((((back.cpu().clamp(-1, 1) - x0) / 2) ** 2).mean())


def row_label(w: float | None) -> str:
    return "unconditional" if w is None else f"w = {w:g}"


def evaluate_flow(flow: LoadedModel, ddpm: LoadedModel, clf: FMNISTClassifier, cfg: FlowEvalConfig,
                  progress: bool = True) -> FlowResults:
    started = time.monotonic()
    test_x = to_model_space(load_split("test")[0], 32)
    ref = gaussian_stats(embed(clf, test_x).features)
    r = FlowResults()
    rows: list[float | None] = [UNCONDITIONAL, *cfg.scales]
    work = sum(cfg.steps) * cfg.n * (1 + sum(1 if w in (None, 1.0) else 2 for w in rows))
    bar = tqdm(total=work, desc="eval-flow", unit="img-step", unit_scale=True, disable=not progress)
    for s in cfg.steps:
        ddim = samples(ddpm, "ddim", s, cfg.n, cfg.batch_size, None, bar)
        r.fid["DDPM, DDIM eta = 0", s] = fid(embed(clf, ddim).features, ref)
        for w in rows:
            e = embed(clf, samples(flow, "ddim", s, cfg.n, cfg.batch_size, w, bar))
            r.fid[f"flow, {row_label(w)}", s] = fid(e.features, ref)
            if w is not None:
                r.agreement[f"flow, {row_label(w)}", s] = float((e.classes == np.arange(cfg.n) % 10).mean())
    bar.close()
    x0 = test_x[np.random.default_rng(0).permutation(len(test_x))[:cfg.n_recon]]
    for s in cfg.recon_steps:
        r.recon["flow", s] = _reconstruction(flow, x0, s)
        r.recon["vp", s] = _reconstruction(ddpm, x0, s)
    r.seconds = time.monotonic() - started
    return r


def _steps(model: LoadedModel) -> str:
    path = model.path / "training.json"
    return f"{json.loads(path.read_text())['step']:,}" if path.exists() else "?"


def flow_md(r: FlowResults, cfg: FlowEvalConfig, flow: LoadedModel, ddpm: LoadedModel, command: str) -> str:
    head = "| | " + " | ".join(f"S = {s}" for s in cfg.steps) + " |\n|---|" + "---|" * len(cfg.steps) + "\n"
    fid_rows = "".join(f"| {row} | " + " | ".join(f"{r.fid[row, s]:.2f}" for s in cfg.steps) + " |\n"
                       for row in dict.fromkeys(k for k, _ in r.fid))
    agree_rows = "".join(f"| {row} | " + " | ".join(f"{r.agreement[row, s]:.1%}" for s in cfg.steps) + " |\n"
                         for row in dict.fromkeys(k for k, _ in r.agreement))
    rh = "| | " + " | ".join(f"S = {s}" for s in cfg.recon_steps) + " |\n|---|" + "---|" * len(cfg.recon_steps) + "\n"
    recon_rows = "".join(f"| {name} | " + " | ".join(f"{r.recon[kind, s]:.5f}" for s in cfg.recon_steps) + " |\n"
                         for kind, name in (("flow", f"flow inversion ({flow.name})"),
                                            ("vp", f"DDIM inversion ({ddpm.name})")))
    s10 = min(cfg.steps, key=lambda s: abs(s - 10))
    few = (f"At S = {s10} the flow model's unconditional FID-FMNIST is {r.fid['flow, unconditional', s10]:.2f} "
           f"against the DDPM model's {r.fid['DDPM, DDIM eta = 0', s10]:.2f} at DDIM eta = 0: "
           + ("straight paths win at few steps here." if r.fid['flow, unconditional', s10]
              < r.fid['DDPM, DDIM eta = 0', s10] else "straight paths do not win at few steps here, as measured."))
    curve = curve_md(flow.path, f"img/{image_name(flow.name)}")
    return f"""# The flow model beside the DDPM model

`{flow.name}` (rectified flow, class-conditional, {flow.kind} path, shift {flow.shift}) against `{ddpm.name}`
(DDPM, DDIM eta = 0), measured with the same seeds 0..{cfg.n - 1} in every cell. FID-FMNIST is the Frechet
distance between the project's Fashion-MNIST classifier's features of {cfg.n} samples and of the 10,000 test
images (lower is better; see [quality.md](quality.md) for what it is and its floor at small n; the multistep
samplers on this model: [quality-samplers.md](quality-samplers.md)). Guided rows ask
for class i % 10 of seed i. Training so far: {_steps(flow)} optimiser steps for the flow model, {_steps(ddpm)} for
the DDPM model, at the same batch size: not yet a comparison between equals. Made in {r.seconds / 60:.0f} minutes by

```sh
{command}
```

## FID-FMNIST by S

{head}{fid_rows}
{few}

## How often the classifier agrees with the requested class

{head}{agree_rows}
{curve}## Reconstruction: invert a test image at eta = 0, generate it back (per-pixel MSE, pixels in [0, 1])

{cfg.n_recon} test images; flow inversion runs the Euler loop with the sigmas reversed, DDIM inversion is Eq. 14.

{rh}{recon_rows}"""



def model_card(root: Path, report: str) -> str:
    """The flow model's card (README.md): what it is (path, classes, the null label), its training, and the
    report's tables."""
    tables = "## " + report.split("\n## ", 1)[1] if "\n## " in report else report
    info = json.loads((root / "training.json").read_text())
    unet = json.loads((root / "unet/config.json").read_text())
    shift = json.loads((root / "scheduler/scheduler_config.json").read_text()).get("shift", 1.0)
    labels = json.loads((root / "model_index.json").read_text())["id2label"]
    names = [labels[str(i)] for i in range(len(labels))]
    keys = ("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
            "down_block_types", "up_block_types", "norm_num_groups", "num_class_embeds")
    arch = json.dumps({k: unet[k] for k in keys}, indent=2)
    classes = ", ".join(f"{i} = {n}" for i, n in enumerate(names))
    return f"""# {root.name}

A class-conditional rectified-flow model (`UNet2DModel` + `FlowMatchEulerDiscreteScheduler`, diffusers layout)
trained on Fashion-MNIST, served by ddim-serve with Euler/DDIM sampling, inversion and classifier-free guidance.

## What it is

- Path: rectified flow, x_sigma = (1 - sigma) x0 + sigma eps. The network gets timestep 1000 sigma and predicts the
  velocity v = eps - x0 (diffusers' FlowMatchEulerDiscreteScheduler convention), shift {shift}.
- Classes: {len(names)}, named in `model_index.json` under `id2label` (the key diffusers' DiTPipeline uses):
  {classes}.
- **The null (unconditional) label is index {unet["num_class_embeds"] - 1}**, the class embedding's last row. It is
  reserved: requests leave out `class_label` for unconditional samples, and the server feeds this index.
- Classifier-free guidance: pred = uncond + w (cond - uncond); w = 1 is plain conditional sampling, w = 0
  unconditional.

## Training

`ddim train --objective flow --name {root.name}` (resumable: run it again to continue), then
`ddim export --name {root.name} --out model_store/{root.name}`.

- Data: the 60,000 Fashion-MNIST training images (Debian `dataset-fashion-mnist`), 28x28 grey in [-1, 1] on a
  32x32 black border, random horizontal flips; the 10,000 test images only for evaluation.
- Objective: MSE to v = eps - x0 at sigma ~ U(0, 1); labels dropped to the null label for
  {100 * info["class_dropout"]:.0f} % of each batch, so one model serves unconditional and guided sampling.
- AdamW, lr {info["lr"]}, batch {info["batch_size"]}, EMA {info["ema_decay"]}, seed {info["seed"]}.
- This export: step {info["step"]} of the planned 8,000 ({info["wall_seconds"] / 3600:.1f} h on 2 shared CPU
  cores). Training goes on from the same checkpoint.
{history_md(info).replace("- steps", "- Steps")}
- {info["parameters"]:,} parameters.

```json
{arch}
```

## Quality

{tables}"""
