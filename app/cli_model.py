"""What the `ddim` subcommands share: the store and model a command names, loaded as the server loads it, and the
plan, sampler and network its flags ask for, each checked with a one-line usage error."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from app.cli_args import USAGE, CliError, model_folder

log = logging.getLogger("ddim")


def _resolve(args: argparse.Namespace):  # -> tuple[Settings, Path]
    """The DDIM_* settings (with --model-store) and the folder of the model the flags name, a usage error if none."""
    from app.config import Settings

    settings = Settings(**({"model_store": args.model_store} if args.model_store else {}))
    return settings, model_folder(settings.model_store, args.model, settings.default_model)


def _load(settings, folder: Path):  # (Settings, Path) -> LoadedModel
    """The model as the server loads it (DDIM_* settings: device, dtype, threads, the memory layout), so that the
    same seeds give the same numbers here and from the server. Only this model's folder is read."""
    import torch

    from app.models import ModelStoreError, load_model, pick_device
    from app.sampling import ScheduleError
    from app.startup import tune_process

    tune_process(settings)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = pick_device(settings.device)
    try:
        channels_last = _layout(folder, device, settings)
        model = load_model(folder, device=device, dtype=settings.dtype, allow_pickle=settings.allow_pickle,
                           channels_last=channels_last, trace=settings.trace)
    except (ModelStoreError, ScheduleError, OSError) as e:
        raise CliError(f"cannot load model {folder.name!r}: {e}") from e
    except Exception as e:  # what a library makes of a config it cannot build (--debug shows where)
        raise CliError(f"cannot load model {folder.name!r}: {type(e).__name__}: {e}") from e
    return model


def _announce(model) -> None:  # model: LoadedModel, once the flags are known to suit it
    log.info("model %s on %s (%s, channels_last=%s)", model.name, model.device,
             str(model.dtype).removeprefix("torch."), model.forward.channels_last)


def _layout(folder: Path, device, settings) -> bool:  # device: torch.device, settings: Settings
    """layouts_for as a CLI uses it: the kept choice, even a provisional one (a server's next start times that
    again), so that the CLI runs the layout the servers started with; timed first, with a notice, where none is
    kept (seconds, or a minute on a busy CPU)."""
    from app.startup.layout import kept_layouts, layouts_for, needs_timing

    if settings.channels_last == "auto" and settings.warmup:
        try:
            if needs_timing(kept_layouts([folder], device, settings)[0], retime_provisional=False):
                log.info("timing the memory layouts of %s first ('ddim layouts' shows the result)", folder.name)
        except OSError:
            pass  # layouts_for says why it cannot keep a choice
    [channels_last] = layouts_for([folder], device, settings, retime_provisional=False)
    return channels_last


def _plan(model, args: argparse.Namespace, direction: str):  # -> Plan
    """The model's levels for --steps and --schedule; a usage error where this model cannot have them."""
    from app.sampling import ScheduleError

    try:
        return model.plan(args.steps, args.schedule or model.spacings[0], direction)
    except ScheduleError as e:
        raise CliError(str(e), USAGE) from e


def _check_sampler_flags(args: argparse.Namespace) -> None:
    """Flags --sampler cannot take, refused before any model loads."""
    if args.sampler == "ddim":
        if args.solver_order is not None:
            raise CliError("--solver-order is for --sampler dpmsolver++ or unipc", USAGE)
        return
    for flag, bad in (("--eta", args.eta > 0), ("--variance large", args.variance == "large"),
                      ("--clip", args.clip is True)):
        if bad:
            raise CliError(f"{flag} is for --sampler ddim only (the multistep samplers are deterministic and never "
                           "clip)", USAGE)


def _solver(model, args: argparse.Namespace):  # -> SolverPlan | None
    """--sampler's plan (None for ddim); what a multistep sampler cannot do is a usage error, as on the server."""
    from app.sampling import ScheduleError

    if args.sampler == "ddim":
        return None
    try:
        return model.solver_plan(args.sampler, args.steps, args.schedule or model.schedule_for(args.sampler),
                                 args.solver_order or 2)[0]
    except ScheduleError as e:
        raise CliError(str(e), USAGE) from e


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
        raise CliError(f"model {model.name!r} has no text encoder; leave out --prompt", USAGE)
    if args.class_label is None:
        if args.guidance_scale not in (None, 1.0):  # as the server: a value that cannot act is an error
            raise CliError("--guidance-scale needs --class-label (without one the samples are unconditional and w "
                           "has no effect)", USAGE)
        return model.network()
    if not model.conditional:
        raise CliError(f"model {model.name!r} is not class-conditional; leave out --class-label", USAGE)
    names = {c.lower(): i for i, c in enumerate(model.class_names)}
    label = args.class_label.strip().lower()
    if label not in names and not (label.isdigit() and int(label) < len(names)):
        raise CliError(f"unknown class {args.class_label!r}; valid: {', '.join(model.class_names)}", USAGE)
    y = torch.full((n,), names[label] if label in names else int(label), dtype=torch.long)
    return model.network(y, w)


def _writable(*paths: str | None) -> None:
    """Fail before any work where an output's folder is missing."""
    for path in paths:
        if path and not Path(path).resolve().parent.is_dir():
            raise CliError(f"cannot write {path}: no folder {Path(path).parent}")


def _read_images(paths: list[str]) -> list:  # -> list[PIL.Image.Image]
    """Each file decoded (before the model loads, so that a wrong file fails at once)."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            image = Image.open(path)
            image.load()
        except UnidentifiedImageError:
            raise CliError(f"{path}: not an image this command reads (PNG, JPEG, ...)") from None
        except OSError as e:
            raise CliError(f"cannot read {path}: {e.strerror or e}") from None
        except Image.DecompressionBombError as e:
            raise CliError(f"{path}: {e}") from None
        images.append(image)
    return images
