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
from app.engine.errors import DeadlineExceeded, ModelFailed, ShuttingDown, UnknownModel
from app.engine.handle import Outcome, RequestHandle
from app.engine.jobs import JobResult, SampleJob
from app.engine.jobspec import JobSpec
from app.engine.jobstore import JobStore
from app.engine.tasks import Prepared, Work, prepare
from app.engine.worker import BatchWorker
from app.metrics import Metrics
from app.models import LoadedModel, ModelStoreError, check_folder, discover, load_model, pick_device
from app.startup import layouts_for, tune_process, warm_up

log = logging.getLogger(__name__)
job_log = logging.getLogger("ddim.jobs")


class Engine(JobSpec):
    """All models and their workers. Created in create_app, started by the lifespan; validated jobs come from JobSpec
    (app/engine/jobspec.py)."""

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
                               channels_last=channels_last, prompt_cache_size=s.prompt_cache_size, trace=s.trace)
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
