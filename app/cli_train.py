"""The `ddim` commands that make and measure models: train, export, train-classifier, eval, eval-flow."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from app.cli_args import COUNT, NON_NEGATIVE, POSITIVE, SHARE, CliError, counts, model_folder, store_of

Command = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def _default_workdir(name: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "ddim-serve" / "train" / name


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


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from app.eval.quality import EvalConfig
    from app.eval.run import EvalPaths, run_eval

    cfg = EvalConfig(n=args.n, n_long=args.n_long, n_recon=args.n_recon, n_balance=args.n_balance,
                     batch_size=args.batch_size, steps=counts(args.steps, "--steps"),
                     long_steps=counts(args.long_steps, "--long-steps", allow_none=True),
                     recon_steps=counts(args.recon_steps, "--recon-steps"))
    folder = model_folder(store_of(args), args.model, args.model)
    torch.set_num_threads(args.threads)
    paths = EvalPaths(model_dir=folder, out=Path(args.out),
                      cache=Path(args.cache) if args.cache else None, card=args.card, device=args.device)
    try:
        run_eval(paths, cfg, args.threads)
    except ValueError as e:  # a model the Fashion-MNIST evaluator cannot read
        raise CliError(str(e)) from e
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

    steps = counts(args.steps, "--steps")
    store = store_of(args)
    folders = [model_folder(store, name, name) for name in (args.model, args.baseline)]
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    flow, ddpm = (load_model(folder, device=device) for folder in folders)
    cfg = FlowEvalConfig(n=args.n, steps=steps, n_recon=args.n_recon, recon_steps=steps)
    results = evaluate_flow(flow, ddpm, load_classifier(), cfg)
    command = (f"ddim eval-flow --model {args.model} --baseline {args.baseline} --n {args.n} --steps {args.steps} "
               f"--n-recon {args.n_recon} --threads {args.threads} --out {args.out}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report = flow_md(results, cfg, flow, ddpm, command)
    Path(args.out).write_text(report)
    (store / args.model / "README.md").write_text(model_card(store / args.model, report))
    print(f"wrote {args.out} and {store / args.model / 'README.md'}")
    return 0


def add_commands(command: Command) -> None:
    """Their subparsers, made by command(name, func, help)."""
    t = command("train", cmd_train, "train a Fashion-MNIST model (resumes from its checkpoint)")
    t.add_argument("--name", default="fashion-mnist", help="names the checkpoint folder")
    t.add_argument("--objective", choices=["epsilon", "flow"], default="epsilon",
                   help="epsilon: DDPM's L_simple; flow: rectified flow (v = eps - x0)")
    t.add_argument("--conditional", action=argparse.BooleanOptionalAction, default=None,
                   help="class-conditional with label dropout (default: on for flow, off for epsilon)")
    t.add_argument("--class-dropout", type=SHARE, default=0.1, help="share of null labels in training")
    t.add_argument("--workdir", help="checkpoint folder (default ~/.cache/ddim-serve/train/NAME)")
    t.add_argument("--steps", type=COUNT, default=8000, help="total optimiser steps")
    t.add_argument("--batch-size", type=COUNT, default=64)
    t.add_argument("--lr", type=POSITIVE, default=4e-4)
    t.add_argument("--seed", type=NON_NEGATIVE, default=0)
    t.add_argument("--threads", type=NON_NEGATIVE, default=0, help="torch threads (0: torch's default)")
    t.add_argument("--max-minutes", type=POSITIVE, help="stop (with a checkpoint) after this long")
    t.add_argument("--export", metavar="DIR", help="export the EMA weights to DIR when done")
    t.add_argument("--init-from", metavar="DIR",
                   help="without a checkpoint in the workdir, start from this model folder's weights and step")

    e = command("export", cmd_export, "export a training checkpoint's EMA weights as a model folder")
    e.add_argument("--name", default="fashion-mnist")
    e.add_argument("--workdir")
    e.add_argument("--out", default="model_store/fashion-mnist")

    c = command("train-classifier", cmd_train_classifier, "train the Fashion-MNIST feature classifier of FID-FMNIST")
    c.add_argument("--out", default="app/eval/weights/fmnist_classifier.safetensors")
    c.add_argument("--epochs", type=COUNT, default=8)
    c.add_argument("--batch-size", type=COUNT, default=128)
    c.add_argument("--seed", type=NON_NEGATIVE, default=0)
    c.add_argument("--threads", type=COUNT, default=1, help="torch threads (1 makes the run deterministic)")

    q = command("eval", cmd_eval, "Table 1 (FID-FMNIST) and Table 2 (reconstruction) of the DDIM paper; resumable")
    q.add_argument("--model", default="fashion-mnist", help="model folder name")
    q.add_argument("--model-store", help="model store folder (default ./model_store, or $DDIM_MODEL_STORE)")
    q.add_argument("--n", type=COUNT, default=400, help="samples per Table 1 cell for the short S")
    q.add_argument("--n-long", type=COUNT, default=64, help="samples per cell for the long S (1000)")
    q.add_argument("--n-recon", type=COUNT, default=32, help="test images per Table 2 cell")
    q.add_argument("--n-balance", type=COUNT, default=500, help="samples of the class-balance check")
    q.add_argument("--steps", default="10,20,50,100", help="Table 1's S, all five rows")
    q.add_argument("--long-steps", default="1000", help="Table 1's long S (eta = 0 and sigma-hat only; '' for none)")
    q.add_argument("--recon-steps", default="10,20,50,100,200,500,1000", help="Table 2's S")
    q.add_argument("--batch-size", type=COUNT, default=128)
    q.add_argument("--threads", type=COUNT, default=1, help="torch threads")
    q.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto, for the eps-model")
    q.add_argument("--out", default="docs/quality.md", help="the report; pictures go to its folder's img/")
    q.add_argument("--cache", help="resume file (default ~/.cache/ddim-serve/eval/MODEL.json)")
    q.add_argument("--card", action=argparse.BooleanOptionalAction, default=True,
                   help="write the model card MODEL_STORE/MODEL/README.md")

    f = command("eval-flow", cmd_eval_flow, "the flow model beside the DDPM model: FID by S, guided, class "
                "agreement, inversion error")
    f.add_argument("--model", default="fashion-mnist-flow")
    f.add_argument("--baseline", default="fashion-mnist")
    f.add_argument("--model-store", help="model store folder (default ./model_store, or $DDIM_MODEL_STORE)")
    f.add_argument("--n", type=COUNT, default=200, help="samples per cell")
    f.add_argument("--n-recon", type=COUNT, default=32, help="test images per reconstruction cell")
    f.add_argument("--steps", default="5,10,20,50,100")
    f.add_argument("--threads", type=COUNT, default=1)
    f.add_argument("--device", default="cpu")
    f.add_argument("--out", default="docs/quality-flow.md")
