"""The model store: folders in the diffusers pipeline layout, loaded unchanged.

A folder whose scheduler is a FlowMatchEulerDiscreteScheduler is a rectified-flow model (it predicts
v = eps - x0 at timestep num_train_timesteps sigma); any other scheduler config is a VP (DDPM) model.
A UNet2DModel with num_class_embeds is class-conditional: its last class row is the null label of
classifier-free guidance, and model_index.json may name the others in id2label (as DiTPipeline does).

A UNet2DModel folder comes in either layout found on the Hub, nested or flat (app/models/unet.py reads it).

Latent pipelines (StableDiffusionPipeline, StableDiffusion3Pipeline, DiTPipeline) load as parts (app/models/
pipelines.py): the same LoadedModel, whose eps(x, t, cond) calls their denoiser with per-row cond tensors, with a
codec (their VAE) and a conditioner (text encoders) beside it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin

from app.models.codec import LatentCodec
from app.models.conditioning import Cond, TextConditioner
from app.models.denoiser import Conditioning, Denoiser, Parts
from app.models.fast import Forward, bf16_supported
from app.models.kinds import ModelStoreError, check_folder, check_store, read_json
from app.models.pipelines import load_parts
from app.models.unet import ModelFiles, load_unet
from app.sampling import (
    FLOW_SPACINGS,
    SOLVER_SPACINGS,
    SPACINGS,
    VP_PREDICTION_TYPES,
    Direction,
    PathKind,
    Plan,
    ScheduleError,
    SolverPlan,
    alphas_cumprod_from_config,
    check_flow_config,
    flow_plan,
    flow_sigmas,
    flow_solver_plan,
    guide,
    timestep_sequence,
    vp_plan,
    vp_solver_plan,
)

log = logging.getLogger(__name__)

SAMPLERS = ("ddim", "dpmsolver++", "unipc")  # ddim: the generalized step of app/sampling/step.py (the default)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PLANS_KEPT = 512  # plans cached per model; the cache starts afresh past it


def pick_device(requested: str = "auto") -> torch.device:
    """cuda, then mps, then cpu -- or exactly what was requested."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"


@dataclass
class LoadedModel:
    """A denoising network on its device, with its path (VP alpha-bar table or flow shift) and sampling defaults."""

    name: str
    unet: ModelMixin  # the denoising network: a UNet2DModel, or a pipeline's UNet or transformer
    scheduler_config: dict[str, Any]
    alphas_cumprod: torch.Tensor | None  # VP only
    device: torch.device
    dtype: torch.dtype
    path: Path
    channels_last: bool = False
    class_names: tuple[str, ...] = ()
    parts: Parts | None = None  # a latent pipeline's codec, conditioner and defaults
    # plans are pure functions of (S, spacing, direction): made once, shared by every request that asks (a Plan's
    # tensors are never written to)
    _plans: dict[tuple[int, str, str], Plan] = field(default_factory=dict, repr=False, compare=False)

    @property
    def codec(self) -> LatentCodec | None:
        return None if self.parts is None else self.parts.codec

    @property
    def conditioner(self) -> TextConditioner | None:
        return None if self.parts is None else self.parts.conditioner

    @property
    def conditioning(self) -> Conditioning:
        """What a request conditions on: nothing, a class, or text."""
        if self.parts is not None:
            return self.parts.conditioning
        return "class" if self.conditional else "none"

    @property
    def default_guidance(self) -> float:
        """The guidance scale of a request that gives none: the pipeline's own (1, none, for a UNet2DModel)."""
        return 1.0 if self.parts is None else self.parts.guidance_scale

    @property
    def size_step(self) -> int:
        """Pixel sizes are multiples of this: the codec's factor times the denoiser's patch size."""
        return 1 if self.parts is None or self.codec is None else self.codec.factor * self.parts.patch

    @property
    def image_size(self) -> tuple[int, int]:
        """The default (height, width) of a decoded image."""
        _, h, w = self.sample_shape
        f = 1 if self.codec is None else self.codec.factor
        return h * f, w * f

    def latent_shape(self, width: int | None, height: int | None) -> tuple[int, int, int]:
        """The stepper's sample shape for images of width x height pixels (None: the default); ValueError naming
        the field for a size this model cannot make."""
        c, h, w = self.sample_shape
        if width is None and height is None:
            return c, h, w
        step, (dh, dw) = self.size_step, self.image_size
        fixed = self.parts is None or self.parts.pipeline == "DiTPipeline"
        for name, v, default in (("width", width, dw), ("height", height, dh)):
            if v is None:
                continue
            if fixed and v != default:
                raise ValueError(f"{name}: model {self.name!r} makes {dw}x{dh} images only, got {name} {v}")
            if v % step or v < step:
                raise ValueError(f"{name}: must be a positive multiple of {step} (the VAE factor x patch size) on "
                                 f"model {self.name!r}, got {v}")
        f = 1 if self.codec is None else self.codec.factor
        return c, (height or dh) // f, (width or dw) // f

    def label_cond(self, labels: torch.Tensor | None, n: int) -> Cond:
        """The per-row cond of class labels [n] (None: the null label, unconditional); empty for a model that
        takes no class."""
        if self.conditioning != "class":
            return {}
        if labels is None:
            labels = torch.full((n,), self.null_class or 0, dtype=torch.long)
        return {"class_labels": labels}

    def null_cond(self, n: int) -> Cond:
        """n rows of the unconditional input (warm-up forwards)."""
        if self.parts is not None and self.parts.null_cond is not None:
            return {k: v.expand(n, *v.shape[1:]) for k, v in self.parts.null_cond.items()}
        return self.label_cond(None, n)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet.config.in_channels), int(h), int(w))

    @property
    def kind(self) -> PathKind:
        return "flow" if self.scheduler_config.get("_class_name") == FLOW_SCHEDULER else "vp"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def prediction_type(self) -> str:
        return "flow" if self.kind == "flow" else str(self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def steps_offset(self) -> int:
        """Added to leading timesteps, as diffusers' DDIMScheduler does (pipelines only; 0 for UNet2DModel folders)."""
        return int(self.scheduler_config.get("steps_offset", 0)) if self.parts is not None else 0

    @property
    def clip_sample(self) -> bool:
        return self.kind == "vp" and bool(self.scheduler_config.get("clip_sample", True))

    @property
    def beta_schedule(self) -> str | None:
        if self.kind == "flow":
            return None
        if self.scheduler_config.get("trained_betas") is not None:
            return "trained_betas"
        return str(self.scheduler_config.get("beta_schedule", "linear"))

    @property
    def shift(self) -> float | None:
        return float(self.scheduler_config.get("shift", 1.0)) if self.kind == "flow" else None

    @property
    def spacings(self) -> tuple[str, ...]:
        """The schedule names this model samples with; the first is its default."""
        if self.kind == "flow":
            return FLOW_SPACINGS
        own = self.scheduler_config.get("timestep_spacing", "leading") if self.parts is not None else None
        return (own, *(s for s in SPACINGS if s != own)) if own in SPACINGS else SPACINGS

    @property
    def conditional(self) -> bool:
        """Class-conditional (a UNet2DModel with num_class_embeds, or DiT)."""
        if self.parts is not None:
            return self.parts.conditioning == "class"
        return self.unet.config.num_class_embeds is not None

    @property
    def null_class(self) -> int | None:
        """The reserved unconditional label: the class embedding's last row."""
        if self.parts is not None:
            return self.parts.null_class
        return int(self.unet.config.num_class_embeds) - 1 if self.conditional else None

    def plan(self, steps: int, spacing: str, direction: Direction) -> Plan:
        """The levels and network timesteps of an S-step run; ScheduleError for a spacing this model lacks."""
        if spacing not in self.spacings:
            raise ScheduleError(f"schedule {spacing!r} is not offered for {self.kind} model {self.name!r}; "
                                f"supported: {', '.join(self.spacings)}")
        key = (int(steps), spacing, direction)
        if (plan := self._plans.get(key)) is None:
            if len(self._plans) >= PLANS_KEPT:
                self._plans.clear()
            plan = self._plans[key] = self._make_plan(*key)
        return plan

    def _make_plan(self, steps: int, spacing: str, direction: Direction) -> Plan:
        if self.kind == "flow":
            return flow_plan(flow_sigmas(steps, self.num_train_timesteps, self.shift or 1.0),
                             self.num_train_timesteps, direction)
        assert self.alphas_cumprod is not None
        seq = timestep_sequence(steps, self.num_train_timesteps, spacing)
        if self.parts is None:
            return vp_plan(self.alphas_cumprod, seq, direction)
        # diffusers' DDIMScheduler: leading timesteps shifted by steps_offset, and the last step ends at alpha-bar_0
        # unless set_alpha_to_one
        if spacing in ("leading", "uniform"):
            seq = (seq + self.steps_offset).clamp(max=self.num_train_timesteps - 1)
        end = -1 if self.scheduler_config.get("set_alpha_to_one", True) else 0
        return vp_plan(self.alphas_cumprod, seq, direction, end=end)

    def solver_spacings(self) -> tuple[str, ...]:
        """The schedules a multistep sampler offers on this model; the first is its default: the spacing the
        model's scheduler config names when the solver has it (as diffusers' from_config keeps it), else linspace
        (the solvers' own default). A flow model has one grid, named linspace."""
        if self.kind == "flow":
            return ("linspace",)
        own = self.scheduler_config.get("timestep_spacing")
        first = own if own in SOLVER_SPACINGS else "linspace"
        return (first, *(x for x in SOLVER_SPACINGS if x != first))

    def schedule_for(self, sampler: str) -> str:
        """The default schedule of a sampler on this model."""
        return self.spacings[0] if sampler == "ddim" else self.solver_spacings()[0]

    def solver_plan(self, sampler: str, steps: int, spacing: str, order: int) -> tuple[SolverPlan, Plan]:
        """A multistep sampler's run on this model, as diffusers' scheduler of that sampler built from_config of the
        model's scheduler config runs it: (its plan, the levels and timesteps the batch walks)."""
        if spacing not in self.solver_spacings():
            raise ScheduleError(f"schedule {spacing!r} is not offered for {sampler} on {self.kind} model "
                                f"{self.name!r}; supported: {', '.join(self.solver_spacings())}")
        if self.kind == "flow":
            plan = flow_solver_plan(sampler, steps, num_train_timesteps=self.num_train_timesteps,  # type: ignore[arg-type]
                                    shift=self.shift or 1.0, order=order)
        else:
            plan = vp_solver_plan(self.scheduler_config, sampler, steps, spacing, order)  # type: ignore[arg-type]
        a, s, _ = plan.levels()
        return plan, Plan(a, s, plan.timesteps.float())

    def __post_init__(self) -> None:
        self.forward: Forward | Denoiser = Forward(self.unet, self.device, self.dtype,
                                                   channels_last=self.channels_last) \
            if self.parts is None else self.parts.denoiser

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond | torch.Tensor | None = None) -> torch.Tensor:
        """The network output (eps, x0, v or flow velocity, as prediction_type says) in float32, on the model's
        device. cond: per-row tensors by the denoiser's keyword ({"class_labels": ...} for a class-conditional
        UNet2DModel; a tensor is taken as class labels). A conditional model without labels gets the null label."""
        if self.parts is not None:  # a pipeline's Denoiser (or whatever wraps it)
            assert cond is None or isinstance(cond, dict)
            return self.forward(x, t, cond)  # type: ignore[arg-type]
        labels = cond.get("class_labels") if isinstance(cond, dict) else cond
        return self.forward(x, t, labels)  # type: ignore[arg-type]  # (a UNet2DModel Forward here)

    def network(self, class_labels: torch.Tensor | None = None, guidance_scale: float = 1.0, *,
                prompts: list[str] | None = None,
                negative_prompts: list[str] | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The prediction as a function of (x, t) for offline loops: conditional on class_labels [n] or a text
        model's prompts [n] if given, and guided when w is not 1 (against the null label or the negative prompts,
        default ""), both rows in one forward as the engine runs them (w = 0: unconditional)."""
        if prompts is not None:
            assert self.conditioner is not None, f"model {self.name!r} has no text encoder"
            cond = self.conditioner.encode(prompts).cond
            uncond = self.conditioner.encode(negative_prompts or [""] * len(prompts)).cond
            if guidance_scale == 0:
                cond, guidance_scale = uncond, 1.0
        elif class_labels is None or guidance_scale == 0:
            return self.eps if self.parts is None else lambda x, t: self.eps(x, t, self.null_cond(len(x)))
        else:
            cond, uncond = self.label_cond(class_labels, len(class_labels)), self.label_cond(None, len(class_labels))
        if guidance_scale == 1:
            return lambda x, t: self.eps(x, t, cond)
        both = {k: torch.cat([v, uncond[k]]) for k, v in cond.items()}

        def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = self.eps(torch.cat([x, x]), torch.cat([t, t]), both)
            return guide(out[:len(x)], out[len(x):], guidance_scale)

        return guided

    def info(self) -> dict[str, Any]:
        c, h, w = self.sample_shape
        if self.codec is not None:  # the images' size and channels; latent_shape is the stepper's
            (h, w), c = self.image_size, 3
        return {"name": self.name, "kind": self.kind, "image_size": [h, w], "channels": c, **self._pipeline_info(),
                "num_train_timesteps": self.num_train_timesteps, "beta_schedule": self.beta_schedule,
                "shift": self.shift, "schedules": list(self.spacings),
                "samplers": list(SAMPLERS), "solver_schedules": list(self.solver_spacings()),
                "prediction_type": self.prediction_type, "clip_sample": self.clip_sample,
                "conditional": self.conditional, "class_names": list(self.class_names) if self.conditional else None,
                "null_class": self.null_class,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "channels_last": self.forward.channels_last,
                "trace": getattr(self.forward, "traced", None) is not None,  # DDIM_TRACE, for a pipeline
                "parameters": sum(p.numel() for p in self.unet.parameters())}

    def _pipeline_info(self) -> dict[str, Any]:
        """What /models says of the pipeline: its class, conditioning, space, default size and guidance, prompt
        token limit, and that its scheduler class only supplies the path (sampling is always DDIM here)."""
        h, w = self.image_size
        out: dict[str, Any] = {
            "pipeline": "DDPMPipeline" if self.parts is None else self.parts.pipeline,
            "conditioning": self.conditioning, "space": "pixel" if self.codec is None else "latent",
            "default_size": [w, h], "size_multiple": self.size_step, "default_guidance_scale": self.default_guidance,
            "prompt_token_limit": None if self.conditioner is None else self.conditioner.token_limit}
        if self.parts is not None:
            out["latent_shape"] = list(self.sample_shape)
            out["scheduler"] = (f"{self.parts.scheduler_class} config supplies the path only; sampled with this "
                                "server's DDIM stepper")
        return out


def load_model(root: Path, *, device: torch.device | str = "cpu", dtype: str = "float32",
               allow_pickle: bool = False, name: str | None = None, channels_last: bool = False,
               prompt_cache_size: int = 256, trace: bool = True) -> LoadedModel:
    """Load one model folder; every failure is a ModelStoreError naming the file. trace: a pipeline's denoiser and VAE
    decoder run as graphs traced per input signature (app.models.trace).

    dtype "auto" is bfloat16 where it pays off (see fast.bf16_supported), else float32.
    """
    dev = torch.device(device)
    if dtype == "auto":
        dtype = "bfloat16" if bf16_supported(dev) else "float32"
    if dtype not in DTYPES:
        raise ModelStoreError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not root.is_dir():
        raise ModelStoreError(f"{root}: missing folder")
    check = check_folder(root)  # an unsupported class is refused here, before any weight is read
    if check.kind is not None and check.kind.name != "DDPMPipeline":
        net, parts, sched, names = load_parts(check, dev, DTYPES[dtype], allow_pickle, prompt_cache_size, trace)
        alphas = _path_of(sched, root / "scheduler" / "scheduler_config.json")
        return LoadedModel(name or root.name, net, sched, None if alphas is None else alphas.to(dev), dev,
                           DTYPES[dtype], root, class_names=names, parts=parts)
    files = ModelFiles.find(root, allow_pickle)
    sched = read_json(files.scheduler_config)
    alphas_cumprod = _path_of(sched, files.scheduler_config)
    unet, class_names = load_unet(files)
    unet = unet.to(dev).eval().requires_grad_(False)
    if dtype != "float32":
        # diffusers' ModelMixin.to warns on every dtype cast that modules "should be kept in float32", even when the
        # list of such modules is empty (UNet2DModel's is): cast as torch does unless the model names some
        keep = getattr(unet, "_keep_in_fp32_modules", None) or []
        unet = unet.to(DTYPES[dtype]) if keep else torch.nn.Module.to(unet, DTYPES[dtype])
    return LoadedModel(name or root.name, unet, sched, None if alphas_cumprod is None else alphas_cumprod.to(dev),
                       dev, DTYPES[dtype], root, channels_last=channels_last, class_names=class_names)


def _path_of(sched: dict[str, Any], path: Path) -> torch.Tensor | None:
    """Check a scheduler config; the alpha-bar table of a VP model, None for a flow model."""
    try:
        if sched.get("_class_name") == FLOW_SCHEDULER:
            check_flow_config(sched)
            T, shift = sched.get("num_train_timesteps", 1000), sched.get("shift", 1.0)
            if not isinstance(T, int) or T < 1 or not isinstance(shift, int | float) or shift <= 0:
                raise ScheduleError(f"num_train_timesteps must be a positive integer and shift a positive number, "
                                    f"got {T!r} and {shift!r}")
            return None
        prediction = sched.get("prediction_type", "epsilon")
        if prediction not in VP_PREDICTION_TYPES:
            raise ScheduleError(f"unknown prediction_type {prediction!r}; supported: {', '.join(VP_PREDICTION_TYPES)}")
        return alphas_cumprod_from_config(sched)
    except (ScheduleError, TypeError, ValueError) as e:
        raise ModelStoreError(f"{path}: {e}") from e


def discover(store: Path) -> list[str]:
    """Names of the model folders in a store (folders holding a config), sorted."""
    check_store(store)
    names = [p.name for p in sorted(store.iterdir())
             if p.is_dir() and not p.name.startswith(".")
             and any((p / f).exists() for f in ("model_index.json", "config.json", "unet"))]
    return names
