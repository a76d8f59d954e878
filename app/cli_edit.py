"""`ddim edit`: /edit offline, with the loops the engine's jobs equal (app/sampling/loop.edit)."""

from __future__ import annotations

import argparse

from tqdm import tqdm

from app.cli_args import USAGE, CliError


def cmd_edit(args: argparse.Namespace) -> int:
    """/edit offline: invert under the source condition for k = int(S strength) steps, generate back under the
    target's (--class-label / --prompt, --guidance-scale)."""
    import torch

    from app.cli_model import _announce, _load, _network, _plan, _read_images, _resolve, _writable
    from app.images import grid, pil_images, to_model_space
    from app.sampling import strength_steps
    from app.sampling.loop import edit

    settings, folder = _resolve(args)
    _writable(args.out)
    images = _read_images(args.images)
    k = strength_steps(args.steps, args.strength)
    if k == 0:
        raise CliError(f"--strength {args.strength} of {args.steps} steps is k = int(S x strength) = 0 steps: "
                       "nothing would change", USAGE)
    model = _load(settings, folder)
    n = len(images)
    source = _network(model, argparse.Namespace(prompt=args.source_prompt, negative_prompt=args.negative_prompt,
                                                class_label=args.source_class_label,
                                                guidance_scale=args.source_guidance_scale), n)
    target = _network(model, args, n)
    codec = model.codec
    h, w = model.image_size
    shape = model.sample_shape if codec is None else (codec.image_channels, h, w)
    _announce(model)
    x0 = torch.stack([to_model_space(image, shape) for image in images]).to(model.device)
    z = x0 if codec is None else codec.encode(x0)
    _, out = edit(source, target, z, _plan(model, args, "invert"), _plan(model, args, "generate"), k,
                  prediction_type=model.prediction_type, progress=lambda steps: tqdm(steps, desc="edit", leave=False))
    edited = pil_images(out if codec is None else codec.decode(out))
    (edited[0] if n == 1 else grid(edited)).save(args.out)
    print(f"wrote {n} edits of {model.name} (S={args.steps}, strength={args.strength}, k={k}) to {args.out}")
    return 0
