"""A submitted request: its state, its event stream, its result and its cancel.

The synchronous routes, the job routes and the event-stream routes are three ways to read one handle.
Events go to any number of subscribers; a late subscriber first gets the current state, then what follows.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from app.engine.errors import (
    DeadlineExceeded,
    InvalidRequest,
    JobCancelled,
    ModelFailed,
    Overloaded,
    ShuttingDown,
    UnknownModel,
)

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED: tuple[Status, ...] = ("succeeded", "failed", "cancelled")


@dataclass
class Outcome:
    """What a task returns: the echo of its parameters and its tensors (x_T, x_0, frames, reconstruction...)."""

    fields: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class Event:
    """progress ({step, steps, at}, maybe a preview), result (the outcome), error ({status, detail}), cancelled."""

    kind: Literal["progress", "result", "error", "cancelled"]
    data: dict[str, Any]
    preview: torch.Tensor | None = None
    outcome: Outcome | None = None


def error_status(error: BaseException) -> int:
    """The HTTP status an engine error maps to."""
    for kind, status in ((InvalidRequest, 422), (UnknownModel, 404), (ModelFailed, 424), (Overloaded, 429),
                         (DeadlineExceeded, 504), (ShuttingDown, 503)):
        if isinstance(error, kind):
            return status
    return 500


@dataclass(eq=False)
class RequestHandle:
    """One request in the engine. Created by Engine.submit; read from the event loop's thread only (but for
    _stepped, which the worker's thread writes)."""

    task: str
    model: str
    steps: int
    deadline: float | None = None  # time.monotonic()
    owner: str | None = None
    request_id: str = ""
    id: str = field(default_factory=lambda: secrets.token_hex(16))  # 128 random bits
    status: Status = "queued"
    step: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: BaseException | None = None
    outcome: Outcome | None = None
    queue_seconds: float = 0.0
    on_finish: list[Callable[[RequestHandle], None]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # the caller's own (e.g. how the API renders the result)

    def __post_init__(self) -> None:
        self._subscribers: list[asyncio.Queue[Event]] = []
        self._done = asyncio.Event()
        self._runner: asyncio.Task[Outcome] | None = None
        self._first_progress: float | None = None
        self._submitted = time.monotonic()
        self._stepped = 0  # the worker's latest step count, written from its thread (an int: one atomic store)

    # -- reading ------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def state(self) -> dict[str, Any]:
        """{id, task, status, progress, created_at, started_at?, finished_at?, error?} (JSON-ready)."""
        out: dict[str, Any] = {"id": self.id, "task": self.task, "model": self.model, "status": self.status,
                               "progress": {"step": self.current_step, "steps": self.steps},
                               "created_at": self.created_at}
        if self.started_at is not None:
            out["started_at"] = self.started_at
        if self.finished_at is not None:
            out["finished_at"] = self.finished_at
        if self.error is not None and self.status == "failed":
            out["error"] = {"status": error_status(self.error), "detail": str(self.error)}
        return out

    async def result(self) -> Outcome:
        """The outcome; raises the error that failed (or cancelled) the request."""
        await self._done.wait()
        if self.outcome is None:
            raise self.error or JobCancelled(f"request {self.id} was cancelled")
        return self.outcome

    def events(self) -> AsyncIterator[Event]:
        """The current state first, then every event until (and with) the final one. The subscription starts when
        this is called, not at the first iteration: a stream opened right after submit misses no preview."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.append(queue)
        return self._stream_events(queue)

    async def _stream_events(self, queue: asyncio.Queue[Event]) -> AsyncIterator[Event]:
        try:
            yield self._progress_event()
            if self.finished:
                yield self._final_event()
                return
            while True:
                event = await queue.get()
                yield event
                if event.kind != "progress":
                    return
        finally:
            self._subscribers.remove(queue)

    # -- driving (the engine) -----------------------------------------------------------------
    def start(self, runner: asyncio.Task[Outcome]) -> None:
        self._runner = runner
        runner.add_done_callback(self._finish)

    @property
    def current_step(self) -> int:
        """Steps done: what the loop has published, or the worker's later count where nobody listens."""
        return max(self.step, self._stepped)

    def progress_listener(self, loop: asyncio.AbstractEventLoop, offset: int = 0
                          ) -> Callable[[int, torch.Tensor | None], None]:
        """A SampleJob.on_progress for one phase of this request, whose steps count from offset; thread-safe.

        It wakes the event loop only when there is something to do there: a preview, an event stream to feed, or
        the request's start. Otherwise it just records the count, which state() reads: a plain /generate costs the
        loop one wake-up, not one per step (at 8 requests x 87 steps/s that was 700 a second beside the worker)."""
        def listener(done: int, preview: torch.Tensor | None) -> None:
            self._stepped = offset + done
            if preview is not None or self._subscribers or self.status == "queued":
                loop.call_soon_threadsafe(self._on_progress, offset + done, preview, time.time())
        return listener

    def _on_progress(self, step: int, preview: torch.Tensor | None, at: float) -> None:
        if self.finished or (step <= self.step and preview is None):
            return
        if self.status == "queued":
            self.status, self.started_at = "running", at
        if self._first_progress is None:
            self._first_progress = time.monotonic() - self._submitted
        self.step = max(self.step, step)
        self._publish(Event("progress", {"step": self.step, "steps": self.steps, "at": at}, preview=preview))

    @property
    def first_progress_seconds(self) -> float | None:
        return self._first_progress

    def cancel(self, error: BaseException | None = None) -> bool:
        """Stop the request: its samples leave the batch at the next step. False when it had already finished."""
        if self.finished or self._runner is None:
            return False
        self._cancel_error = error
        self._runner.cancel()
        return True

    def _finish(self, runner: asyncio.Task[Outcome]) -> None:
        self.finished_at = time.time()
        if runner.cancelled():
            error = getattr(self, "_cancel_error", None)
            self.status, self.error = ("cancelled", None) if error is None else ("failed", error)
        elif runner.exception() is not None:
            self.status, self.error = "failed", runner.exception()
        else:
            self.status, self.outcome, self.step = "succeeded", runner.result(), self.steps
        self._done.set()
        self._publish(self._final_event())
        for callback in self.on_finish:
            callback(self)

    def _progress_event(self) -> Event:
        return Event("progress", {"step": self.current_step, "steps": self.steps, "at": time.time()})

    def _final_event(self) -> Event:
        if self.status == "succeeded":
            return Event("result", {}, outcome=self.outcome)
        if self.status == "cancelled":
            return Event("cancelled", {"id": self.id})
        assert self.error is not None
        return Event("error", {"status": error_status(self.error), "detail": str(self.error)})

    def _publish(self, event: Event) -> None:
        for q in self._subscribers:
            q.put_nowait(event)
