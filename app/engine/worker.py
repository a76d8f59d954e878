"""One BatchWorker per model: admit -> one forward over the active samples -> per-sample update.

Requests with different S, eta, variance, schedules and directions share each forward, and a
new sample joins the running batch at the next step. The worker owns its queue and its thread;
callers only submit() and wait on the job's future. With priority "short-first" (app/engine/priority.py)
far shorter jobs are stepped ahead of long ones.

The worker never asks which pipeline it runs: a job's labels or texts become per-row cond tensors when it is
admitted (the model's conditioner encodes the texts of jobs admitted together in one forward, through its cache),
each forward is model.eps(x, t, cond) over the rows of one sample shape, and where the model has a codec the
final samples of the jobs finishing on a step are decoded together, on the worker's decode thread: the next
steps' forwards do not wait for a VAE (vLLM likewise keeps detokenising off its engine loop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch

from app.engine.batch import ActiveBatch, Row
from app.engine.faults import free_cached, is_out_of_memory, nonfinite_rows
from app.engine.forward import predict
from app.engine.jobs import EngineError, JobCancelled, JobResult, QueueFull, SampleJob, resolve
from app.engine.priority import SHORT_RATIO, ShortFirst
from app.engine.progress import report_progress
from app.engine.stages import Stages
from app.metrics import Metrics
from app.models import LoadedModel
from app.sampling import take_step
from app.startup.openmp import release_thread_team

log = logging.getLogger(__name__)
IDLE_RELEASE_SECONDS = 1.0  # idle this long, a worker gives its OpenMP threads back (app/startup/openmp.py)


class BatchWorker:
    """The step-level batching loop for one model, in its own thread."""

    def __init__(self, model: LoadedModel, metrics: Metrics, *, max_batch_size: int = 64,
                 max_queue: int = 1024, batching: Literal["step", "request"] = "step",
                 priority: Literal["short-first", "fifo"] = "short-first", max_defer_steps: int = 32,
                 release_idle: bool = True) -> None:
        self.model = model
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batching = batching
        self.short_first = ShortFirst(max_batch_size, max_defer_steps) \
            if priority == "short-first" and batching == "step" else None
        self.waiting: deque[Row] = deque()
        self.batch = ActiveBatch(model.device)
        self._cond = threading.Condition()
        self._stop = False
        self._cancel_pending = False
        self._thread = threading.Thread(target=self._loop, name=f"worker-{model.name}", daemon=True)
        self._step_seconds = 0.0  # moving average, for Retry-After
        self._joining = 0  # rows taken from the queue (under the lock) and not yet in the batch: still counted
        self._cpu = model.device.type == "cpu" and release_idle
        name = model.name
        self._batch_size = metrics.batch_size.labels(name)
        self._forward_seconds = metrics.forward_seconds.labels(name)
        self._sample_steps = metrics.sample_steps.labels(name)
        self._queue_wait = metrics.queue_wait.labels(name)
        self.stages = Stages(model, metrics)
        # one thread decodes the finished jobs of a latent model in order while the loop steps on
        self._decoder = None if model.codec is None else \
            ThreadPoolExecutor(1, thread_name_prefix=f"decode-{model.name}")

    # -- the interface callers see -------------------------------------------------------------
    def start(self) -> None:
        """Serve from a new thread (the engine serves from the model's own thread instead: run_here)."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def submit(self, job: SampleJob) -> SampleJob:
        """Queue a validated job; raises QueueFull past max_queue waiting + active samples."""
        with self._cond:
            load = len(self.waiting) + len(self.batch) + self._joining
            if load + job.n > self.max_queue:
                raise QueueFull(self.model.name, self.retry_after())
            job.future.set_running_or_notify_cancel()  # from now on only cancel() stops it
            job.submitted = True
            self.waiting.extend(Row(job, i) for i in range(job.n))
            self._gauges()
            self._cond.notify()
        return job

    def cancel(self, job: SampleJob) -> None:
        """Drop a job's samples at the next step boundary (e.g. its client went away)."""
        with self._cond:
            job.cancelled = True
            self._cancel_pending = True
            self._cond.notify()

    def retry_after(self) -> float:
        """A guess of when a slot frees up: one step per queued batch, at least 1 s."""
        backlog = (len(self.waiting) + len(self.batch)) / max(1, self.max_batch_size)
        return max(1.0, backlog * self._step_seconds)

    @property
    def load(self) -> tuple[int, int]:
        """(waiting, active) samples."""
        return len(self.waiting), len(self.batch)

    # -- the loop ------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Admit waiting rows into the batch (the loop does the two halves apart: _take under the lock, _join
        outside it, so that encoding prompts never holds up submit)."""
        self._join(self._take())

    def _take(self) -> list[Row]:
        """FIFO admission up to max_batch_size (request mode: only into an empty batch); short-first
        also lets short jobs past a full batch of far longer ones (see _short_overtakers). Returns the rows
        admitted, which _join conditions and adds to the batch outside the lock."""
        if self.batching == "request" and len(self.batch):
            return []
        rows: list[Row] = []
        free = self.max_batch_size - self.batch.forward_rows  # a guided sample takes two rows of a forward
        while self.waiting and free > 0:
            row = self.waiting[0]
            if self.batching == "request" and row.index == 0 and row.job.n * row.job.rows_per_sample > free and rows:
                break  # request mode admits whole requests only
            if row.job.rows_per_sample > free and (rows or len(self.batch)):
                break
            rows.append(self.waiting.popleft())
            free -= row.job.rows_per_sample
        if not rows and self.waiting and self.short_first is not None and len(self.batch):
            rows = self.short_first.overtakers(self.waiting, self.batch.forward_rows, self.batch.most_steps)
            if rows:
                chosen = {id(r) for r in rows}
                self.waiting = deque(r for r in self.waiting if id(r) not in chosen)
        now = time.monotonic()
        for r in rows:
            if r.job.first_step_at is None:
                r.job.first_step_at = now
            self._queue_wait.observe(now - r.job.submitted_at)
        self._joining = len(rows)
        return rows

    def _join(self, rows: list[Row]) -> None:
        """Condition the newly admitted jobs, then add their rows to the batch (a step boundary)."""
        try:
            failed = self.stages.condition(list({id(r.job): r.job for r in rows}.values()))
            self._fail_each(failed, "encode_error")
            self.batch.add([r for r in rows if r.job not in failed])
        finally:
            with self._cond:
                self._joining = 0

    def _drop_cancelled(self) -> None:
        """Remove cancelled jobs' samples (only scanned after a cancel() call)."""
        if not self._cancel_pending:
            return
        self._cancel_pending = False
        rows = [*self.batch.rows, *self.waiting]
        cancelled = {id(r.job): r.job for r in rows if r.job.cancelled}
        if any(r.job.cancelled for r in self.batch.rows):
            self.batch.keep(torch.tensor([not r.job.cancelled for r in self.batch.rows]))
        self.waiting = deque(r for r in self.waiting if not r.job.cancelled)
        for job in cancelled.values():
            resolve(job, error=JobCancelled(f"job {job.id} was cancelled"))

    def _rows_to_step(self) -> torch.Tensor | None:
        """The rows this forward steps: None for all of them. A forward holds at most max_batch_size rows, a
        guided sample counting two (but one sample is always stepped)."""
        b = self.batch
        alike = b.most_steps <= SHORT_RATIO * b.fewest_steps  # so every row is short: no tensor to ask
        if self.short_first is not None and alike:
            self.short_first.deferred = 0
        idx = None if self.short_first is None or alike else self.short_first.rows_to_step(b.n_steps)
        if idx is None and b.forward_rows <= self.max_batch_size:
            return None
        weights = 1 + b.guided.long() if idx is None else 1 + b.guided.index_select(0, idx).long()
        if int(weights.sum()) <= self.max_batch_size:
            return idx
        keep = max(1, int((weights.cumsum(0) <= self.max_batch_size).sum()))
        chosen = torch.arange(len(b), device=b.device) if idx is None else idx
        return chosen[:keep]

    def _predict(self, x: torch.Tensor, t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return predict(self.model, self.batch, x, t, idx)

    def step(self) -> None:
        """One forward over the chosen active samples, then each sample's own update."""
        b = self.batch
        idx = self._rows_to_step()
        x, t, clip = b.inputs(idx)
        coef = b.coefficients(idx)
        noise = b.noise(idx)
        rows = b.forward_rows if idx is None else len(x) + int(b.guided.index_select(0, idx).sum())
        started = time.perf_counter()
        try:
            out = self._forward(x, t, idx)
        except Exception as e:  # fails the rows of this forward only; the worker goes on
            self._fail_rows(idx, e)
            return
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)  # time the forward, not its launch
        forward = time.perf_counter() - started
        stepped = take_step(x, out, coef, prediction_type=self.model.prediction_type, clip_denoised=clip,
                            noise=noise)
        x_next, x0 = stepped.prev_sample, stepped.pred_original_sample
        # DPM-Solver++ / UniPC rows (solver columns exist once one joined): their own update, from their memory
        multistep = b.multistep if idx is None or b.solver_rows is None else b.multistep.index_select(0, idx)
        if b.solver_rows is not None and bool(multistep.any()):
            sub = multistep.nonzero().squeeze(1)
            solved, solved_x0 = b.multistep_step(sub if idx is None else idx.index_select(0, sub),
                                                 x.index_select(0, sub), out.index_select(0, sub))
            x_next, x0 = x_next.index_copy(0, sub, solved.to(x_next.dtype)), x0.index_copy(0, sub, solved_x0)
        bad = nonfinite_rows(x_next)
        broken = set() if bad is None else {self._row(idx, int(k)).job for k in bad.tolist()}
        report_progress(self.batch, idx, x0, None if self.model.codec is None else self.model.codec.decode)
        self._batch_size.observe(rows)
        self._forward_seconds.observe(forward)
        self._sample_steps.inc(len(x))
        self._step_seconds = 0.9 * self._step_seconds + 0.1 * (time.perf_counter() - started)
        finished = b.advance(x_next, idx)
        if broken:
            self._fail_jobs(broken, "non_finite", f"model {self.model.name!r} produced non-finite values (NaN or "
                                                  "inf) in this request's samples; the model or its weights are broken")
        self._gauges()  # before any result is out, so a client never reads a stale gauge
        done = []
        for row in finished:
            row.job.remaining -= 1
            if row.job.remaining == 0 and row.job not in broken:
                done.append(row.job)
        latent = [j for j in done if j.decode]
        self._finish([j for j in done if not j.decode])
        if latent and self._decoder is not None:
            self._decoder.submit(self._decode_and_finish, latent)
        elif latent:
            self._decode_and_finish(latent)

    def _decode_and_finish(self, jobs: list[SampleJob]) -> None:
        """Decode finished latent jobs together and settle them (on the decode thread: never touches the batch)."""
        failed = self.stages.decode(jobs)
        for job, message in failed.items():
            self.metrics.failures.labels(self.model.name, "decode_error").inc()
            log.error("%s; failing request %s", message, job.tag or job.id)
            resolve(job, error=EngineError(message))
        self._finish([j for j in jobs if j not in failed])

    @staticmethod
    def _finish(jobs: list[SampleJob]) -> None:
        for job in jobs:
            now = time.monotonic()
            first = job.first_step_at or now
            resolve(job, result=JobResult(job.out, first - job.submitted_at, now - first))

    def _row(self, idx: torch.Tensor | None, k: int) -> Row:
        return self.batch.rows[k if idx is None else int(idx[k])]

    def _forward(self, x: torch.Tensor, t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """The forward of rows idx; out of memory, it is retried once in two halves."""
        try:
            return self._predict(x, t, idx)
        except Exception as e:
            if not is_out_of_memory(e) or len(x) < 2:
                raise
            log.warning("model %s ran out of memory on a forward of %d samples; retrying in two halves",
                        self.model.name, len(x))
            self.metrics.failures.labels(self.model.name, "out_of_memory_retry").inc()
            free_cached(self.model.device)
            sel, h = torch.arange(len(self.batch), device=self.batch.device) if idx is None else idx, len(x) // 2
            return torch.cat([self._predict(x[:h], t[:h], sel[:h]), self._predict(x[h:], t[h:], sel[h:])])

    def _fail_rows(self, idx: torch.Tensor | None, error: BaseException) -> None:
        """A forward raised: fail the requests whose rows it held."""
        jobs = {r.job for r in (self.batch.rows if idx is None else [self.batch.rows[i] for i in idx.tolist()])}
        log.error("the forward of model %s failed (%s: %s)", self.model.name, type(error).__name__, error,
                  exc_info=error)
        self._fail_jobs(jobs, "forward_error", f"the forward of model {self.model.name!r} failed "
                                               f"({type(error).__name__}: {error})")

    def _fail_jobs(self, jobs: set[SampleJob], cause: str, message: str) -> None:
        """Fail these jobs (one log line and one count each) and drop their samples; the others go on."""
        for job in jobs:
            self.metrics.failures.labels(self.model.name, cause).inc()
            log.error("%s; failing request %s", message, job.tag or job.id)
            resolve(job, error=EngineError(message))
        self.batch.keep(torch.tensor([r.job not in jobs for r in self.batch.rows], dtype=torch.bool))
        with self._cond:
            self.waiting = deque(r for r in self.waiting if r.job not in jobs)
        self._gauges()

    def _fail_each(self, failed: dict[SampleJob, str], cause: str) -> None:
        for job, message in failed.items():
            self._fail_jobs({job}, cause, message)

    def _fail_active(self, error: BaseException) -> None:
        for job in {id(r.job): r.job for r in self.batch.rows}.values():
            resolve(job, error=error)
        self.batch.keep(torch.zeros(len(self.batch), dtype=torch.bool))

    def _gauges(self) -> None:
        self.metrics.queue_depth.labels(self.model.name).set(len(self.waiting))
        self.metrics.active_samples.labels(self.model.name).set(len(self.batch))

    @property
    def alive(self) -> bool:
        """The worker's thread is serving (or was never started); False once it died, or was stopped."""
        return not self._stop and (self._thread.ident is None or self._thread.is_alive())

    def restart(self) -> None:
        """After the worker's thread died: fail the requests it held in its batch (their state is lost), keep the
        waiting ones, and serve from a new thread."""
        self.metrics.failures.labels(self.model.name, "worker_restart").inc()
        log.error("the worker thread of model %s died; restarting it, failing its %d active samples",
                  self.model.name, len(self.batch))
        self._fail_active(EngineError(f"the worker of model {self.model.name!r} failed and was restarted while "
                                      "this request ran; submit it again"))
        self._thread = threading.Thread(target=self.run_here, name=f"worker-{self.model.name}", daemon=True)
        self._thread.start()

    def run_here(self) -> None:
        """Serve from the calling thread, which becomes this worker's thread, until stop(). The engine
        loads, warms up and serves each model from one thread: with OpenMP, each thread that runs torch
        work keeps a thread team of its own, so a separate loading thread would leave a second one behind."""
        self._thread = threading.current_thread()
        self._loop()

    def _loop(self) -> None:
        released = False  # this thread's OpenMP team was given back while idle (app/startup/openmp.py)
        while True:
            try:
                with self._cond:
                    while not self._stop and not self.waiting and not len(self.batch):
                        idle = not self._cond.wait(None if released or not self._cpu else IDLE_RELEASE_SECONDS)
                        if idle and not self.waiting and not len(self.batch):
                            released = release_thread_team() or True
                    released = False
                    if self._stop:
                        break
                    self._drop_cancelled()
                    rows = self._take()
                self._join(rows)
                self._gauges()
                if len(self.batch):
                    self.step()
            except Exception as e:  # a failed step fails the samples it held, never the worker
                log.exception("step failed on model %s; failing %d active samples", self.model.name, len(self.batch))
                self._fail_active(EngineError(f"sampling failed on model {self.model.name!r}: {e}"))
                self._gauges()
        if self._decoder is not None:
            self._decoder.shutdown(wait=True)  # the jobs that finished their steps get their images
        with self._cond:
            pending, self.waiting = list(self.waiting), deque()
        error = EngineError("the server is shutting down")
        for r in pending:  # outside the lock: a future's callbacks run here and may submit again
            resolve(r.job, error=error)
        self._fail_active(error)

