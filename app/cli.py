"""The `ddim` command: sample, invert, train, export, eval."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("ddim")


def _default_workdir(name: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "ddim-serve" / "train" / name


def _load(args: argparse.Namespace):  # -> LoadedModel
    """The model as the server loads it (DDIM_* settings: device, dtype, threads, the memory layout), so that the
    same seeds give the same numbers here and from the server."""
    import torch

    from app.config import Settings
    from app.models import discover, load_model, pick_device
    from app.startup import layouts_for, tune_process

    settings = Settings(**({"model_store": args.model_store} if args.model_store else {}))
    tune_process(settings)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    name = args.model or settings.default_model
    names = discover(settings.model_store)
    if args.model is None and name not in names and names:
        name = names[0]
    if name not in names:
        raise SystemExit(f"ddim: no model {name!r} in {settings.model_store} (found: {', '.join(names) or 'none'})")
    device = pick_device(settings.device)
    [channels_last] = layouts_for([settings.model_store / name], device, settings)
    model = load_model(settings.model_store / name, device=device, dtype=settings.dtype,
                       allow_pickle=settings.allow_pickle, channels_last=channels_last)
    log.info("model %s on %s (%s, channels_last=%s)", name, device, str(model.dtype).removeprefix("torch."),
             channels_last)
    return model


def _network(model, args: argparse.Namespace, n: int):  # -> EpsModel
    """The model's prediction for the CLI's loops: with --class-label or --prompt conditional, guided when w is not
    1 (default: the model's w)."""
    import torch

    prompt = getattr(args, "prompt", None)
    w = model.default_guidance if args.guidance_scale is None else args.guidance_scale
    if model.conditioning == "text":
        return model.network(guidance_scale=w, prompts=[prompt or ""] * n,
                             negative_prompts=[getattr(args, "negative_prompt", None) or ""] * n)
    if prompt is not None:
        raise SystemExit(f"ddim: error: model {model.name!r} has no text encoder; leave out --prompt")
    if args.class_label is None:
        return model.network()
    if not model.conditional:
        raise SystemExit(f"ddim: error: model {model.name!r} is not class-conditional; leave out --class-label")
    names = {c.lower(): i for i, c in enumerate(model.class_names)}
    label = args.class_label.strip().lower()
    if label not in names and not (label.isdigit() and int(label) < len(names)):
        raise SystemExit(f"ddim: error: unknown class {args.class_label!r}; valid: {', '.join(model.class_names)}")
    y = torch.full((n,), names[label] if label in names else int(label), dtype=torch.long)
    return model.network(y, w)


def cmd_sample(args: argparse.Namespace) -> int:
    from app.images import grid, npy_bytes, pil_images
    from app.sampling import draw, sample_generators
    from app.sampling.loop import run_plan

    model = _load(args)
    if args.variance == "large" and model.kind != "vp":
        raise SystemExit(f"ddim: error: --variance large is for VP models only; {model.name!r} is a {model.kind} model")
    try:
        shape = model.latent_shape(args.width, args.height)
    except ValueError as e:
        raise SystemExit(f"ddim: error: --{e}") from None
    gens = sample_generators(args.seed, args.n)
    x_T = draw(gens, shape).to(model.device)
    plan = model.plan(args.steps, args.schedule or model.spacings[0], "generate")
    clip = model.clip_sample if args.clip is None else args.clip
    x0 = run_plan(_network(model, args, args.n), x_T, plan, eta=args.eta, large=args.variance == "large",
                  prediction_type=model.prediction_type, clip_denoised=clip, generators=gens,
                  progress=lambda steps: tqdm(steps, desc="sample", leave=False))
    images = pil_images(x0 if model.codec is None else model.codec.decode(x0))
    (images[0] if len(images) == 1 else grid(images)).save(args.out)  # as the server's PNG: a grid when n > 1
    if args.latents_out:
        Path(args.latents_out).write_bytes(npy_bytes(x0))
    print(f"wrote {args.n} samples of {model.name} (S={args.steps}, eta={args.eta}) to {args.out}")
    return 0


def cmd_invert(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from app.images import npy_bytes, to_model_space
    from app.sampling.loop import run_plan

    model = _load(args)
    if model.codec is not None:
        raise SystemExit(f"ddim: error: model {model.name!r} is a latent pipeline; inverting it is not offered yet")
    x0 = torch.stack([to_model_space(Image.open(p), model.sample_shape) for p in args.images])
    plan = model.plan(args.steps, args.schedule or model.spacings[0], "invert")
    x_T = run_plan(_network(model, args, len(x0)), x0.to(model.device), plan, prediction_type=model.prediction_type,
                   progress=lambda steps: tqdm(steps, desc="invert", leave=False))
    Path(args.out).write_bytes(npy_bytes(x_T))
    print(f"wrote x_T of shape {tuple(x_T.shape)} to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from app.train.data import CLASSES
    from app.train.ddpm import TrainConfig, export, train

    conditional = args.conditional if args.conditional is not None else args.objective == "flow"
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      threads=args.threads, objective=args.objective,
                      num_classes=len(CLASSES) if conditional else 0, class_dropout=args.class_dropout,
                      class_names=[c.lower() for c in CLASSES] if conditional else [])
    workdir = Path(args.workdir) if args.workdir else _default_workdir(args.name)
    train(cfg, workdir, max_minutes=args.max_minutes,
          init_from=Path(args.init_from) if args.init_from else None)
    if args.export:
        info = export(workdir, Path(args.export))
        print(f"exported {info} to {args.export}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from app.train.ddpm import export

    workdir = Path(args.workdir) if args.workdir else _default_workdir(args.name)
    info = export(workdir, Path(args.out))
    print(f"exported {info} to {args.out}")
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    import torch

    from app.eval.classifier import ClassifierTraining, train_classifier

    torch.set_num_threads(args.threads)
    cfg = ClassifierTraining(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    info = train_classifier(cfg, Path(args.out))
    print(f"classifier: test accuracy {info['test_accuracy']:.2%}, {info['wall_seconds']:.0f} s, "
          f"{int(info['parameters']):,} parameters -> {args.out}")
    return 0


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from app.eval.quality import EvalConfig
    from app.eval.run import EvalPaths, run_eval

    torch.set_num_threads(args.threads)
    store = Path(args.model_store or os.environ.get("DDIM_MODEL_STORE", "model_store"))
    cfg = EvalConfig(n=args.n, n_long=args.n_long, n_recon=args.n_recon, n_balance=args.n_balance,
                     batch_size=args.batch_size, steps=_ints(args.steps), long_steps=_ints(args.long_steps),
                     recon_steps=_ints(args.recon_steps))
    paths = EvalPaths(model_dir=store / args.model, out=Path(args.out),
                      cache=Path(args.cache) if args.cache else None, card=args.card, device=args.device)
    try:
        run_eval(paths, cfg, args.threads)
    except ValueError as e:  # a model the Fashion-MNIST evaluator cannot read
        raise SystemExit(f"ddim: error: {e}") from e
    except KeyboardInterrupt:
        print("ddim eval: interrupted; finished batches are cached, run the same command to resume", file=sys.stderr)
        return 130
    print(f"wrote {args.out}" + (f" and {paths.model_dir / 'README.md'}" if args.card else ""))
    return 0


def cmd_eval_flow(args: argparse.Namespace) -> int:
    import torch

    from app.eval.classifier import load_classifier
    from app.eval.flow import FlowEvalConfig, evaluate_flow, flow_md, model_card
    from app.models import load_model, pick_device

    torch.set_num_threads(args.threads)
    store = Path(args.model_store or os.environ.get("DDIM_MODEL_STORE", "model_store"))
    device = pick_device(args.device)
    flow, ddpm = (load_model(store / name, device=device) for name in (args.model, args.baseline))
    cfg = FlowEvalConfig(n=args.n, steps=_ints(args.steps), n_recon=args.n_recon, recon_steps=_ints(args.steps))
    results = evaluate_flow(flow, ddpm, load_classifier(), cfg)
    command = (f"ddim eval-flow --model {args.model} --baseline {args.baseline} --n {args.n} --steps {args.steps} "
               f"--n-recon {args.n_recon} --threads {args.threads} --out {args.out}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report = flow_md(results, cfg, flow, ddpm, command)
    Path(args.out).write_text(report)
    (store / args.model / "README.md").write_text(model_card(store / args.model, report))
    print(f"wrote {args.out} and {store / args.model / 'README.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from app.sampling.schedules import SPACINGS

    p = argparse.ArgumentParser(prog="ddim", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", help="model folder name (default: the store's default model)")
        q.add_argument("--model-store", help="model store folder (default ./model_store, or $DDIM_MODEL_STORE)")
        q.add_argument("--steps", type=int, default=50, help="S, the number of sampling steps")
        q.add_argument("--schedule", choices=SPACINGS,
                       help="timestep spacing (default: the model's: uniform on VP models, linspace on flow models)")
        q.add_argument("--class-label", help="class-conditional models: a class name or index (default: none, "
                       "unconditional)")
        q.add_argument("--guidance-scale", type=float, default=None,
                       help="classifier-free guidance w (1: plain conditional, 0: unconditional; default: the "
                       "model's, e.g. 7.5 for Stable Diffusion, 1 for UNet2DModel folders)")

    s = sub.add_parser("sample", help="generate a PNG (a grid when n > 1)")
    model_args(s)
    s.add_argument("--eta", type=float, default=0.0, help="0 = DDIM, 1 = DDPM")
    s.add_argument("--variance", choices=["eta", "large"], default="eta")
    s.add_argument("-n", type=int, default=16, help="number of images")
    s.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    s.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="clip predicted x0 to [-1, 1] (default: the model's clip_sample)")
    s.add_argument("--out", default="grid.png")
    s.add_argument("--latents-out", help="also write the final samples x0 as .npy (latents for latent models)")
    s.add_argument("--prompt", help="text models: the prompt")
    s.add_argument("--negative-prompt", help="text models: the negative prompt (default \"\")")
    s.add_argument("--width", type=int, help="latent models: pixels (default: the model's size)")
    s.add_argument("--height", type=int, help="latent models: pixels (default: the model's size)")
    s.set_defaults(func=cmd_sample)

    i = sub.add_parser("invert", help="DDIM-invert images to x_T (.npy)")
    model_args(i)
    i.add_argument("images", nargs="+")
    i.add_argument("--out", default="xT.npy")
    i.set_defaults(func=cmd_invert)

    t = sub.add_parser("train", help="train a Fashion-MNIST model (resumes from its checkpoint)")
    t.add_argument("--name", default="fashion-mnist", help="names the checkpoint folder")
    t.add_argument("--objective", choices=["epsilon", "flow"], default="epsilon",
                   help="epsilon: DDPM's L_simple; flow: rectified flow (v = eps - x0)")
    t.add_argument("--conditional", action=argparse.BooleanOptionalAction, default=None,
                   help="class-conditional with label dropout (default: on for flow, off for epsilon)")
    t.add_argument("--class-dropout", type=float, default=0.1, help="share of null labels in training")
    t.add_argument("--workdir", help="checkpoint folder (default ~/.cache/ddim-serve/train/NAME)")
    t.add_argument("--steps", type=int, default=8000, help="total optimiser steps")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=4e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    t.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this long")
    t.add_argument("--export", metavar="DIR", help="export the EMA weights to DIR when done")
    t.add_argument("--init-from", metavar="DIR",
                   help="without a checkpoint in the workdir, start from this model folder's weights and step")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="export a training checkpoint's EMA weights as a model folder")
    e.add_argument("--name", default="fashion-mnist")
    e.add_argument("--workdir")
    e.add_argument("--out", default="model_store/fashion-mnist")
    e.set_defaults(func=cmd_export)

    c = sub.add_parser("train-classifier", help="train the Fashion-MNIST feature classifier of FID-FMNIST")
    c.add_argument("--out", default="app/eval/weights/fmnist_classifier.safetensors")
    c.add_argument("--epochs", type=int, default=8)
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=1, help="torch threads (1 makes the run deterministic)")
    c.set_defaults(func=cmd_train_classifier)

    q = sub.add_parser("eval", help="Table 1 (FID-FMNIST) and Table 2 (reconstruction) of the DDIM paper; resumable")
    q.add_argument("--model", default="fashion-mnist", help="model folder name")
    q.add_argument("--model-store", help="model store folder (default ./model_store, or $DDIM_MODEL_STORE)")
    q.add_argument("--n", type=int, default=400, help="samples per Table 1 cell for the short S")
    q.add_argument("--n-long", type=int, default=64, help="samples per cell for the long S (1000)")
    q.add_argument("--n-recon", type=int, default=32, help="test images per Table 2 cell")
    q.add_argument("--n-balance", type=int, default=500, help="samples of the class-balance check")
    q.add_argument("--steps", default="10,20,50,100", help="Table 1's S, all five rows")
    q.add_argument("--long-steps", default="1000", help="Table 1's long S (eta = 0 and sigma-hat only)")
    q.add_argument("--recon-steps", default="10,20,50,100,200,500,1000", help="Table 2's S")
    q.add_argument("--batch-size", type=int, default=128)
    q.add_argument("--threads", type=int, default=1, help="torch threads")
    q.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto, for the eps-model")
    q.add_argument("--out", default="docs/quality.md", help="the report; pictures go to its folder's img/")
    q.add_argument("--cache", help="resume file (default ~/.cache/ddim-serve/eval/MODEL.json)")
    q.add_argument("--card", action=argparse.BooleanOptionalAction, default=True,
                   help="write the model card MODEL_STORE/MODEL/README.md")
    q.set_defaults(func=cmd_eval)

    f = sub.add_parser("eval-flow", help="the flow model beside the DDPM model: FID by S, guided, class agreement, "
                       "inversion error")
    f.add_argument("--model", default="fashion-mnist-flow")
    f.add_argument("--baseline", default="fashion-mnist")
    f.add_argument("--model-store", help="model store folder (default ./model_store, or $DDIM_MODEL_STORE)")
    f.add_argument("--n", type=int, default=200, help="samples per cell")
    f.add_argument("--n-recon", type=int, default=32, help="test images per reconstruction cell")
    f.add_argument("--steps", default="5,10,20,50,100")
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("--device", default="cpu")
    f.add_argument("--out", default="docs/quality-flow.md")
    f.set_defaults(func=cmd_eval_flow)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from app import logs

    logs.setup(json_lines=False)  # plain lines; libraries' warnings go through them too
    from app.models import ModelStoreError
    from app.sampling import ScheduleError

    try:
        return int(args.func(args) or 0)
    except (ModelStoreError, ScheduleError, FileNotFoundError) as e:
        print(f"ddim: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
