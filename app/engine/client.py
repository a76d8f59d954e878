"""The narrow interface the HTTP layer talks to: load models, build validated jobs, run them."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch

from app.config import Settings
from app.engine.jobs import JobResult, SampleJob
from app.engine.worker import BatchWorker
from app.metrics import Metrics
from app.models import LoadedModel, ModelStoreError, discover, load_model, pick_device
from app.models.layout import faster_layouts
from app.models.memory import MMAP_THRESHOLD_MAX, keep_freed_memory
from app.sampling import Direction, Plan, ScheduleError, draw, lerp, sample_generators, slerp

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown model {name!r}; loaded models: {', '.join(known) or 'none'}")


class InvalidRequest(ValueError):
    """A request that passed the schema but cannot run on this model; field names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Engine:
    """All models and their workers. Created in create_app, started by the lifespan."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, LoadedModel] = {}
        self.workers: dict[str, BatchWorker] = {}
        self.ready = False
        self.error: str | None = None
        self.default_name: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def load(self) -> None:
        """Load every model of the store, warm each up, start its worker (blocking; run in a thread)."""
        s = self.settings
        started = time.monotonic()
        if s.keep_freed_memory and keep_freed_memory():
            log.info("malloc keeps freed memory (mmap threshold %d MiB)", MMAP_THRESHOLD_MAX >> 20)
        device = pick_device(s.device)
        names = discover(s.model_store)
        if not names:
            raise ModelStoreError(f"{s.model_store}: no model folders found")
        layouts = self._channels_last([s.model_store / name for name in names], device)
        for name, channels_last in zip(names, layouts):
            loaded: Future[tuple[LoadedModel, BatchWorker]] = Future()
            threading.Thread(target=self._serve_model, args=(name, device, channels_last, started, loaded),
                             name=f"worker-{name}", daemon=True).start()
            model, worker = loaded.result()  # re-raises what loading raised
            self.models[name], self.workers[name] = model, worker
            info = model.info()
            self.metrics.model_info.labels(name, info["device"], info["dtype"], str(model.num_train_timesteps),
                                           "x".join(map(str, info["image_size"])), str(info["channels"])).set(1)
            log.info("model %s ready on %s (%s, channels_last=%s)", name, device, info["dtype"], info["channels_last"])
        self.default_name = s.default_model if s.default_model in self.models else names[0]
        self.ready = True
        self.metrics.ready.set(1)
        self.metrics.startup_seconds.set(time.monotonic() - started)

    def _serve_model(self, name: str, device: torch.device, channels_last: bool, started: float,
                     loaded: Future[tuple[LoadedModel, BatchWorker]]) -> None:
        """The thread of one model: load (in the chosen layout), compile, warm up, then serve (BatchWorker.run_here)."""
        s = self.settings
        try:
            model = load_model(s.model_store / name, device=device, dtype=s.dtype, allow_pickle=s.allow_pickle,
                               channels_last=channels_last)
            self._prepare(model, budget_from=started)
            worker = BatchWorker(model, self.metrics, max_batch_size=s.max_batch_size, max_queue=s.max_queue,
                                 batching=s.batching, priority=s.priority, max_defer_steps=s.max_defer_steps)
        except BaseException as e:
            loaded.set_exception(e)
            return
        loaded.set_result((model, worker))
        worker.run_here()

    def _channels_last(self, folders: list[Path], device: torch.device) -> list[bool]:
        """The memory layout to load each model in: auto times both, in a process of their own."""
        s = self.settings
        if s.channels_last != "auto" or not s.warmup:
            return [s.channels_last is True] * len(folders)
        return faster_layouts(folders, device=device, dtype=s.dtype, batch=s.max_batch_size, threads=s.threads,
                              keep_freed=s.keep_freed_memory, allow_pickle=s.allow_pickle)

    def _prepare(self, model: LoadedModel, budget_from: float) -> None:
        """Compiling and warm-up, in the model's own thread."""
        s = self.settings
        if s.threads:  # torch's thread settings are per thread under OpenMP: set them where forwards run
            torch.set_num_threads(s.threads)
        if s.compile:
            budget = max(0.0, s.compile_budget_seconds - (time.monotonic() - budget_from))
            model.forward.compile(s.max_batch_size, budget, model.sample_shape)
        if s.warmup:
            for b in sorted({1, s.max_batch_size}):
                model.eps(torch.zeros(b, *model.sample_shape, device=model.device), torch.full((b,), 500.0))

    def stop(self) -> None:
        for w in self.workers.values():
            w.stop()

    # -- lookups -------------------------------------------------------------------------------
    def model(self, name: str | None) -> LoadedModel:
        name = name or self.default_name
        if name not in self.models:
            raise UnknownModel(str(name), sorted(self.models))
        return self.models[name]

    def check_steps(self, model: LoadedModel, steps: int, schedule: str | None,
                    direction: Direction = "generate") -> Plan:
        """The run's plan on this model (schedule None: the model's default)."""
        if steps > self.settings.max_steps:
            raise InvalidRequest("steps", f"steps must be at most {self.settings.max_steps} on this server")
        try:
            return model.plan(steps, schedule or model.spacings[0], direction)
        except ScheduleError as e:
            raise InvalidRequest("steps" if "steps" in str(e) else "schedule", str(e)) from e

    @staticmethod
    def class_labels(model: LoadedModel, class_label: int | str | list[int | str] | None, n: int,
                     field: str = "class_label") -> torch.Tensor | None:
        """Class indices [n] from an index, a class name (any case) or a list with one per image; None: none."""
        if class_label is None:
            return None
        if not model.conditional:
            raise InvalidRequest(field, f"model {model.name!r} is not class-conditional; leave out {field}")
        values = class_label if isinstance(class_label, list) else [class_label] * n
        if len(values) != n:
            raise InvalidRequest(field, f"{field} has {len(values)} labels for {n} images; give one, or one per image")
        names = {c.lower(): i for i, c in enumerate(model.class_names)}
        out = []
        for v in values:
            if isinstance(v, str) and v.strip().lower() in names:
                out.append(names[v.strip().lower()])
            elif isinstance(v, int) and 0 <= v < len(model.class_names):
                out.append(v)
            else:
                valid = ", ".join(f"{i}={c!r}" for i, c in enumerate(model.class_names))
                raise InvalidRequest(field, f"unknown class {v!r} for model {model.name!r}; valid classes: {valid} "
                                            "(leave out class_label for unconditional samples)")
        return torch.tensor(out, dtype=torch.long)

    @staticmethod
    def _guidance(labels: torch.Tensor | None, w: float) -> dict[str, object]:
        """w = 0 is the unconditional prediction itself, so it runs as such (no second row)."""
        if labels is None or w == 0:
            return {"class_labels": None, "guidance_scale": 1.0}
        return {"class_labels": labels, "guidance_scale": w}

    def check_latents(self, model: LoadedModel, x: torch.Tensor, n: int, field: str) -> torch.Tensor:
        want = (n, *model.sample_shape)
        if tuple(x.shape) != want:
            raise InvalidRequest(field, f"{field} must have shape {want}, got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise InvalidRequest(field, f"{field} holds NaN or infinite values")
        return x.float()

    # -- jobs ----------------------------------------------------------------------------------
    def generate_job(self, model: LoadedModel, *, n: int, steps: int, eta: float, large: bool, schedule: str | None,
                     seed: int | None, x_T: torch.Tensor | None = None, clip: bool | None = None,
                     endpoint: str = "generate", class_labels: torch.Tensor | None = None,
                     guidance_scale: float = 1.0) -> tuple[SampleJob, int | None]:
        """A validated generation job; the seed (chosen at random if None) is returned with it."""
        if large and model.kind != "vp":
            raise InvalidRequest("variance", f"variance 'large' (DDPM's sigma-hat) is defined for VP models only; "
                                             f"model {model.name!r} is a {model.kind} model")
        seq = self.check_steps(model, steps, schedule)
        self._check_n(n, "n")
        stochastic = eta > 0 or large
        gens = None
        if x_T is None or stochastic:
            if seed is None:
                seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
            gens = sample_generators(seed, n)
            drawn = draw(gens, model.sample_shape)
            x_T = drawn if x_T is None else self.check_latents(model, x_T, n, "x_T")
        else:
            x_T = self.check_latents(model, x_T, n, "x_T")
        clip_denoised = model.clip_sample if clip is None else clip
        job = SampleJob("generate", x_T, seq, eta=eta, large=large, clip_denoised=clip_denoised,
                        generators=gens if stochastic else None, endpoint=endpoint,
                        **self._guidance(class_labels, guidance_scale))  # type: ignore[arg-type]
        return job, seed

    def _check_n(self, n: int, field: str) -> None:
        if n > self.settings.max_queue:
            raise InvalidRequest(field, f"{n} samples can never fit this server's queue of "
                                        f"{self.settings.max_queue}; split the request")

    def invert_job(self, model: LoadedModel, images: torch.Tensor, *, steps: int, schedule: str | None,
                   endpoint: str = "invert", class_labels: torch.Tensor | None = None,
                   guidance_scale: float = 1.0) -> SampleJob:
        if model.prediction_type == "sample":
            raise InvalidRequest("model", f"model {model.name!r} predicts x0 ('sample'); DDIM inversion needs an "
                                          "eps or v prediction, since eps is undefined at the clean start")
        seq = self.check_steps(model, steps, schedule, "invert")
        self._check_n(images.shape[0], "images")
        return SampleJob("invert", self.check_latents(model, images, images.shape[0], "images"), seq,
                         endpoint=endpoint, **self._guidance(class_labels, guidance_scale))  # type: ignore[arg-type]

    async def run(self, model: LoadedModel, job: SampleJob) -> JobResult:
        """Submit and await; a cancelled await (client gone) cancels the job in the worker."""
        worker = self.workers[model.name]
        worker.submit(job)
        try:
            result = await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            worker.cancel(job)
            raise
        self.metrics.images.labels(model.name, job.endpoint).inc(job.n)
        return result

    @staticmethod
    def interpolate(x0: torch.Tensor, x1: torch.Tensor, frames: int, method: str) -> torch.Tensor:
        """frames latents from x0 to x1 (both [C, H, W]), endpoints included."""
        f = slerp if method == "slerp" else lerp
        return torch.stack([f(x0, x1, i / (frames - 1)) for i in range(frames)])
