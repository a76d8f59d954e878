"""The synchronous client: Client and its Job."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from ddim_client import wire
from ddim_client.errors import ConnectionFailed
from ddim_client.wire import Event, ImageLike, Result, RetryPolicy

log = logging.getLogger("ddim_client")
SSE, JSON = "text/event-stream", "application/json"
DEFAULT_URL, DEFAULT_TIMEOUT = "http://127.0.0.1:8000", 300.0
ProgressFn = Callable[[Event], Any]


def headers(api_key: str | None) -> dict[str, str]:
    out = {"user-agent": "ddim-serve-client/0.1.0", "accept": JSON}
    if api_key:
        out["authorization"] = f"Bearer {api_key}"
    return out


class Client:
    """A ddim-serve server. Every method raises a typed error (ddim_client.errors) carrying the server's detail;
    429 and 503 are retried `retries` times, each after the server's Retry-After (at most `max_retry_wait` s)."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = 3, max_retry_wait: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = RetryPolicy(retries, max_retry_wait)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers(api_key))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- the API -----------------------------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        """GET /models: each model's name, kind, image size, schedules, classes..."""
        return self._json("GET", "/models")["models"]

    def generate(self, *, on_progress: ProgressFn | None = None, **fields: Any) -> Result:
        """POST /generate with fields (n, steps, eta, seed, ...); on_progress(event) streams progress. img2img:
        image= (a PIL image, path, bytes or array) and strength= in (0, 1] (default 0.8)."""
        return self._run("generate", fields, on_progress)

    def edit(self, images: ImageLike | list[ImageLike], *, on_progress: ProgressFn | None = None,
             **fields: Any) -> Result:
        """POST /edit: invert images under source_prompt / source_class_label for k = int(steps x strength) steps,
        then generate them back under prompt / class_label; .images are the edits, .x_T the level-t_k latents
        (with return_latents)."""
        return self._run("edit", {**fields, "images": images}, on_progress)

    def invert(self, images: ImageLike | list[ImageLike], *, on_progress: ProgressFn | None = None,
               **fields: Any) -> Result:
        """POST /invert: images are PIL images, paths, bytes or arrays (one, or a list); .x_T is the latent."""
        return self._run("invert", {**fields, "images": images}, on_progress)

    def interpolate(self, start: Any, end: Any, *, on_progress: ProgressFn | None = None, **fields: Any) -> Result:
        """POST /interpolate between two ends, each a seed (int), an image, or an x_T array (1, C, H, W)."""
        return self._run("interpolate", {**fields, "start": start, "end": end}, on_progress)

    def submit(self, task: str, **fields: Any) -> Job:
        """POST /jobs/{task} (generate, invert, interpolate or edit): a Job, answered at once."""
        state = self._json("POST", f"/jobs/{task}", json=wire.body(task, fields))
        return Job(self, state["id"], task)

    def job(self, job_id: str, task: str = "") -> Job:
        """A job submitted earlier, by id."""
        return Job(self, job_id, task)

    # -- plumbing ------------------------------------------------------------------------------------
    def _run(self, task: str, fields: dict[str, Any], on_progress: ProgressFn | None) -> Result:
        body = wire.body(task, fields)
        if on_progress is None:
            return Result.from_json(self._json("POST", f"/{task}", json=body))
        for event in self._events("POST", f"/{task}", json=body):
            if event.final:
                return event.outcome()
            on_progress(event)
        raise ConnectionFailed(f"the event stream of {task} ended without a result")

    def _json(self, method: str, path: str, json: Any = None) -> Any:
        response = self._send(method, path, json=json)
        try:
            return response.json()
        finally:
            response.close()

    def _events(self, method: str, path: str, json: Any = None, job: str = "") -> Iterator[Event]:
        response = self._send(method, path, json=json, headers={"accept": SSE}, stream=True)
        try:
            for kind, data in wire.sse(response.iter_lines()):
                yield Event.from_sse(kind, data, job)
        except httpx.TransportError as e:
            raise ConnectionFailed(f"the event stream from {self.base_url} broke: {e}") from e
        finally:
            response.close()

    def _send(self, method: str, path: str, *, json: Any = None, headers: dict[str, str] | None = None,
              stream: bool = False) -> httpx.Response:
        """One request, retried on 429/503 as the policy says; an error answer raises its typed error."""
        attempt = 0
        while True:
            try:
                request = self._http.build_request(method, path, json=json, headers=headers)
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                raise ConnectionFailed(f"cannot reach {self.base_url}: {e}") from e
            wait = self.retry.wait(response.status_code, response.headers, attempt)
            if wait is None:
                break
            response.close()
            log.info("%s %s: %d, retrying in %.1f s", method, path, response.status_code, wait)
            time.sleep(wait)
            attempt += 1
        if response.is_error:
            content = response.read()
            response.close()
            raise wire.error_from(response.status_code, content, response.headers)
        return response


class Job:
    """A job on the server: its state, its events, its result, its cancel."""

    def __init__(self, client: Client, job_id: str, task: str) -> None:
        self.client, self.id, self.task = client, job_id, task

    def __repr__(self) -> str:
        return f"Job({self.id!r}, task={self.task!r})"

    def state(self) -> dict[str, Any]:
        """GET /jobs/{id}: {id, task, model, status, progress: {step, steps}, created_at, ..., error?}."""
        return self.client._json("GET", f"/jobs/{self.id}")

    def status(self) -> str:
        """queued, running, succeeded, failed or cancelled."""
        return str(self.state()["status"])

    def events(self) -> Iterator[Event]:
        """Progress (with decoded previews when submitted with preview_every), then one final event."""
        return self.client._events("GET", f"/jobs/{self.id}/events", job=f"job {self.id}")

    def result(self) -> Result:
        """Waits for the job; its Result, or the typed error that failed it (JobCancelled if cancelled)."""
        for event in self.events():
            if event.final:
                return event.outcome()
        raise ConnectionFailed(f"the event stream of job {self.id} ended without a result")

    def cancel(self) -> dict[str, Any]:
        """DELETE /jobs/{id}: the job's state after the cancel (a finished job is left as it is)."""
        return self.client._json("DELETE", f"/jobs/{self.id}")
