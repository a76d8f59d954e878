"""The `ddim` command: sample, invert, edit, train, export, eval, layouts.

Errors are one line on stderr, `ddim: error: ...`, and no traceback: exit status 2 for a usage error (argparse's
own, a bad flag value, an unknown model or class), 1 for a failure (a file that cannot be read or written, a model
folder that cannot load, a failure while running). An unexpected exception is one line too, with a hint; --debug
(or DDIM_DEBUG=1) shows its traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from app.cli_args import COUNT, FAILURE, NON_NEGATIVE, SHARE, USAGE, CliError, Parser, model_folder, number
from app.cli_edit import cmd_edit
from app.cli_model import (
    _announce,
    _check_sampler_flags,
    _load,
    _network,
    _plan,
    _read_images,
    _resolve,
    _solver,
    _writable,
)
from app.cli_train import add_commands

log = logging.getLogger("ddim")


def cmd_sample(args: argparse.Namespace) -> int:
    from app.images import grid, npy_bytes, pil_images
    from app.sampling import draw, sample_generators
    from app.sampling.loop import run_plan, run_solver

    _check_sampler_flags(args)
    settings, folder = _resolve(args)
    _writable(args.out, args.latents_out)
    model = _load(settings, folder)
    if args.variance == "large" and model.kind != "vp":
        raise CliError(f"--variance large is for VP models only; {model.name!r} is a {model.kind} model", USAGE)
    try:
        shape = model.latent_shape(args.width, args.height)
    except ValueError as e:
        raise CliError(f"--{e}", USAGE) from None
    solver = _solver(model, args)
    plan = _plan(model, args, "generate") if solver is None else None
    network = _network(model, args, args.n)
    _announce(model)
    gens = sample_generators(args.seed, args.n)
    x_T = draw(gens, shape).to(model.device)
    clip = model.clip_sample if args.clip is None else args.clip
    progress = lambda steps: tqdm(steps, desc="sample", leave=False)  # noqa: E731
    if solver is not None:
        x0 = run_solver(network, x_T, solver, progress=progress)
    else:
        assert plan is not None
        x0 = run_plan(network, x_T, plan, eta=args.eta, large=args.variance == "large",
                      prediction_type=model.prediction_type, clip_denoised=clip, generators=gens, progress=progress)
    images = pil_images(x0 if model.codec is None else model.codec.decode(x0))
    (images[0] if len(images) == 1 else grid(images)).save(args.out)  # as the server's PNG: a grid when n > 1
    if args.latents_out:
        Path(args.latents_out).write_bytes(npy_bytes(x0))
    print(f"wrote {args.n} samples of {model.name} (S={args.steps}, eta={args.eta}) to {args.out}")
    return 0


def cmd_invert(args: argparse.Namespace) -> int:
    import torch

    from app.images import npy_bytes, to_model_space
    from app.sampling.loop import run_plan

    settings, folder = _resolve(args)
    _writable(args.out)
    images = _read_images(args.images)
    model = _load(settings, folder)
    plan = _plan(model, args, "invert")
    if args.guidance_scale is None:
        args.guidance_scale = 1.0  # inversion's default: no guidance, the best round trip
    network = _network(model, args, len(images))
    _announce(model)
    codec, (h, w) = model.codec, model.image_size
    x0 = torch.stack([to_model_space(image, model.sample_shape if codec is None else (codec.image_channels, h, w))
                      for image in images]).to(model.device)
    x_T = run_plan(network, x0 if codec is None else codec.encode(x0), plan, prediction_type=model.prediction_type,
                   progress=lambda steps: tqdm(steps, desc="invert", leave=False))
    Path(args.out).write_bytes(npy_bytes(x_T))
    print(f"wrote x_T of shape {tuple(x_T.shape)} to {args.out}")
    return 0


def cmd_layouts(args: argparse.Namespace) -> int:
    """The table of kept layout choices for this machine and these DDIM_* settings; --retime times them first."""
    import torch

    from app.config import Settings
    from app.models import discover, pick_device
    from app.startup.layout import kept_layouts, layout_key, retime_layouts

    settings = Settings(**({"model_store": args.model_store} if args.model_store else {}))
    store = settings.model_store
    folders = [model_folder(store, name, name) for name in args.model or discover(store)]
    if not folders:
        raise CliError(f"no models in {store}")
    device = pick_device(settings.device)
    entries: list[dict[str, Any] | None]
    if args.retime:
        print(f"timing both layouts of {', '.join(f.name for f in folders)} ...", file=sys.stderr, flush=True)
        timed = retime_layouts(folders, device, settings)
        if timed is None:
            raise CliError("the layouts could not be timed (the warning above says why); nothing was changed")
        entries = list(timed)
    else:
        entries = kept_layouts(folders, device, settings)
    threads = settings.threads or torch.get_num_threads()
    context = layout_key(folders[0], device, settings.dtype, threads, settings.max_batch_size,
                         settings.allow_pickle).split(" | ", 1)[1]
    print(f"{settings.layout_cache}: {context}")
    rows: list[tuple[str, ...]] = [("model", "layout", "contiguous ms", "channels_last ms", "cl/contiguous",
                                    "others' load", "spread", "timed at")]
    for folder, e in zip(folders, entries):
        rows.append((folder.name, *_layout_row(e)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for folder, e in zip(folders, entries):
        if e and e.get("reason"):
            print(f"{folder.name}: {e['reason']}")
    if settings.channels_last != "auto":
        print(f"DDIM_CHANNELS_LAST={str(settings.channels_last).lower()}: servers and the CLI run that layout; "
              "this table is used only under auto")
    return 0


def _layout_row(e: dict[str, Any] | None) -> tuple[str, ...]:
    if e is None:
        return ("not timed: the next start times it",) + ("",) * 6
    layout = "channels_last" if e["channels_last"] else "contiguous"
    if e.get("provisional", True):
        layout += " (provisional)"
    rounds = e.get("rounds_ms") or {k: [v] for k, v in e["ms"].items()}
    ratios = [c / d for c, d in zip(rounds["channels_last"], rounds["contiguous"])]
    load, spread = e.get("others_load"), e.get("spread")
    return (layout, f"{e['ms']['contiguous']:.1f}", f"{e['ms']['channels_last']:.1f}",
            f"{min(ratios):.2f}-{max(ratios):.2f}", "?" if load is None else f"{load:.0%}",
            "?" if spread is None else f"{spread:.0%}", e.get("timed_at", "?"))


def build_parser() -> argparse.ArgumentParser:
    from app.sampling.schedules import SPACINGS

    p = Parser(prog="ddim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log what loading and timing do")
    common.add_argument("--debug", action="store_true",
                        help="show the traceback of an unexpected error (also DDIM_DEBUG=1); implies --verbose")

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help, parents=[common])
        q.set_defaults(func=func)
        return q

    def model_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", help="model folder name (default: the store's default model)")
        q.add_argument("--model-store", help="model store folder (default ./model_store, or $DDIM_MODEL_STORE)")
        q.add_argument("--steps", type=COUNT, default=50, help="S, the number of sampling steps")
        q.add_argument("--schedule", choices=[*SPACINGS, "karras"],
                       help="timestep spacing (default: the model's: uniform on VP models, linspace on flow models; "
                       "the multistep samplers' own, docs/models.md)")
        q.add_argument("--class-label", help="class-conditional models: a class name or index (default: none, "
                       "unconditional)")
        q.add_argument("--guidance-scale", type=number(float, 0.0, 20.0), default=None,
                       help="classifier-free guidance w (1: plain conditional, 0: unconditional; default: the "
                       "model's, e.g. 7.5 for Stable Diffusion, 1 for UNet2DModel folders)")

    s = command("sample", cmd_sample, "generate a PNG (a grid when n > 1)")
    model_args(s)
    s.add_argument("--eta", type=SHARE, default=0.0, help="0 = DDIM, 1 = DDPM")
    s.add_argument("--variance", choices=["eta", "large"], default="eta")
    s.add_argument("--sampler", choices=["ddim", "dpmsolver++", "unipc"], default="ddim",
                   help="ddim (default), or a multistep solver (deterministic: no --eta, --variance or --clip)")
    s.add_argument("--solver-order", type=number(int, 1, 3), default=None, help="dpmsolver++ and unipc: 1-3 "
                   "(default 2)")
    s.add_argument("-n", type=COUNT, default=16, help="number of images")
    s.add_argument("--seed", type=NON_NEGATIVE, default=0, help="image i uses seed + i")
    s.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="clip predicted x0 to [-1, 1] (default: the model's clip_sample)")
    s.add_argument("--out", default="grid.png")
    s.add_argument("--latents-out", help="also write the final samples x0 as .npy (latents for latent models)")
    s.add_argument("--prompt", help="text models: the prompt")
    s.add_argument("--negative-prompt", help="text models: the negative prompt (default \"\")")
    s.add_argument("--width", type=int, help="latent models: pixels (default: the model's size)")
    s.add_argument("--height", type=int, help="latent models: pixels (default: the model's size)")
    s.set_defaults(func=cmd_sample)

    i = command("invert", cmd_invert, "DDIM-invert images to x_T (.npy)")
    model_args(i)
    i.add_argument("images", nargs="+")
    i.add_argument("--out", default="xT.npy")
    i.add_argument("--prompt", help="text models: the prompt to invert under")
    i.add_argument("--negative-prompt", help="text models: the negative prompt (default \"\")")

    e = command("edit", cmd_edit, "edit images: invert k = int(S x strength) steps under the source condition, "
                "generate them back under the target's (--class-label / --prompt)")
    model_args(e)
    e.add_argument("images", nargs="+")
    e.add_argument("--strength", type=number(float, 0.0, 1.0, strict=True), default=0.8,
                   help="share of the S steps each way (default 0.8; 1: full inversion to x_T and back)")
    e.add_argument("--prompt", help="text models: the target prompt")
    e.add_argument("--negative-prompt", help="text models: the negative prompt of both legs (default \"\")")
    e.add_argument("--source-prompt", help="text models: the prompt the images are inverted under")
    e.add_argument("--source-class-label", help="class models: the images' class (default: unconditional)")
    e.add_argument("--source-guidance-scale", type=number(float, 0.0, 20.0), default=1.0,
                   help="the inversion's w (default 1, no guidance)")
    e.add_argument("--out", default="edit.png")

    add_commands(command)

    v = command("layouts", cmd_layouts, "the memory layout kept for each model (DDIM_CHANNELS_LAST=auto); "
                "--retime times them again")
    v.add_argument("--model", action="append", help="this model only (repeatable; default: every model of the store)")
    v.add_argument("--model-store", help="model store folder (default ./model_store, or $DDIM_MODEL_STORE)")
    v.add_argument("--retime", action="store_true", help="time both layouts now and keep the result")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from app import logs

    debug = args.debug or os.environ.get("DDIM_DEBUG", "") not in ("", "0")
    # plain lines, libraries' warnings through them too: the commands' own messages and warnings, and with
    # --verbose also what loading a model and timing its layouts do
    logs.setup(json_lines=False, level=logging.INFO if args.verbose or debug else logging.WARNING)
    for name in ("ddim", "app.train", "app.eval"):
        logging.getLogger(name).setLevel(logging.INFO)
    from app.models import ModelStoreError
    from app.sampling import ScheduleError

    try:
        return int(args.func(args) or 0)
    except CliError as e:
        if debug and e.__cause__ is not None:
            traceback.print_exception(e.__cause__)
        return _fail(str(e), e.status)
    except ScheduleError as e:  # a flag value the model cannot have
        return _fail(str(e), USAGE)
    except ModelStoreError as e:
        return _fail(str(e), FAILURE)
    except OSError as e:
        return _fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e), FAILURE)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as e:
        if debug:
            traceback.print_exc()
            return FAILURE
        return _fail(f"{type(e).__name__}: {e} (unexpected: run it again with --debug, or DDIM_DEBUG=1, for the "
                     "traceback)", FAILURE)


def _fail(message: str, status: int) -> int:
    print("ddim: error: " + " ".join(message.split()), file=sys.stderr)  # one line, whatever the message
    return status


if __name__ == "__main__":
    sys.exit(main())
