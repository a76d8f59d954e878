"""`python -m app.eval.editing`: how well /edit turns one Fashion-MNIST class into another, and what it keeps.

On the bundled class-conditional flow model and the Fashion-MNIST test set: n test images of each source class,
edited to a target class at each strength (S steps; the inversion under the source class at w = 1, the generation
under the target class at --guidance-scale), with the offline loops the server's engine equals
(app/sampling/loop.edit and sdedit; tests/engine/test_editing.py checks that equality). Reported per strength:

- success: the share of edits the project's classifier (app/eval/classifier.py) assigns to the target class;
- preservation: pixel MSE to the source (pixels in [0, 1]) and the distance between classifier features of the
  edit and of its source (the 64-d penultimate layer, FID-FMNIST's space).

The same for img2img (SDEdit) from the unconditional DDPM model (preservation only, and how many stay in their
class). The inversion to t_k is a prefix of the full inversion, so each image is inverted once, in segments, and
every strength starts from its level of that trajectory: the same steps as one inversion of k steps per strength.

Writes the tables into docs/editing.md (between its results markers), docs/img/editing-grid.png and
docs/img/editing-img2img.png, and the numbers as JSON. --n shrinks the run (e.g. --n 8 to check it works).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from app.eval.classifier import FMNISTClassifier, embed, load_classifier
from app.images import grid, pil_images
from app.models import LoadedModel, load_model, pick_device
from app.sampling import Plan, sample_generators, strength_steps
from app.sampling.loop import EpsModel, run_plan, sdedit
from app.train.data import CLASSES, load_split, to_model_space

log = logging.getLogger("app.eval")

PAIRS = ((7, 5), (6, 0), (2, 4), (9, 7))  # Sneaker->Sandal, Shirt->T-shirt/top, Pullover->Coat, Ankle boot->Sneaker
STRENGTHS = (0.3, 0.5, 0.7, 0.9, 1.0)
START, END = "<!-- editing-results:start -->", "<!-- editing-results:end -->"
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class EditEvalConfig:
    n: int = 200  # test images per source class
    steps: int = 50
    strengths: tuple[float, ...] = STRENGTHS
    guidance_scale: float = 4.0  # the target's w; the inversion runs at w = 1
    batch_size: int = 100
    grid_sources: int = 2  # columns of the picture per pair


@dataclass
class EditResults:
    edit: dict[str, dict[str, float]] = field(default_factory=dict)  # "src->tgt@s" and "all@s" -> metrics
    img2img: dict[str, dict[str, float]] = field(default_factory=dict)  # "s" -> metrics
    seconds: float = 0.0


def _segment(plan: Plan, start: int, stop: int) -> Plan:
    """Steps start..stop of a plan (levels start..stop)."""
    return Plan(plan.a[start:stop + 1], plan.s[start:stop + 1], plan.model_t[start:stop])


def _levels(model: LoadedModel, net: EpsModel, x0: torch.Tensor, plan: Plan, ks: list[int]) -> dict[int, torch.Tensor]:
    """x at level t_k of the inversion for each k in ks: one inversion, walked in segments."""
    out, x, at = {}, x0, 0
    for k in sorted(set(ks)):
        x = run_plan(net, x, _segment(plan, at, k), prediction_type=model.prediction_type)
        out[k], at = x, k
    return out


def _metrics(clf: FMNISTClassifier, edits: torch.Tensor, sources: torch.Tensor, want: int) -> dict[str, float]:
    e, s = embed(clf, edits), embed(clf, sources)
    mse = (((edits.clamp(-1, 1) - sources) / 2) ** 2).flatten(1).mean(1)
    return {"success": float((e.classes == want).mean()), "mse": float(mse.mean()),
            "feature_distance": float(np.linalg.norm(e.features - s.features, axis=1).mean())}


def evaluate_editing(flow: LoadedModel, ddpm: LoadedModel, clf: FMNISTClassifier, cfg: EditEvalConfig,
                     progress: bool = True) -> tuple[EditResults, list[Image.Image], list[Image.Image]]:
    started = time.monotonic()
    images, labels = load_split("test")
    x_all = to_model_space(images, 32)
    ks = [strength_steps(cfg.steps, s) for s in cfg.strengths]
    if 0 in ks:
        raise ValueError(f"a strength of {cfg.strengths} makes k = 0 steps of {cfg.steps}")
    spacing = flow.spacings[0]
    up, down = flow.plan(cfg.steps, spacing, "invert"), flow.plan(cfg.steps, spacing, "generate")
    rows = 1 if cfg.guidance_scale == 1 else 2
    work = len(PAIRS) * cfg.n * (max(ks) + rows * sum(ks)) + len(PAIRS) * cfg.n * sum(ks)
    bar = tqdm(total=work, desc="editing", unit="row-step", disable=not progress, dynamic_ncols=True)
    r = EditResults()
    pooled: dict[float, list[dict[str, float]]] = {s: [] for s in cfg.strengths}
    pictures: dict[float | None, list[torch.Tensor]] = {None: [], **{s: [] for s in cfg.strengths}}
    sources_all = []
    for src, tgt in PAIRS:
        x_src = x_all[np.flatnonzero(labels == src)[:cfg.n]]
        sources_all.append(x_src)
        edits: dict[float, list[torch.Tensor]] = {s: [] for s in cfg.strengths}
        for first in range(0, len(x_src), cfg.batch_size):
            x0 = x_src[first:first + cfg.batch_size].to(flow.device)
            b = len(x0)
            source = flow.network(torch.full((b,), src), 1.0)
            target = flow.network(torch.full((b,), tgt), cfg.guidance_scale)
            levels = _levels(flow, source, x0, up, ks)
            bar.update(b * max(ks))
            for s, k in zip(cfg.strengths, ks):
                start = down.steps - k
                edits[s].append(run_plan(target, levels[k], _segment(down, start, down.steps),
                                         prediction_type=flow.prediction_type).cpu())
                bar.update(b * k * rows)
        name = f"{CLASSES[src]}->{CLASSES[tgt]}"
        pictures[None].append(x_src[:cfg.grid_sources])
        for s in cfg.strengths:
            out = torch.cat(edits[s])
            m = _metrics(clf, out, x_src, tgt)
            r.edit[f"{name}@{s:g}"] = m
            pooled[s].append(m)
            pictures[s].append(out[:cfg.grid_sources])
    for s in cfg.strengths:
        r.edit[f"all@{s:g}"] = {k: float(np.mean([m[k] for m in pooled[s]])) for k in pooled[s][0]}
    edit_grid = [im for row in (None, *cfg.strengths) for im in pil_images(torch.cat(pictures[row]))]

    # img2img (SDEdit) from the unconditional DDPM model: the same sources, each from its own seed
    x_src = torch.cat(sources_all)
    src_labels = np.concatenate([np.full(len(x), p[0]) for x, p in zip(sources_all, PAIRS)])
    offsets = np.cumsum([0, *(len(x) for x in sources_all)])[:-1]
    idx = torch.cat([torch.arange(o, o + min(cfg.grid_sources, len(x))) for o, x in zip(offsets, sources_all)])
    plan = ddpm.plan(cfg.steps, ddpm.spacings[0], "generate")
    shown: list[torch.Tensor] = [torch.cat(pictures[None])]
    for s, k in zip(cfg.strengths, ks):
        outs = []
        for first in range(0, len(x_src), cfg.batch_size):
            x0 = x_src[first:first + cfg.batch_size].to(ddpm.device)
            gens = sample_generators(first, len(x0))
            outs.append(sdedit(ddpm.eps, x0, plan, k, gens, prediction_type=ddpm.prediction_type,
                               clip_denoised=ddpm.clip_sample).cpu())
            bar.update(len(x0) * k)
        out = torch.cat(outs)
        e, src_emb = embed(clf, out), embed(clf, x_src)
        mse = (((out.clamp(-1, 1) - x_src) / 2) ** 2).flatten(1).mean(1)
        r.img2img[f"{s:g}"] = {"mse": float(mse.mean()),
                               "feature_distance": float(np.linalg.norm(e.features - src_emb.features,
                                                                        axis=1).mean()),
                               "kept_class": float((e.classes == src_labels).mean())}
        shown.append(out[idx])
    bar.close()
    img2img_grid = [im for row in shown for im in pil_images(row)]
    r.seconds = time.monotonic() - started
    return r, edit_grid, img2img_grid


def _picture(images: list[Image.Image], ncols: int, path: Path, scale: int = 3) -> None:
    g = grid(images, ncols=ncols)
    g.resize((g.width * scale, g.height * scale), Image.Resampling.NEAREST).save(path)


def results_markdown(r: EditResults, cfg: EditEvalConfig, command: str, grid_png: str, img2img_png: str) -> str:
    ks = {s: strength_steps(cfg.steps, s) for s in cfg.strengths}
    pct = "{:.0%}".format
    lines = [f"Measured by `{command}` in {r.seconds / 60:.0f} min (n = {cfg.n} test images per source class, "
             f"S = {cfg.steps}, target w = {cfg.guidance_scale:g}, inversion w = 1).", "",
             "**Class edits on fashion-mnist-flow, all four pairs pooled**", "",
             "| strength | k | success | pixel MSE to source | feature distance to source |",
             "|---:|---:|---:|---:|---:|"]
    for s in cfg.strengths:
        m = r.edit[f"all@{s:g}"]
        lines.append(f"| {s:g} | {ks[s]} | {pct(m['success'])} | {m['mse']:.4f} | {m['feature_distance']:.2f} |")
    lines += ["", "**Success by pair** (the share the classifier assigns to the target)", "",
              "| pair | " + " | ".join(f"s = {s:g}" for s in cfg.strengths) + " |",
              "|---|" + "---:|" * len(cfg.strengths)]
    for src, tgt in PAIRS:
        name = f"{CLASSES[src]}->{CLASSES[tgt]}"
        lines.append(f"| {name.replace('->', ' → ')} | "
                     + " | ".join(pct(r.edit[f"{name}@{s:g}"]["success"]) for s in cfg.strengths) + " |")
    success = [r.edit[f"all@{s:g}"]["success"] for s in cfg.strengths]
    mse = [r.edit[f"all@{s:g}"]["mse"] for s in cfg.strengths]
    reached = [s for s, v in zip(cfg.strengths, success) if s <= 0.8 and v >= 0.8]
    first = f"yes, from strength {reached[0]:g}" if reached else "no"

    def rising(values: list[float]) -> str:
        return "yes" if all(a <= b for a, b in itertools.pairwise(values)) else "no"

    lines += ["", f"- success ≥ 80 % at some strength ≤ 0.8: {first}",
              f"- monotone in strength: success {rising(success)}, pixel MSE {rising(mse)}", "",
              f"![edits: rows are the sources, then strengths {', '.join(f'{s:g}' for s in cfg.strengths)}; "
              f"columns are sources, {cfg.grid_sources} per pair]({grid_png})", "",
              "**img2img (SDEdit) on the unconditional fashion-mnist (DDPM), the same sources**", "",
              "| strength | k | pixel MSE to source | feature distance to source | still its class |",
              "|---:|---:|---:|---:|---:|"]
    for s in cfg.strengths:
        m = r.img2img[f"{s:g}"]
        lines.append(f"| {s:g} | {ks[s]} | {m['mse']:.4f} | {m['feature_distance']:.2f} | {pct(m['kept_class'])} |")
    lines += ["", f"![img2img: rows are the sources, then strengths; columns as above]({img2img_png})"]
    return "\n".join(lines)


def write_results(doc: Path, block: str) -> None:
    """Replace what lies between the results markers of doc (appended with them where it has none)."""
    text = doc.read_text() if doc.exists() else ""
    new = f"{START}\n{block}\n{END}"
    if START in text and END in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: new, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.eval.editing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="test images per source class (default 200)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS))
    p.add_argument("--guidance-scale", type=float, default=4.0, help="the target class's w (default 4)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "editing.md")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "editing.json")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = EditEvalConfig(n=args.n, steps=args.steps, strengths=tuple(args.strengths),
                         guidance_scale=args.guidance_scale, batch_size=args.batch_size)
    device = pick_device(args.device)
    flow = load_model(args.model_store / "fashion-mnist-flow", device=device)
    ddpm = load_model(args.model_store / "fashion-mnist", device=device)
    results, edit_grid, img2img_grid = evaluate_editing(flow, ddpm, load_classifier(), cfg,
                                                        progress=not args.no_progress)
    img = args.doc.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    _picture(edit_grid, len(PAIRS) * cfg.grid_sources, img / "editing-grid.png")
    _picture(img2img_grid, len(PAIRS) * cfg.grid_sources, img / "editing-img2img.png")
    command = "python -m app.eval.editing" + ("" if args.n == 200 else f" --n {args.n}")
    write_results(args.doc, results_markdown(results, cfg, command, "img/editing-grid.png",
                                             "img/editing-img2img.png"))
    args.json.write_text(json.dumps({"config": asdict(cfg), "edit": results.edit, "img2img": results.img2img,
                                     "seconds": results.seconds, "threads": torch.get_num_threads(),
                                     "device": str(device), "cpus": os.cpu_count()}, indent=2) + "\n")
    log.info("wrote %s, %s and its pictures in %.0f s", args.doc, args.json, results.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
