"""Validated jobs: a request's steps, sampler, labels, prompts and latents checked against its model, then turned into
SampleJobs (generation, inversion, the partial trips of img2img and /edit). A mixin of the Engine, which holds the
settings; nothing here touches a worker.
"""

from __future__ import annotations

import torch

from app.config import Settings
from app.engine.errors import InvalidRequest
from app.engine.jobs import SampleJob
from app.models import LoadedModel
from app.sampling import (
    Direction,
    Plan,
    ScheduleError,
    SolverPlan,
    draw,
    first_steps,
    is_stochastic,
    last_steps,
    sample_generators,
)


class JobSpec:
    """The job builders of the Engine (app/engine/client.py)."""

    settings: Settings

    def check_steps(self, model: LoadedModel, steps: int, schedule: str | None,
                    direction: Direction = "generate") -> Plan:
        """The run's plan on this model (schedule None: the model's default)."""
        if steps > self.settings.max_steps:
            raise InvalidRequest("steps", f"steps must be at most {self.settings.max_steps} on this server")
        try:
            return model.plan(steps, schedule or model.spacings[0], direction)
        except ScheduleError as e:
            raise InvalidRequest("steps" if "steps" in str(e) else "schedule", str(e)) from e

    def check_solver(self, model: LoadedModel, sampler: str, steps: int, schedule: str | None, order: int | None,
                     eta: float, large: bool, clip: bool | None) -> tuple[SolverPlan, Plan]:
        """A multistep sampler's plan on this model; what it cannot do (noise, clipping) is a 422 naming the field."""
        for field, bad, why in (("eta", eta > 0, "eta > 0 (the multistep samplers are deterministic ODE solvers)"),
                                ("variance", large, "variance 'large'"),
                                ("clip_denoised", clip is True, "clip_denoised (diffusers' multistep schedulers "
                                                               "never clip x0)")):
            if bad:
                raise InvalidRequest(field, f"{field}: {why} is for sampler 'ddim' only, not {sampler!r}")
        if steps > self.settings.max_steps:
            raise InvalidRequest("steps", f"steps must be at most {self.settings.max_steps} on this server")
        try:
            return model.solver_plan(sampler, steps, schedule or model.schedule_for(sampler), order or 2)
        except ScheduleError as e:
            raise InvalidRequest("steps" if "steps" in str(e) else "schedule", str(e)) from e

    @staticmethod
    def class_labels(model: LoadedModel, class_label: int | str | list[int | str] | None, n: int,
                     field: str = "class_label") -> torch.Tensor | None:
        """Class indices [n] from an index, a class name (any case; one of its comma-separated synonyms too, as
        DiTPipeline.get_label_ids takes ImageNet's names) or a list with one per image; None: none."""
        if class_label is None:
            return None
        if not model.conditional:
            raise InvalidRequest(field, f"model {model.name!r} is not class-conditional; leave out {field}")
        values = class_label if isinstance(class_label, list) else [class_label] * n
        if len(values) != n:
            raise InvalidRequest(field, f"{field} has {len(values)} labels for {n} images; give one, or one per image")
        names = {c.lower(): i for i, c in enumerate(model.class_names)}
        for i, c in enumerate(model.class_names):
            for synonym in c.split(","):
                names.setdefault(synonym.strip().lower(), i)
        out = []
        for v in values:
            if isinstance(v, str) and v.strip().lower() in names:
                out.append(names[v.strip().lower()])
            elif isinstance(v, int) and 0 <= v < len(model.class_names):
                out.append(v)
            else:
                valid = ", ".join(f"{i}={c!r}" for i, c in enumerate(model.class_names[:20]))
                if len(model.class_names) > 20:
                    valid += f" and {len(model.class_names) - 20} more (GET /models lists them)"
                raise InvalidRequest(field, f"unknown class {v!r} for model {model.name!r}; valid classes: {valid} "
                                            "(leave out class_label for unconditional samples)")
        return torch.tensor(out, dtype=torch.long)

    @staticmethod
    def _guidance(labels: torch.Tensor | None, w: float, prompts: list[str] | None = None,
                  negative_prompts: list[str] | None = None) -> dict[str, object]:
        """w = 0 is the unconditional prediction itself (the null label, or the negative prompts), so it runs as
        such (no second row)."""
        if prompts is not None:
            negative = negative_prompts or [""] * len(prompts)
            if w == 0:
                return {"texts": negative, "guidance_scale": 1.0}
            return {"texts": prompts, "negative_texts": negative if w != 1 else None, "guidance_scale": w}
        if labels is None or w == 0:
            return {"class_labels": None, "guidance_scale": 1.0}
        return {"class_labels": labels, "guidance_scale": w}

    def check_latents(self, model: LoadedModel, x: torch.Tensor, n: int, field: str,
                      shape: tuple[int, ...] | None = None) -> torch.Tensor:
        want = (n, *(shape or model.sample_shape))
        if tuple(x.shape) != want:
            raise InvalidRequest(field, f"{field} must have shape {want}, got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise InvalidRequest(field, f"{field} holds NaN or infinite values")
        return x.float()

    # -- jobs ----------------------------------------------------------------------------------
    def generate_job(self, model: LoadedModel, *, n: int, steps: int, eta: float, large: bool, schedule: str | None,
                     seed: int | None, x_T: torch.Tensor | None = None, clip: bool | None = None,
                     endpoint: str = "generate", class_labels: torch.Tensor | None = None,
                     guidance_scale: float = 1.0, shape: tuple[int, int, int] | None = None,
                     prompts: list[str] | None = None, negative_prompts: list[str] | None = None,
                     sampler: str = "ddim", solver_order: int | None = None, partial: int | None = None,
                     start: torch.Tensor | None = None) -> tuple[SampleJob, int | None]:
        """A validated generation job; the seed (chosen at random if None) is returned with it. shape: the
        stepper's sample shape (default: the model's); prompts (and negative_prompts) [n]: a text model's;
        sampler: ddim, or a multistep solver (its plan then rides on the job).

        partial k: only the last k steps of the plan, from its level t_k (img2img, /edit). start [n, C, H, W]: a
        clean sample in the stepper's space put at t_k as x = a_k start + s_k eps, eps the seed contract's first
        draw (SDEdit, img2img); the generators go on to draw the steps' noise, as from a drawn x_T."""
        if large and model.kind != "vp":
            raise InvalidRequest("variance", f"variance 'large' (DDPM's sigma-hat) is defined for VP models only; "
                                             f"model {model.name!r} is a {model.kind} model")
        if large and model.codec is not None:
            raise InvalidRequest("variance", f"variance 'large' (DDPM's sigma-hat, which adds no noise on the last "
                                             f"step only where it ends clean) is not offered for latent pipelines "
                                             f"such as {model.name!r}, whose DDIM run ends at alpha-bar_0; use eta")
        solver = None
        if sampler == "ddim":
            if solver_order is not None:
                raise InvalidRequest("solver_order", "solver_order is for the multistep samplers (dpmsolver++, "
                                                     "unipc); ddim has no order to set: leave it out")
            seq = self.check_steps(model, steps, schedule)
        else:
            if partial is not None:
                raise InvalidRequest("sampler", "a partial trip (image and strength) runs DDIM's steps from level "
                                                f"t_k: use sampler 'ddim', not {sampler!r}")
            solver, seq = self.check_solver(model, sampler, steps, schedule, solver_order, eta, large, clip)
        if partial is not None:
            seq = last_steps(seq, partial)
        self._check_n(n, "n")
        stochastic = is_stochastic(eta, large)
        gens = None
        if x_T is None or stochastic:
            if seed is None:
                seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
            gens = sample_generators(seed, n)
            drawn = draw(gens, shape or model.sample_shape)
            x_T = drawn if x_T is None else self.check_latents(model, x_T, n, "x_T", shape)
            if start is not None:  # SDEdit: the clean start at level t_k, with the seed contract's eps
                x0 = self.check_latents(model, start, n, "image", shape)
                x_T = float(seq.a[0]) * x0 + float(seq.s[0]) * drawn
        else:
            x_T = self.check_latents(model, x_T, n, "x_T", shape)
        clip_denoised = model.clip_sample if clip is None else clip
        job = SampleJob("generate", x_T, seq, eta=eta, large=large, clip_denoised=clip_denoised and solver is None,
                        generators=gens if stochastic else None, endpoint=endpoint, decode=model.codec is not None,
                        solver=solver, **self._guidance(class_labels, guidance_scale, prompts,
                                                        negative_prompts))  # type: ignore[arg-type]
        return job, seed

    def _check_n(self, n: int, field: str) -> None:
        if n > self.settings.max_queue:
            raise InvalidRequest(field, f"{n} samples can never fit this server's queue of "
                                        f"{self.settings.max_queue}; split the request")

    def invert_job(self, model: LoadedModel, images: torch.Tensor, *, steps: int, schedule: str | None,
                   endpoint: str = "invert", class_labels: torch.Tensor | None = None,
                   guidance_scale: float = 1.0, prompts: list[str] | None = None,
                   negative_prompts: list[str] | None = None, partial: int | None = None,
                   shape: tuple[int, int, int] | None = None) -> SampleJob:
        """An inversion job from clean samples in the stepper's space (a latent model's encoded images), under
        their class labels or prompts with guidance_scale (1: none); partial k: only the first k steps, to t_k."""
        if model.prediction_type == "sample":
            raise InvalidRequest("model", f"model {model.name!r} predicts x0 ('sample'); DDIM inversion needs an "
                                          "eps or v prediction, since eps is undefined at the clean start")
        seq = self.check_steps(model, steps, schedule, "invert")
        if partial is not None:
            seq = first_steps(seq, partial)
        self._check_n(images.shape[0], "images")
        guidance = self._guidance(class_labels, guidance_scale, prompts, negative_prompts)
        return SampleJob("invert", self.check_latents(model, images, images.shape[0], "images", shape), seq,
                         endpoint=endpoint, **guidance)  # type: ignore[arg-type]
