"""docs/quality.md and the model card, from evaluation Results; every verdict is computed, not typed."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.eval.curve import history_md
from app.eval.quality import FLOOR_DRAWS, ROWS, EvalConfig, Results
from app.images import grid
from app.train.data import CLASSES

# Song et al. 2021, Table 1 (CIFAR10 FID, rows by eta, columns by S) and Table 2 (CIFAR-10 MSE).
PAPER_STEPS = (10, 20, 50, 100, 1000)
PAPER_TABLE1 = {
    "eta=0.0": (13.36, 6.84, 4.67, 4.16, 4.04),
    "eta=0.2": (14.04, 7.11, 4.77, 4.25, 4.09),
    "eta=0.5": (16.66, 8.35, 5.25, 4.46, 4.29),
    "eta=1.0": (41.07, 18.36, 8.01, 5.78, 4.73),
    "sigma-hat": (367.43, 133.37, 32.72, 9.99, 3.17),
}
PAPER_TABLE2 = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009, 200: 0.0004, 500: 0.0001, 1000: 0.0001}
ROW_NAMES = {"eta=0.0": "η = 0.0", "eta=0.2": "η = 0.2", "eta=0.5": "η = 0.5", "eta=1.0": "η = 1.0",
             "sigma-hat": "σ̂"}
MAX_CLASS_SHARE = 0.25


def _paper(row: str, s: int) -> str:
    return f"{PAPER_TABLE1[row][PAPER_STEPS.index(s)]:g}" if s in PAPER_STEPS else "–"


def table1(r: Results, cfg: EvalConfig) -> str:
    """Ours (paper's CIFAR10 FID in brackets) by row and S."""
    cols = [*cfg.steps, *cfg.long_steps]
    head = "| | " + " | ".join(f"S = {s}" for s in cols) + " |\n|---|" + "---:|" * len(cols) + "\n"
    lines = []
    for v in ROWS:
        cells = [f"**{r.fid[v.label, s]:.2f}** ({_paper(v.label, s)})" if (v.label, s) in r.fid else
                 f"– ({_paper(v.label, s)})" for s in cols]
        lines.append(f"| {ROW_NAMES[v.label]} | " + " | ".join(cells) + " |")
    counts = " | ".join(str(r.samples.get(("eta=0.0", s), "–")) for s in cols)
    return head + "\n".join(lines) + f"\n| samples per cell | {counts} |\n"


def table1_at_long(r: Results, cfg: EvalConfig) -> str:
    cols = [*cfg.steps, *cfg.long_steps]
    head = "| | " + " | ".join(f"S = {s}" for s in cols) + " |\n|---|" + "---:|" * len(cols) + "\n"
    return head + "\n".join(
        f"| {ROW_NAMES[v.label]} | " + " | ".join(f"{r.fid_at_long[v.label, s]:.2f}" if (v.label, s) in r.fid_at_long
                                                  else "–" for s in cols) + " |"
        for v in ROWS) + "\n"


def table2(r: Results) -> str:
    steps = list(r.recon)
    return ("| S | " + " | ".join(map(str, steps)) + " |\n|---|" + "---:|" * len(steps) + "\n"
            + "| ours (Fashion-MNIST) | " + " | ".join(f"{r.recon[s]:.2g}" for s in steps) + " |\n"
            + "| paper (CIFAR-10) | " + " | ".join(f"{PAPER_TABLE2[s]:g}" if s in PAPER_TABLE2 else "–"
                                                  for s in steps) + " |\n")


def pattern_verdict(r: Results, cfg: EvalConfig) -> str:
    """Does our model show the paper's pattern? Small S: eta = 0 best, sigma-hat far worst (over 2x
    eta = 0); large S: the sigma-hat - eta = 0 gap closes (below a quarter of the small-S gap, both
    measured on the first n_long samples of each cell so that the sample counts match)."""
    s0 = min(cfg.steps)
    at = {v.label: r.fid[v.label, s0] for v in ROWS}
    best, worst = min(at, key=at.__getitem__), max(at, key=at.__getitem__)
    ratio = at["sigma-hat"] / max(at["eta=0.0"], 1e-12)
    small = best == "eta=0.0" and worst == "sigma-hat" and ratio > 2
    first = "η = 0 is the best row" if best == "eta=0.0" else f"the best row is {ROW_NAMES[best]}, not η = 0"
    if worst == "sigma-hat" and ratio > 2:
        second = f"σ̂ is the far worst ({at['sigma-hat']:.2f}, {ratio:.1f}× η = 0)"
    elif worst == "sigma-hat":
        second = f"σ̂ is the worst ({at['sigma-hat']:.2f}) but not by 2× η = 0 ({ratio:.1f}×)"
    else:
        second = f"σ̂ ({at['sigma-hat']:.2f}) is not the worst row ({ROW_NAMES[worst]} is)"
    versus = "lower" if at["eta=0.0"] < at["eta=1.0"] else "not lower"
    text = (f"At S = {s0}, {first} (η = 0: {at['eta=0.0']:.2f}, {versus} than η = 1: {at['eta=1.0']:.2f}) "
            f"and {second}")
    closes = True
    if cfg.long_steps:
        s1 = max(cfg.long_steps)
        g0 = r.fid_at_long["sigma-hat", s0] - r.fid_at_long["eta=0.0", s0]
        g1 = r.fid_at_long["sigma-hat", s1] - r.fid_at_long["eta=0.0", s1]
        closes = g0 > 0 and abs(g1) < g0 / 4
        text += (f"; on the first {cfg.n_long} samples of each cell the σ̂ − η = 0 gap is {g0:+.2f} at S = {s0} "
                 f"and {g1:+.2f} at S = {s1}, so it {'closes' if closes else 'does not close'}"
                 + (" (σ̂ even edges ahead, as in the paper)" if closes and g1 < 0 else ""))
    verdict = ("shows the paper's pattern" if small and closes else
               "shows the paper's pattern only in part" if small or closes else "does not show the paper's pattern")
    return f"{text}. Our model therefore {verdict}."


def agreement(r: Results, cfg: EvalConfig) -> str:
    """Where the tables follow the paper's trends, and where not."""
    falling = [v.label for v in ROWS if all(r.fid[v.label, a] >= r.fid[v.label, b] for a, b in pairwise(cfg.steps))]
    order = [v.label for v in ROWS]
    same = [s for s in cfg.steps if sorted(order, key=lambda k: r.fid[k, s]) == order]
    where = f"S = {', '.join(map(str, same))}" if same else "no S"
    out = [(f"FID falls monotonically from S = {min(cfg.steps)} to {max(cfg.steps)} in {len(falling)} of "
            f"{len(ROWS)} rows (paper: all 5)"),
           f"the rows rank η = 0 < 0.2 < 0.5 < 1 < σ̂, as in the paper, at {where} of {', '.join(map(str, cfg.steps))}"]
    recon = list(r.recon.values())
    mono = all(a >= b for a, b in pairwise(recon))
    ratios = [r.recon[s] / PAPER_TABLE2[s] for s in r.recon if s in PAPER_TABLE2]
    out.append(f"the reconstruction error {'falls' if mono else 'does not fall'} monotonically with S (paper: falls)"
               + (f", at {min(ratios):.2g}–{max(ratios):.2g}× the paper's CIFAR-10 values" if ratios else ""))
    return "; ".join(out) + "."


def balance_line(r: Results, cfg: EvalConfig) -> str:
    c = r.class_counts
    share = c.max() / max(c.sum(), 1)
    ok = bool((c > 0).all()) and share <= MAX_CLASS_SHARE
    dist = ", ".join(f"{name} {k}" for name, k in zip(CLASSES, c.tolist()))
    return (f"Class balance over {int(c.sum())} samples (S = {cfg.balance_steps}, η = 0, seeds from 100000): "
            f"{dist}. {int((c > 0).sum())} of 10 classes appear, the largest takes {share:.0%}: "
            f"**{'pass' if ok else 'FAIL'}** (every class present, none above {MAX_CLASS_SHARE:.0%}).")


def write_images(r: Results, img_dir: Path, scale: int = 2) -> dict[str, Path]:
    """PNG grids (8 per row) and the slerp strip, upscaled (nearest) for reading."""
    img_dir.mkdir(parents=True, exist_ok=True)

    def save(images: np.ndarray, ncols: int, name: str) -> Path:
        g = grid([Image.fromarray(a) for a in images], ncols=ncols)
        path = img_dir / name
        g.resize((g.width * scale, g.height * scale), Image.Resampling.NEAREST).save(path)
        return path
    out = {f"grid S={s}": save(ims, 8, f"grid_S{s}.png") for s, ims in r.grids.items()}
    out["slerp"] = save(r.slerp, len(r.slerp), "slerp.png")
    return out


def _minutes(r: Results, prefix: str) -> float:
    return sum(v for k, v in r.seconds.items() if k.startswith(prefix)) / 60


def quality_md(r: Results, cfg: EvalConfig, meta: dict[str, Any], images: dict[str, Path], out: Path) -> str:
    """docs/quality.md: both tables beside the paper's, counts, floor, verdicts, pictures, commands."""
    fl = "; ".join(f"{m} train images vs the test set: {mu:.2f} ± {sd:.2f}" for m, (mu, sd) in r.floor.items())
    pics = "\n".join(f"![{k}]({p.relative_to(out.parent).as_posix() if p.is_relative_to(out.parent) else p})"
                     f"\n\n*{k}*\n" for k, p in images.items())
    long_s = ", ".join(map(str, cfg.long_steps))
    counts = f"{cfg.n} per cell for S ≤ {max(cfg.steps)} (seeds 0–{cfg.n - 1}, the same seeds in every cell)"
    long_note = ""
    if cfg.long_steps:
        counts += f", {cfg.n_long} for S = {long_s} (seeds 0–{cfg.n_long - 1}; η = 0 and σ̂ only)"
        long_note = (f"The S = {long_s} column has its own, higher floor. For a like-for-like column, here is "
                     f"every cell on its first {cfg.n_long} samples:\n\n{table1_at_long(r, cfg)}")
    return f"""# Sample quality of `{meta['model']}`

The DDIM paper's (Song et al. 2021) Table 1 and Table 2, redone for our Fashion-MNIST model. Inception
weights cannot be downloaded here, so FID is **FID-FMNIST**: the Fréchet distance between the
64-dimensional penultimate-layer features of a small Fashion-MNIST classifier (`app/eval/weights/`,
test accuracy {meta['classifier_accuracy']}; features averaged over each image and its mirror image, as the
model was trained on flipped images too) for generated images and for all 10,000 test images.
Its numbers are not on the scale of CIFAR10/Inception FID: compare trends and ratios, not values.
The class-conditional rectified-flow model `fashion-mnist-flow` is measured beside this model's DDIM η = 0 row in [quality-flow.md](quality-flow.md): FID-FMNIST by S, unconditional and guided, the classifier's agreement with the requested class, and flow against DDIM inversion.
The multistep samplers (DPM-Solver++, UniPC) against DDIM, by S, on both bundled models: [quality-samplers.md](quality-samplers.md).

## Table 1: FID-FMNIST by S and η (paper's CIFAR10 FID in brackets)

{table1(r, cfg)}
Samples: {counts}. Timesteps: uniform (τ_i = i·⌊T/S⌋); predicted x0
{'clipped to [-1, 1]' if meta['clip'] else 'not clipped'}, as the model's `clip_sample` says. σ̂ is the "large"
variance: the mean of η = 1 with noise std sqrt(1 − ᾱ_t/ᾱ_t').

FID at small sample counts is biased upwards, so the **data floor** (the same metric for real
train images against the test set, {FLOOR_DRAWS} random subsets, mean ± sd) is: {fl}.
{long_note}
{pattern_verdict(r, cfg)}

## Table 2: reconstruction error (per-dimension MSE, pixels in [0, 1])

{table2(r)}
{cfg.n_recon} test images (a fixed permutation's first {cfg.n_recon}), DDIM-inverted to x_T with S steps
(Eq. 14 run forwards) and generated back with the same S and η = 0, without clipping either way.

## Where we agree with the paper

{agreement(r, cfg)}

## Class balance

{balance_line(r, cfg)}

{meta.get('curve', '')}## Pictures

Grids of seeds 0–{max(map(len, r.grids.values()), default=0) - 1}, 8 per row, at S = {', '.join(map(str, r.grids))} (η = 0: the same x_T in
every grid), and a
slerp (Eq. 67) between the x_T of seeds {cfg.slerp_seeds[0]} and {cfg.slerp_seeds[1]}, {cfg.slerp_frames} frames, each
decoded with S = {cfg.slerp_steps}, η = 0.

{pics}
## Reproduce

```
{meta['command']}
```

The classifier: `ddim train-classifier` (seeded; writes `app/eval/weights/fmnist_classifier.safetensors`).
The run resumes from its cache (`{meta['cache']}`); finished cells are not recomputed.
Compute time of the cached cells (this run: {meta['threads']} CPU thread(s)): Table 1 {_minutes(r, 'gen/'):.1f} min, Table 2
{_minutes(r, 'recon/'):.1f} min, class balance and pictures {_minutes(r, 'balance/') + _minutes(r, 'slerp/'):.1f} min.
"""


def model_card(r: Results, cfg: EvalConfig, model_dir: Path, unet_config: dict[str, Any],
               scheduler_config: dict[str, Any], parameters: int) -> str:
    """model_store/<name>/README.md: data, architecture, training record, quality."""
    training_path = model_dir / "training.json"
    training = json.loads(training_path.read_text()) if training_path.exists() else {}
    params = int(training.get("parameters", parameters))
    steps = f"{training['step']:,}" if "step" in training else "not recorded (no training.json)"
    wall = f"{training['wall_seconds'] / 60:.0f} min" if "wall_seconds" in training else "not recorded"
    arch = {k: unet_config.get(k) for k in ("sample_size", "in_channels", "out_channels", "block_out_channels",
                                            "layers_per_block", "down_block_types", "up_block_types",
                                            "attention_head_dim", "norm_num_groups", "act_fn")}
    sched = {k: scheduler_config.get(k) for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                                                  "variance_type", "prediction_type", "clip_sample")}
    return f"""# {model_dir.name}

A DDPM ε-model (`UNet2DModel` + `DDPMScheduler`, diffusers layout) trained with L_simple on
Fashion-MNIST, served by ddim-serve with DDIM/DDPM sampling.

## Data

The 60,000 Fashion-MNIST training images (Debian `dataset-fashion-mnist`), 28×28 grey, scaled to
[-1, 1] and centred on a 32×32 black (-1) border; random horizontal flips. The 10,000 test images are
used only for evaluation.

## Architecture

{params:,} parameters. `unet/config.json`:

```json
{json.dumps(arch, indent=2)}
```

Noise schedule (`scheduler/scheduler_config.json`):

```json
{json.dumps(sched, indent=2)}
```

## Training

Optimiser steps: {steps}. Wall time: {wall}.

{history_md(training)}
## Quality

FID-FMNIST (64-d features of a Fashion-MNIST classifier; see `docs/quality.md`), paper's CIFAR10 FID
in brackets:

{table1(r, cfg)}
Data floor: {'; '.join(f'{m} samples {mu:.2f} ± {sd:.2f}' for m, (mu, sd) in r.floor.items())}.
{pattern_verdict(r, cfg)}

Reconstruction error (DDIM inversion then generation, per-dimension MSE in [0, 1]):

{table2(r)}
{balance_line(r, cfg)}
"""
