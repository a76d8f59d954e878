"""`python -m app.eval.curve`: the training curve of a bundled model (issue 25), from a `ddim train` workdir.

Each EMA snapshot (workdir/snapshots/ema-STEP.safetensors) is loaded into the model folder's config and measured
as docs/quality.md measures the shipped weights: FID-FMNIST at S = 10 for DDIM eta = 0 and eta = 1 (n samples,
seeds 0..n-1 in every cell, unconditional), and for a class-conditional model the share of guided samples
(w, S = 20, class i % 10 for seed i) that the independent classifier puts in the requested class. Results are
kept in workdir/curve.json, so a snapshot is measured once; the plot draws them with workdir/loss.jsonl.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.eval.classifier import FMNISTClassifier, embed
from app.eval.fid import GaussianStats, fid, gaussian_stats
from app.eval.samplers import samples
from app.models import LoadedModel, load_model
from app.train.data import load_split, to_model_space
from app.train.ddpm import snapshots


@dataclass(frozen=True)
class CurveConfig:
    n: int = 500
    steps: int = 10  # FID's S
    etas: tuple[float, ...] = (0.0, 1.0)
    guidance: float = 3.0  # the class-agreement row's w
    agreement_steps: int = 20
    batch_size: int = 250


def snapshot_model(folder: Path, weights: Path, scratch: Path) -> LoadedModel:
    """The model folder with the snapshot's weights in place of its own (a copy in scratch; folder is not touched)."""
    copy = scratch / folder.name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    shutil.copy(weights, copy / "unet" / "diffusion_pytorch_model.safetensors")
    return load_model(copy, name=folder.name)


def measure(model: LoadedModel, clf: FMNISTClassifier, ref: GaussianStats, cfg: CurveConfig) -> dict[str, float]:
    point: dict[str, float] = {}
    for eta in cfg.etas:
        x = samples(model, "ddim", cfg.steps, cfg.n, cfg.batch_size, None, eta=eta)
        point[f"fid_eta{eta:g}"] = fid(embed(clf, x).features, ref)
    if model.conditional:
        x = samples(model, "ddim", cfg.agreement_steps, cfg.n, cfg.batch_size, cfg.guidance)
        point["agreement"] = float((embed(clf, x).classes == np.arange(cfg.n) % 10).mean())
    return point


def update(workdir: Path, folder: Path, clf: FMNISTClassifier, cfg: CurveConfig,
           only: set[int] | None = None) -> dict[int, dict[str, float]]:
    """Measure the snapshots not yet in workdir/curve.json (only: these steps, if given); returns every point."""
    cache = workdir / "curve.json"
    saved: dict[str, Any] = json.loads(cache.read_text()) if cache.exists() else {}
    if saved.get("config") != cfg.__dict__ | {"etas": list(cfg.etas)}:
        saved = {"config": cfg.__dict__ | {"etas": list(cfg.etas)}, "points": {}}
    ref = gaussian_stats(embed(clf, to_model_space(load_split("test")[0], 32)).features)
    with tempfile.TemporaryDirectory() as scratch:
        for step, weights in snapshots(workdir).items():
            if str(step) in saved["points"] or (only is not None and step not in only):
                continue
            saved["points"][str(step)] = measure(snapshot_model(folder, weights, Path(scratch)), clf, ref, cfg)
            print(f"step {step}: {saved['points'][str(step)]}", flush=True)
            cache.write_text(json.dumps(saved, indent=1) + "\n")
    return {int(k): v for k, v in sorted(saved["points"].items(), key=lambda kv: int(kv[0]))}


def losses(workdir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, mean loss) from workdir/loss.jsonl; a step logged twice (a resumed run) keeps its last value."""
    rows = {}
    path = workdir / "loss.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        rows[row["step"]] = row["loss"]
    steps = np.array(sorted(rows))
    return steps, np.array([rows[s] for s in steps])


def plot(name: str, workdir: Path, points: dict[int, dict[str, float]], cfg: CurveConfig, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps, loss = losses(workdir)
    shown = steps <= max(points) if points else np.full(len(steps), True)  # not past the last measured weights
    left.plot(steps[shown], loss[shown], lw=0.8)
    left.set(xlabel="optimiser step", ylabel="training loss (mean of 50 steps)", title=f"{name}: loss")
    xs = sorted(points)
    for eta in cfg.etas:
        right.plot(xs, [points[s][f"fid_eta{eta:g}"] for s in xs], "o-", label=f"FID, S = {cfg.steps}, η = {eta:g}")
    right.set(xlabel="optimiser step", ylabel=f"FID-FMNIST ({cfg.n} samples)", title=f"{name}: sample quality")
    if any("agreement" in p for p in points.values()):
        twin = right.twinx()
        twin.plot(xs, [100 * points[s]["agreement"] for s in xs], "s--", color="tab:green",
                  label=f"class agreement, w = {cfg.guidance:g}, S = {cfg.agreement_steps}")
        twin.set_ylabel("class agreement (%)")
        twin.legend(loc="center right", fontsize=8)
    right.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def image_name(model: str) -> str:
    """The curve's picture, under docs/img/."""
    return f"training-{model}.png"


def record(model_dir: Path, points: dict[int, dict[str, float]], cfg: CurveConfig) -> None:
    """Keep the measured points in the model folder's training.json (the card and the docs render them)."""
    path = model_dir / "training.json"
    info = json.loads(path.read_text())
    info["curve"] = {"n": cfg.n, "steps": cfg.steps, "guidance": cfg.guidance, "agreement_steps": cfg.agreement_steps,
                     "points": [{"step": s, **p} for s, p in sorted(points.items())]}
    path.write_text(json.dumps(info, indent=2) + "\n")


def history_md(info: dict[str, Any]) -> str:
    """Which machine trained which steps (training.json's history), as a list."""
    return "".join(f"- steps {h['steps']}: {h['machine']}, {h['wall_seconds'] / 3600:.1f} h; {h['note']}\n"
                   for h in info.get("history", []))


def curve_md(model_dir: Path, image: str) -> str:
    """The training curve section of docs/quality.md and docs/quality-flow.md ('' before any point is recorded)."""
    info = json.loads((model_dir / "training.json").read_text())
    if "curve" not in info:
        return ""
    c = info["curve"]
    agreement = any("agreement" in p for p in c["points"])
    head = "| step | FID, η = 0 | FID, η = 1 |" + (f" class agreement, w = {c['guidance']:g} |" if agreement else "")
    rows = "".join(f"| {p['step']:,} | {p['fid_eta0']:.2f} | {p['fid_eta1']:.2f} |"
                   + (f" {p['agreement']:.1%} |" if agreement else "") + "\n" for p in c["points"])
    agree_note = (f"; class agreement: guided samples at w = {c['guidance']:g}, S = {c['agreement_steps']}, that the "
                  "classifier puts in the requested class" if agreement else "")
    return f"""## Training curve

![training curve of {model_dir.name}]({image})

FID-FMNIST of the EMA weights at S = {c['steps']} ({c['n']} samples, seeds 0–{c['n'] - 1}, unconditional){agree_note}.
The loss is the mean of each 50 steps since `loss.jsonl` was kept (issue 25's resumed run).

{head}
|---|---:|---:|{'---:|' if agreement else ''}
{rows}
{history_md(info)}
Made by `python -m app.eval.curve --workdir DIR --model {model_dir.name} --record --plot docs/{image}` over a
`ddim train` workdir (its snapshots: `ddim train` keeps the EMA weights every 1,000 steps).

"""


def main(argv: list[str] | None = None) -> None:
    """python -m app.eval.curve --workdir DIR --model fashion-mnist-flow [--n 500] [--plot docs/img/curve.png]"""
    import argparse

    import torch

    from app.eval.classifier import load_classifier

    p = argparse.ArgumentParser(prog="python -m app.eval.curve", description=main.__doc__)
    p.add_argument("--workdir", type=Path, required=True, help="the `ddim train` workdir with snapshots/")
    p.add_argument("--model", required=True, help="the model folder (its config) under --model-store")
    p.add_argument("--model-store", type=Path, default=Path("model_store"))
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", help="measure only these snapshot steps (comma-separated); default: every new one")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plot", type=Path, help="write the curve here (PNG)")
    p.add_argument("--record", action="store_true", help="keep the points in the model folder's training.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = CurveConfig(n=a.n)
    only = {int(s) for s in a.steps.split(",")} if a.steps else None
    points = update(a.workdir, a.model_store / a.model, load_classifier(), cfg, only)
    if a.plot:
        plot(a.model, a.workdir, points, cfg, a.plot)
    if a.record:
        record(a.model_store / a.model, points, cfg)


if __name__ == "__main__":
    main()
