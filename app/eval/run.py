"""`ddim eval` end to end: load, evaluate (resumably), write docs/quality.md, its pictures, the model card."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from app.eval.cache import EvalCache, default_cache_path, fingerprint
from app.eval.classifier import WEIGHTS, load_classifier
from app.eval.curve import curve_md, image_name
from app.eval.quality import EvalConfig, Results, evaluate
from app.eval.report import model_card, quality_md, write_images
from app.models import load_model, pick_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPaths:
    model_dir: Path
    out: Path  # docs/quality.md; pictures go to its folder's img/
    cache: Path | None = None  # default ~/.cache/ddim-serve/eval/<model>.json
    card: bool = True  # write <model_dir>/README.md
    device: str = "cpu"  # where the eps-model runs ("auto": cuda, then mps, then cpu); the classifier runs on CPU


def classifier_accuracy(path: Path = WEIGHTS) -> str:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return f"{float(meta['test_accuracy']):.2%}" if "test_accuracy" in meta else "unrecorded"


def reproduce_command(paths: EvalPaths, cfg: EvalConfig, threads: int) -> str:
    """The `ddim eval` line that reproduces this run (options the CLI cannot set are left out)."""
    cmd = (f"ddim eval --model {paths.model_dir.name} --model-store {paths.model_dir.parent} --n {cfg.n} "
           f"--n-long {cfg.n_long} --n-recon {cfg.n_recon} --batch-size {cfg.batch_size} --threads {threads} "
           f"--out {paths.out}")
    if paths.device != "cpu":
        cmd += f" --device {paths.device}"
    default = EvalConfig()
    for name in ("n_balance", "steps", "long_steps", "recon_steps"):
        value = getattr(cfg, name)
        if value != getattr(default, name):
            text = (",".join(map(str, value)) or '""') if isinstance(value, tuple) else str(value)
            cmd += f" --{name.replace('_', '-')} {text}"
    return cmd


def run_eval(paths: EvalPaths, cfg: EvalConfig, threads: int, progress: bool = True) -> Results:
    """Evaluate the model in paths.model_dir and write the report (and card); returns the numbers."""
    model = load_model(paths.model_dir, device=pick_device(paths.device))
    cache_path = paths.cache or default_cache_path(model.name)
    cache = EvalCache(cache_path, fingerprint(paths.model_dir, WEIGHTS))
    results = evaluate(model, load_classifier(), cfg, cache, progress=progress)

    images = write_images(results, paths.out.parent / "img")
    meta = {"model": model.name, "classifier_accuracy": classifier_accuracy(), "threads": threads,
            "command": reproduce_command(paths, cfg, threads), "cache": cache_path, "clip": model.clip_sample,
            "curve": curve_md(paths.model_dir, f"img/{image_name(model.name)}")}
    paths.out.parent.mkdir(parents=True, exist_ok=True)
    paths.out.write_text(quality_md(results, cfg, meta, images, paths.out))
    log.info("wrote %s and %d pictures", paths.out, len(images))
    if paths.card:
        card = paths.model_dir / "README.md"
        card.write_text(model_card(results, cfg, paths.model_dir, dict(model.unet.config), model.scheduler_config,
                                   sum(p.numel() for p in model.unet.parameters())))
        log.info("wrote %s", card)
    return results
