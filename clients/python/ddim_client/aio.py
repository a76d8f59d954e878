"""The asynchronous client: AsyncClient and its AsyncJob, with the methods of Client and Job, awaited."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import httpx

from ddim_client import wire
from ddim_client.client import DEFAULT_TIMEOUT, DEFAULT_URL, SSE, ProgressFn, headers, log
from ddim_client.errors import ConnectionFailed
from ddim_client.wire import Event, ImageLike, Result, RetryPolicy


class AsyncClient:
    """Client, for asyncio: `async with AsyncClient(url) as c: result = await c.generate(n=4)`.
    on_progress may be a plain function or a coroutine function."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = 3, max_retry_wait: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = RetryPolicy(retries, max_retry_wait)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, headers=headers(api_key))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the API -----------------------------------------------------------------------------------
    async def models(self) -> list[dict[str, Any]]:
        return (await self._json("GET", "/models"))["models"]

    async def generate(self, *, on_progress: ProgressFn | None = None, **fields: Any) -> Result:
        return await self._run("generate", fields, on_progress)

    async def invert(self, images: ImageLike | list[ImageLike], *, on_progress: ProgressFn | None = None,
                     **fields: Any) -> Result:
        return await self._run("invert", {**fields, "images": images}, on_progress)

    async def edit(self, images: ImageLike | list[ImageLike], *, on_progress: ProgressFn | None = None,
                   **fields: Any) -> Result:
        return await self._run("edit", {**fields, "images": images}, on_progress)

    async def interpolate(self, start: Any, end: Any, *, on_progress: ProgressFn | None = None,
                          **fields: Any) -> Result:
        return await self._run("interpolate", {**fields, "start": start, "end": end}, on_progress)

    async def submit(self, task: str, **fields: Any) -> AsyncJob:
        state = await self._json("POST", f"/jobs/{task}", json=wire.body(task, fields))
        return AsyncJob(self, state["id"], task)

    def job(self, job_id: str, task: str = "") -> AsyncJob:
        return AsyncJob(self, job_id, task)

    # -- plumbing ------------------------------------------------------------------------------------
    async def _run(self, task: str, fields: dict[str, Any], on_progress: ProgressFn | None) -> Result:
        body = wire.body(task, fields)
        if on_progress is None:
            return Result.from_json(await self._json("POST", f"/{task}", json=body))
        async with aclosing(self._events("POST", f"/{task}", json=body)) as events:
            async for event in events:
                if event.final:
                    return event.outcome()
                called = on_progress(event)
                if inspect.isawaitable(called):
                    await called
        raise ConnectionFailed(f"the event stream of {task} ended without a result")

    async def _json(self, method: str, path: str, json: Any = None) -> Any:
        response = await self._send(method, path, json=json)
        try:
            return response.json()
        finally:
            await response.aclose()

    async def _events(self, method: str, path: str, json: Any = None, job: str = "") -> AsyncIterator[Event]:
        response = await self._send(method, path, json=json, headers={"accept": SSE}, stream=True)
        decoder = wire.SSEDecoder()
        try:
            async for line in response.aiter_lines():
                sse = decoder.feed(line)
                if sse is not None:
                    yield Event.from_sse(*sse, job)
        except httpx.TransportError as e:
            raise ConnectionFailed(f"the event stream from {self.base_url} broke: {e}") from e
        finally:
            await response.aclose()

    async def _send(self, method: str, path: str, *, json: Any = None, headers: dict[str, str] | None = None,
                    stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            try:
                request = self._http.build_request(method, path, json=json, headers=headers)
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                raise ConnectionFailed(f"cannot reach {self.base_url}: {e}") from e
            wait = self.retry.wait(response.status_code, response.headers, attempt)
            if wait is None:
                break
            await response.aclose()
            log.info("%s %s: %d, retrying in %.1f s", method, path, response.status_code, wait)
            await asyncio.sleep(wait)
            attempt += 1
        if response.is_error:
            content = await response.aread()
            await response.aclose()
            raise wire.error_from(response.status_code, content, response.headers)
        return response


class AsyncJob:
    """Job, for asyncio."""

    def __init__(self, client: AsyncClient, job_id: str, task: str) -> None:
        self.client, self.id, self.task = client, job_id, task

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r}, task={self.task!r})"

    async def state(self) -> dict[str, Any]:
        return await self.client._json("GET", f"/jobs/{self.id}")

    async def status(self) -> str:
        return str((await self.state())["status"])

    def events(self) -> AsyncIterator[Event]:
        return self.client._events("GET", f"/jobs/{self.id}/events", job=f"job {self.id}")

    async def result(self) -> Result:
        async with aclosing(self.events()) as events:
            async for event in events:
                if event.final:
                    return event.outcome()
        raise ConnectionFailed(f"the event stream of job {self.id} ended without a result")

    async def cancel(self) -> dict[str, Any]:
        return await self.client._json("DELETE", f"/jobs/{self.id}")
