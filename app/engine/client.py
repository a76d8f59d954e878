"""The engine client: the one interface the HTTP layer talks to (in the spirit of vLLM's EngineClient).

submit(work) -> a RequestHandle (events, result, cancel); jobs (the store of retained handles); health(),
stats(), drain(). Below it: the models' workers, and the tasks that run as their jobs (app/engine/tasks.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import Future

import torch

from app.config import Settings
from app.engine.errors import DeadlineExceeded, InvalidRequest, ModelFailed, ShuttingDown, UnknownModel
from app.engine.handle import Outcome, RequestHandle
from app.engine.jobs import JobResult, SampleJob
from app.engine.jobstore import JobStore
from app.engine.tasks import Prepared, Work, prepare
from app.engine.worker import BatchWorker
from app.metrics import Metrics
from app.models import LoadedModel, ModelStoreError, check_folder, discover, load_model, pick_device
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
from app.startup import layouts_for, tune_process, warm_up

log = logging.getLogger(__name__)
job_log = logging.getLogger("ddim.jobs")


class Engine:
    """All models and their workers. Created in create_app, started by the lifespan."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, LoadedModel] = {}
        self.workers: dict[str, BatchWorker] = {}
        self.ready = False
        self.draining = False
        self.error: str | None = None
        self.failed: dict[str, str] = {}  # model name -> why it failed to load
        self.default_name: str | None = None
        self.jobs = JobStore(settings.max_jobs, settings.job_ttl_seconds, metrics)
        self._inflight: set[RequestHandle] = set()
        self._stopping = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------------
    def load(self) -> None:
        """Load every model of the store, warm each up, start its worker (blocking; run in a thread). Each model
        loads on its own: one that fails is kept in self.failed with a one-line error, and the others serve."""
        s = self.settings
        started = time.monotonic()
        tune_process(s)  # done already where main.py started the process; an engine made elsewhere needs it here
        device = pick_device(s.device)
        names = discover(s.model_store)
        if not names:
            raise ModelStoreError(f"{s.model_store}: no model folders found")
        for name in names:
            try:
                check_folder(s.model_store / name)  # a class not supported: refused before any weight is read
                channels_last = layouts_for([s.model_store / name], device, s)[0]
            except Exception as e:
                self._failed(name, e)
                continue
            loaded: Future[tuple[LoadedModel, BatchWorker]] = Future()
            threading.Thread(target=self._serve_model, args=(name, device, channels_last, started, loaded),
                             name=f"worker-{name}", daemon=True).start()
            try:
                model, worker = loaded.result()  # re-raises what loading raised
            except Exception as e:
                self._failed(name, e)
                continue
            self.models[name], self.workers[name] = model, worker
            info = model.info()
            self.metrics.model_info.labels(name, info["device"], info["dtype"], str(model.num_train_timesteps),
                                           "x".join(map(str, info["image_size"])), str(info["channels"])).set(1)
            log.info("model %s ready on %s (%s, channels_last=%s)", name, device, info["dtype"], info["channels_last"])
        if not self.models:
            raise ModelStoreError(f"no model of {s.model_store} could be loaded: "
                                  + "; ".join(f"{n}: {e}" for n, e in self.failed.items()))
        self.default_name = s.default_model if s.default_model in self.models else sorted(self.models)[0]
        threading.Thread(target=self._supervise, name="engine-supervisor", daemon=True).start()
        self.ready = True
        self.metrics.ready.set(1)
        self.metrics.startup_seconds.set(time.monotonic() - started)

    def _failed(self, name: str, error: BaseException) -> None:
        """One model failed to load: one error line, kept for /models and for requests that name it."""
        message = str(error) if isinstance(error, ModelStoreError) else f"{type(error).__name__}: {error}"
        self.failed[name] = message
        self.metrics.model_load_failed.labels(name).set(1)
        log.error("model %s failed to load: %s", name, message)

    def _serve_model(self, name: str, device: torch.device, channels_last: bool, started: float,
                     loaded: Future[tuple[LoadedModel, BatchWorker]]) -> None:
        """The thread of one model: load (in the chosen layout), compile, warm up, then serve (BatchWorker.run_here)."""
        s = self.settings
        try:
            model = load_model(s.model_store / name, device=device, dtype=s.dtype, allow_pickle=s.allow_pickle,
                               channels_last=channels_last, prompt_cache_size=s.prompt_cache_size)
            warm_up(model, s, budget_from=started)
            worker = BatchWorker(model, self.metrics, max_batch_size=s.max_batch_size, max_queue=s.max_queue,
                                 batching=s.batching, priority=s.priority, max_defer_steps=s.max_defer_steps,
                                 release_idle=s.release_idle_threads)
        except BaseException as e:
            loaded.set_exception(e)
            return
        loaded.set_result((model, worker))
        worker.run_here()

    def _supervise(self, every: float = 0.5) -> None:
        """Restart a worker whose thread died (a fault past its step's containment); /readyz is 503 meanwhile."""
        while not self._stopping.wait(every):
            for worker in list(self.workers.values()):
                if not worker.alive and not self._stopping.is_set():
                    worker.restart()

    def stop(self) -> None:
        self._stopping.set()
        for w in self.workers.values():
            w.stop()

    # -- lookups -------------------------------------------------------------------------------
    def model(self, name: str | None) -> LoadedModel:
        name = name or self.default_name
        if name in self.failed:
            raise ModelFailed(name, self.failed[name])
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

    async def run(self, model: LoadedModel, job: SampleJob, handle: RequestHandle | None = None) -> torch.Tensor:
        """Submit one job and await its samples; a cancelled await (cancel, deadline, client gone) cancels the job
        in the worker, whose samples leave the batch at the next step."""
        worker = self.workers[model.name]
        if not job.submitted:
            worker.submit(job)
        try:
            result: JobResult = await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            worker.cancel(job)
            # the worker settles the job once its samples have left the batch (its next step boundary): a cancel
            # is done when the compute is free
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)), 30)
            raise
        if handle is not None:
            handle.queue_seconds += result.queue_seconds
        return result.x

    def count_images(self, model: LoadedModel, endpoint: str, n: int) -> None:
        self.metrics.images.labels(model.name, endpoint).inc(n)

    # -- the interface the API sees ------------------------------------------------------------
    def submit(self, work: Work, *, timeout_s: float | None = None, owner: str | None = None,
               retain: bool = False, request_id: str = "") -> RequestHandle:
        """Validate and start a task; returns its handle at once. Raises InvalidRequest, UnknownModel, NotReady
        (ShuttingDown while draining) or Overloaded (a full queue, or retain and a full job store)."""
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another instance")
        prepared = prepare(self, work)
        limit = self.settings.max_request_seconds
        seconds = limit if timeout_s is None else min(timeout_s, limit)
        handle = RequestHandle(work.task, prepared.model.name, prepared.steps,
                               deadline=time.monotonic() + seconds, owner=owner, request_id=request_id)
        if retain:
            self.jobs.check_room()  # raises Overloaded when the store is full
        self._queue_first(handle, prepared)
        if retain:
            self.jobs.add(handle)
            job_log.info("job created", extra={"fields": {
                "request_id": request_id, "job_id": handle.id, "task": work.task, "model": handle.model,
                "n": prepared.n, "steps": prepared.steps}})
            handle.on_finish.append(_log_job_end)
        handle.start(asyncio.ensure_future(self._run_until(handle, prepared, seconds)))
        self._inflight.add(handle)
        handle.on_finish.append(self._finished)
        return handle

    def _queue_first(self, handle: RequestHandle, prepared: Prepared) -> None:
        """Queue the jobs that start a task now: a full queue is a 429 for the request, not a failed job."""
        worker, loop = self.workers[prepared.model.name], asyncio.get_running_loop()
        queued: list[SampleJob] = []
        try:
            for job in prepared.first:
                job.on_progress, job.tag = handle.progress_listener(loop), handle.request_id
                queued.append(worker.submit(job))
        except Exception:
            for job in queued:
                worker.cancel(job)
            raise

    async def _run_until(self, handle: RequestHandle, prepared: Prepared, seconds: float) -> Outcome:
        try:
            async with asyncio.timeout(seconds):
                return await prepared.run(handle)  # type: ignore[no-any-return]
        except TimeoutError:
            self.metrics.deadline_expired.labels(handle.model).inc()
            raise DeadlineExceeded(f"deadline exceeded: the request did not finish within {seconds:g} s "
                                   "(its timeout_s, capped by DDIM_MAX_REQUEST_SECONDS; queueing counts)") from None

    def _finished(self, handle: RequestHandle) -> None:
        self._inflight.discard(handle)
        if handle.status == "cancelled":
            self.metrics.cancelled.labels(handle.model).inc()
        if handle.first_progress_seconds is not None:
            self.metrics.first_progress.labels(handle.model).observe(handle.first_progress_seconds)

    def health(self) -> dict[str, object]:
        """ready: every model that can load is serving (with require_all_models: every model), and at least one;
        serving: requests are taken (ready, but for require_all_models); draining: shutting down (not ready);
        error: why not ready; failed: the models that failed to load."""
        dead = sorted(name for name, w in self.workers.items() if not w.alive)
        error = self.error or (f"the worker of model(s) {', '.join(dead)} is restarting" if dead else None)
        strict = self.settings.require_all_models and self.failed
        if strict and error is None:
            error = ("DDIM_REQUIRE_ALL_MODELS is set and model(s) failed to load: "
                     + "; ".join(f"{n}: {e}" for n, e in sorted(self.failed.items())))
        serving = self.ready and not self.draining and not dead
        return {"ready": serving and not strict, "serving": serving, "draining": self.draining, "error": error,
                "models": sorted(self.models), "failed": sorted(self.failed)}

    def stats(self) -> list[dict[str, object]]:
        """Each model's info, with its waiting and active samples; a model that failed to load, with its error."""
        out: list[dict[str, object]] = []
        for name in sorted({*self.models, *self.failed}):
            if name in self.failed:
                out.append({"name": name, "status": "failed", "error": self.failed[name], "default": False})
                continue
            waiting, active = self.workers[name].load
            out.append({**self.models[name].info(), "status": "ready", "default": name == self.default_name,
                        "waiting": waiting, "active": active})
        return out

    async def drain(self, seconds: float) -> None:
        """Admit nothing more; let what is in flight finish for up to seconds, then fail what is left (503)."""
        self.draining = True
        pending = [h for h in self._inflight if not h.finished]
        if pending:
            log.info("draining: %d requests in flight, up to %g s", len(pending), seconds)
            await asyncio.wait([asyncio.ensure_future(h.result()) for h in pending], timeout=seconds)
        left = [h for h in self._inflight if not h.finished]
        for h in left:
            h.cancel(ShuttingDown("the server shut down before this request finished; submit it again"))
        if left:
            await asyncio.wait([asyncio.ensure_future(h.result()) for h in left], timeout=5)
        log.info("drained: %d finished in time, %d failed", len(pending) - len(left), len(left))


def _log_job_end(handle: RequestHandle) -> None:
    """A job's last line: succeeded, failed (with the error) or cancelled, with its queue and run seconds."""
    run = 0.0 if handle.finished_at is None or handle.started_at is None else handle.finished_at - handle.started_at
    fields: dict[str, object] = {"request_id": handle.request_id, "job_id": handle.id, "task": handle.task,
                                 "model": handle.model, "status": handle.status,
                                 "queue_seconds": round(handle.queue_seconds, 6), "run_seconds": round(run, 6)}
    if handle.status == "failed" and handle.error is not None:
        fields["error"] = str(handle.error)
    level = logging.WARNING if handle.status == "failed" else logging.INFO
    job_log.log(level, f"job {handle.status}", extra={"fields": fields})
