"""`ddim train`: training of the bundled models, with EMA, checkpoints and resume.

Two objectives over the same UNet2DModel:
- "epsilon": DDPM's L_simple on the VP path x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps;
- "flow": rectified flow, x_sigma = (1 - sigma) x0 + sigma eps with sigma ~ U(0, 1), the network at
  timestep 1000 sigma regressing v = eps - x0 (diffusers' FlowMatchEulerDiscreteScheduler convention).
With num_classes > 0 the UNet gets a class embedding of num_classes + 1 rows; the last one is the null
(unconditional) label, used for a fraction class_dropout of the training batch, so that one model serves
unconditional and classifier-free-guided sampling.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DModel
from tqdm import tqdm

from app.models.folder import write_model_folder
from app.sampling.schedules import alphas_cumprod_from_config
from app.train.data import load_split, to_model_space

log = logging.getLogger(__name__)

SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
}

FLOW_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
}

UNET_CONFIG = {
    "sample_size": 32,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 16,
}


@dataclass
class TrainConfig:
    steps: int = 8000
    batch_size: int = 64
    lr: float = 4e-4
    warmup: int = 200
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 250
    snapshot_every: int = 1000  # EMA weights kept at these steps: the training curve's points (docs/quality.md)
    threads: int = 0
    objective: str = "epsilon"  # or "flow"
    num_classes: int = 0  # > 0: class-conditional, with one more (null) label
    class_dropout: float = 0.1
    class_names: list = field(default_factory=list)
    unet: dict = field(default_factory=lambda: dict(UNET_CONFIG))
    scheduler: dict = field(default_factory=lambda: dict(SCHEDULER_CONFIG))

    def __post_init__(self) -> None:
        if self.objective not in ("epsilon", "flow"):
            raise ValueError(f"objective must be 'epsilon' or 'flow', got {self.objective!r}")
        if self.objective == "flow" and self.scheduler.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
            self.scheduler = dict(FLOW_SCHEDULER_CONFIG)
        if self.num_classes:
            self.unet = {**self.unet, "num_class_embeds": self.num_classes + 1}


def noisy_batch(cfg: TrainConfig, x0: torch.Tensor, alphas_cumprod: torch.Tensor,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, the network's timestep, the regression target) for one batch of clean images."""
    eps = torch.randn(x0.shape, generator=gen)
    if cfg.objective == "flow":
        sigma = torch.rand(len(x0), generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        return (1 - s) * x0 + s * eps, sigma * cfg.scheduler["num_train_timesteps"], eps - x0
    t = torch.randint(0, alphas_cumprod.numel(), (len(x0),), generator=gen)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps  # L_simple


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - d)


def _batch_indices(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """Deterministic data order: a fresh permutation per epoch, so a resumed run sees the same data."""
    per_epoch = n // batch
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return perm[k * batch:(k + 1) * batch]


def _init_from(folder: Path, model: torch.nn.Module, ema: torch.nn.Module) -> tuple[int, float]:
    """Start from a model folder's EMA weights (model and EMA alike); returns (step, wall) from its training.json.

    The optimiser state of the run that made the folder is gone with its checkpoint: Adam's moments start afresh,
    and the learning rate warms up again from this step (TrainConfig.warmup), so the first updates stay small.
    """
    from safetensors.torch import load_file

    weights = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    model.load_state_dict(weights)
    ema.load_state_dict(weights)
    info = json.loads((folder / "training.json").read_text())
    log.info("initialised from %s (its step %d); Adam's moments start afresh", folder, info["step"])
    return int(info["step"]), float(info.get("wall_seconds", 0.0))


def train(cfg: TrainConfig, workdir: Path, max_minutes: float | None = None, init_from: Path | None = None) -> Path:
    """Train (or resume) until cfg.steps or max_minutes; returns the checkpoint path.

    A checkpoint in workdir wins; without one, init_from (a model folder of ours) gives the starting weights.
    Every 50 steps the mean loss is appended to workdir/loss.jsonl, and every cfg.snapshot_every steps the EMA
    weights are kept as workdir/snapshots/ema-STEP.safetensors: the training curve of docs/quality.md.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = workdir / "checkpoint.pt"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = UNet2DModel(**cfg.unet)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, wall, warm_from = 0, 0.0, 0
    gen = torch.Generator().manual_seed(cfg.seed)
    if not ckpt_path.exists() and init_from is not None:
        step, wall = _init_from(init_from, model, ema)
        warm_from = step
        gen.manual_seed(cfg.seed * 1_000_003 + step)  # not the noise of the run's first steps again
    elif ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, wall, warm_from = state["step"], state["wall"], state.get("warm_from", 0)
        log.info("resumed from %s at step %d", ckpt_path, step)
    (workdir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))

    images, labels_np = load_split("train")
    data = to_model_space(images, cfg.unet["sample_size"])
    labels_all = torch.from_numpy(labels_np.astype("int64"))
    alphas_cumprod = alphas_cumprod_from_config(cfg.scheduler) if cfg.objective == "epsilon" else torch.ones(1)

    def save() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "gen": gen.get_state(), "step": step, "wall": wall, "warm_from": warm_from}, tmp)
        tmp.replace(ckpt_path)

    deadline = time.monotonic() + 60 * max_minutes if max_minutes else float("inf")
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True)
    t0 = time.monotonic()
    losses: list[float] = []
    loss_log = (workdir / "loss.jsonl").open("a")
    while step < cfg.steps and time.monotonic() < deadline:
        idx = _batch_indices(step, cfg.batch_size, len(data), cfg.seed)
        x0 = data[idx]
        flip = torch.rand(len(x0), generator=gen) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        x_t, t, target = noisy_batch(cfg, x0, alphas_cumprod, gen)
        labels = None
        if cfg.num_classes:
            drop = torch.rand(len(x0), generator=gen) < cfg.class_dropout
            labels = torch.where(drop, torch.full_like(idx, cfg.num_classes), labels_all[idx])
        loss = torch.nn.functional.mse_loss(model(x_t, t, class_labels=labels).sample, target)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step - warm_from + 1) / cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        _ema_update(ema, model, step, cfg.ema_decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        losses.append(loss.item())
        if step % 50 == 0:
            loss_log.write(json.dumps({"step": step, "loss": sum(losses) / len(losses)}) + "\n")
            loss_log.flush()
            losses.clear()
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:
            save_snapshot(workdir, ema, step)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            wall += time.monotonic() - t0
            t0 = time.monotonic()
            save()
    wall += time.monotonic() - t0
    save()
    loss_log.close()
    bar.close()
    return ckpt_path


def save_snapshot(workdir: Path, ema: torch.nn.Module, step: int) -> Path:
    """The EMA weights at this step, as workdir/snapshots/ema-STEP.safetensors (11 MB for the bundled UNet)."""
    from safetensors.torch import save_file

    path = workdir / "snapshots" / f"ema-{step:06d}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(path))
    return path


def snapshots(workdir: Path) -> dict[int, Path]:
    """The kept EMA snapshots of a training run, by step."""
    return {int(p.stem.split("-")[1]): p for p in sorted((workdir / "snapshots").glob("ema-*.safetensors"))}


def export(workdir: Path, out: Path) -> dict:
    """Write the EMA weights in the diffusers DDPMPipeline layout (safetensors)."""
    state = torch.load(workdir / "checkpoint.pt", map_location="cpu", weights_only=False)
    cfg = json.loads((workdir / "train_config.json").read_text())
    unet = UNet2DModel(**cfg["unet"])
    unet.load_state_dict(state["ema"])
    write_model_folder(out, unet, cfg["scheduler"], class_names=cfg.get("class_names") or None)
    info = {"step": state["step"], "wall_seconds": round(state["wall"], 1), "batch_size": cfg["batch_size"],
            "objective": cfg.get("objective", "epsilon"),
            **({"class_dropout": cfg.get("class_dropout")} if cfg.get("num_classes") else {}),
            "lr": cfg["lr"], "ema_decay": cfg["ema_decay"], "seed": cfg["seed"],
            "parameters": sum(p.numel() for p in unet.parameters())}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
