"""`ddim eval-samplers`: FID-FMNIST by S for each sampler (ddim, dpmsolver++, unipc) on the bundled models.

The same seeds in every cell (image i is seed i, the seed contract); n samples per cell; the data floor is the FID
of n random train images against the same reference (all 10,000 test images), over FLOOR_DRAWS subsets, so a
cell's FID reads against what n real images score. ddim runs at eta = 0 with the model's own clipping and
schedule; the multistep samplers (order 2) with their diffusers scheduler's default spacing and no clipping.
Guided rows (the flow model) ask for class i % 10 of seed i.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from app.eval.classifier import FMNISTClassifier, embed
from app.eval.fid import fid, gaussian_stats
from app.models import LoadedModel
from app.models.store import SAMPLERS
from app.sampling import draw, sample_generators
from app.sampling.loop import run_plan, run_solver
from app.train.data import load_split, to_model_space

FLOOR_DRAWS = 3


@dataclass(frozen=True)
class SamplerEvalConfig:
    n: int = 500
    steps: tuple[int, ...] = (5, 10, 20, 50)
    samplers: tuple[str, ...] = SAMPLERS
    guidance: tuple[float, ...] = ()  # class-conditional models: guided rows at these w (besides unconditional)
    batch_size: int = 125


@dataclass
class SamplerResults:
    model: str
    n: int = 0
    steps: tuple[int, ...] = ()
    fid: dict[tuple[str, str, int], float] = field(default_factory=dict)  # (row, sampler, S)
    floor: tuple[float, float] = (0.0, 0.0)  # mean, sd
    seconds: float = 0.0
    command: str = ""
    steps_trained: int = 0  # the weights measured: training.json's step

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "fid"},
                "fid": [[row, sampler, s, v] for (row, sampler, s), v in self.fid.items()]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SamplerResults:
        fid = {(row, sampler, int(s)): float(v) for row, sampler, s, v in d["fid"]}
        return cls(**{**d, "fid": fid, "steps": tuple(d["steps"]), "floor": tuple(d["floor"])})


def samples(model: LoadedModel, sampler: str, steps: int, n: int, batch: int, w: float | None,
            bar: tqdm | None = None, eta: float = 0.0) -> torch.Tensor:
    """n samples from seeds 0..n-1 with this sampler at S steps (w None: unconditional; eta: ddim's)."""
    out = []
    for first in range(0, n, batch):
        k = min(batch, n - first)
        generators = sample_generators(first, k)  # x_T, then (eta > 0) each step's noise: the seed contract
        x_T = draw(generators, model.sample_shape).to(model.device)
        labels = None if w is None else torch.arange(first, first + k) % 10
        net = model.network(labels, 1.0 if w is None else w)
        if sampler == "ddim":
            x = run_plan(net, x_T, model.plan(steps, model.spacings[0], "generate"), eta=eta,
                         prediction_type=model.prediction_type, clip_denoised=model.clip_sample,
                         generators=generators)
        else:
            plan, _ = model.solver_plan(sampler, steps, model.schedule_for(sampler), 2)
            x = run_solver(net, x_T, plan)
        out.append(x.cpu())
        if bar is not None:
            bar.update(k * steps)
    return torch.cat(out)


def evaluate_samplers(model: LoadedModel, clf: FMNISTClassifier, cfg: SamplerEvalConfig,
                      progress: bool = True) -> SamplerResults:
    started = time.monotonic()
    test_x = to_model_space(load_split("test")[0], 32)
    ref = gaussian_stats(embed(clf, test_x).features)
    train = load_split("train")[0]
    floors = [fid(embed(clf, to_model_space(train[np.random.default_rng(2000 + k).choice(len(train), cfg.n,
                                                                                          replace=False)], 32)
                        ).features, ref) for k in range(FLOOR_DRAWS)]
    r = SamplerResults(model.name, cfg.n, cfg.steps, floor=(float(np.mean(floors)), float(np.std(floors))))
    rows: list[float | None] = [None, *cfg.guidance]
    work = cfg.n * sum(cfg.steps) * len(cfg.samplers) * sum(1 if w is None else 2 for w in rows)
    bar = tqdm(total=work, desc=f"eval-samplers {model.name}", unit="img-step", unit_scale=True,
               disable=not progress)
    for w in rows:
        for s in cfg.steps:
            for sampler in cfg.samplers:
                x = samples(model, sampler, s, cfg.n, cfg.batch_size, w, bar)
                r.fid[row_label(w), sampler, s] = fid(embed(clf, x).features, ref)
    bar.close()
    r.seconds = time.monotonic() - started
    return r


def row_label(w: float | None) -> str:
    return "unconditional" if w is None else f"guided, w = {w:g}"


def samplers_md(results: list[SamplerResults], cfg: SamplerEvalConfig, command: str) -> str:
    """The tables, one per model and row, and what holds of the targets."""
    lines = ["# FID-FMNIST by sampler and S", "",
             "FID-FMNIST (see [quality.md](quality.md)) of each sampler on the bundled models. The same seeds 0..n-1 "
             "in every cell of a model (the seed contract); lower is better. ddim: eta = 0, the model's schedule and "
             "clipping; dpmsolver++ and unipc: order 2, their diffusers scheduler's spacing, no clipping "
             "(docs/models.md, Samplers). Each model's section names the command that made it, on this machine's "
             "CPU; the results are kept in benchmarks/quality-samplers.json, so one model is re-run alone.", ""]
    for r in results:
        lines += [f"## {r.model} (n = {r.n} per cell)", "",
                  f"Weights after {r.steps_trained:,} optimiser steps. Made in {r.seconds / 60:.0f} min by "
                  f"`{r.command or command}`.", "",
                  f"Data floor: {r.n} random train images score {r.floor[0]:.2f} "
                  f"(sd {r.floor[1]:.2f} over {FLOOR_DRAWS} draws) against the same reference.", ""]
        for row in dict.fromkeys(k[0] for k in r.fid):
            lines += [f"### {row}", "", "| sampler | " + " | ".join(f"S = {s}" for s in r.steps) + " |",
                      "|---" * (len(r.steps) + 1) + "|"]
            for sampler in cfg.samplers:
                cells = [r.fid.get((row, sampler, s)) for s in r.steps]
                lines.append(f"| {sampler} | " + " | ".join("" if c is None else f"{c:.2f}" for c in cells) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def verdicts(r: SamplerResults) -> list[str]:
    """The issue's target on the DDPM model, and the fastest setting that matches ddim at S = 50."""
    out = []
    f = r.fid
    if ("unconditional", "dpmsolver++", 10) in f and ("unconditional", "ddim", 20) in f:
        a, b = f["unconditional", "dpmsolver++", 10], f["unconditional", "ddim", 20]
        out.append(f"dpmsolver++ at S = 10 ({a:.2f}) {'is at least as good as' if a <= b else 'is worse than'} "
                   f"ddim at S = 20 ({b:.2f}) on {r.model}.")
    if ("unconditional", "ddim", 50) in f:
        target = f["unconditional", "ddim", 50]
        matches = sorted((s, v, sampler) for (row, sampler, s), v in f.items()
                         if row == "unconditional" and v <= target * 1.02)
        if matches:
            s, _, sampler = matches[0]  # the fewest steps, and the best sampler there
            out.append(f"Fewest steps within 2 % of ddim's S = 50 FID ({target:.2f}) on {r.model}: {sampler} at "
                       f"S = {s} ({f['unconditional', sampler, s]:.2f}).")
    return out


def write(results: list[SamplerResults], cfg: SamplerEvalConfig, command: str, out: Path) -> str:
    text = samplers_md(results, cfg, command)
    notes = [v for r in results for v in verdicts(r)]
    if notes:
        text += "## What holds\n\n" + "\n".join(f"- {v}" for v in notes) + "\n"
    out.write_text(text)
    return text


RESULTS_JSON = Path(__file__).resolve().parents[2] / "benchmarks" / "quality-samplers.json"
MODELS = {"fashion-mnist": (), "fashion-mnist-flow": (2.0,)}  # each bundled model and its guided rows' w


def main(argv: list[str] | None = None) -> None:
    """python -m app.eval.samplers [--models fashion-mnist,...] [--n N] [--steps 5,10,20,50]: the models named are
    measured (the others keep their results from --json), then the doc is written from every model's results."""
    import argparse

    from app.eval.classifier import load_classifier
    from app.models import load_model

    p = argparse.ArgumentParser(prog="python -m app.eval.samplers", description=main.__doc__)
    p.add_argument("--models", default=",".join(MODELS), help="which bundled models to measure now")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--steps", default="5,10,20,50")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=RESULTS_JSON)
    p.add_argument("--out", default="docs/quality-samplers.md")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    store = Path(__file__).resolve().parents[2] / "model_store"
    kept = json.loads(a.json.read_text()) if a.json.exists() else {}
    clf = load_classifier()
    steps = tuple(int(s) for s in a.steps.split(","))
    for name in a.models.split(","):
        model = load_model(store / name)
        r = evaluate_samplers(model, clf, SamplerEvalConfig(n=a.n, steps=steps, guidance=MODELS[name]))
        r.command = f"python -m app.eval.samplers --models {name} --n {a.n} --steps {a.steps} --threads {a.threads}"
        trained = model.path / "training.json"
        r.steps_trained = int(json.loads(trained.read_text())["step"]) if trained.exists() else 0
        kept[name] = r.to_json()
        a.json.write_text(json.dumps(kept, indent=1) + "\n")
    results = [SamplerResults.from_json(kept[name]) for name in MODELS if name in kept]
    print(write(results, SamplerEvalConfig(n=a.n, steps=steps), "", Path(a.out)))


if __name__ == "__main__":
    main()
