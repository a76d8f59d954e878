"""Middleware for Serve's HTTP proxy: a seeded, idempotent synchronous request whose replica died is sent again,
and Serve's own errors are JSON {"detail": ...} as the app's are.

Serve answers a request whose replica died with its own 5xx, one that no replica sent (no X-Replica-ID). Such a
request is retried, up to RETRIES times, when sending it again gives the same answer: /generate with a seed or x_T
(the seed contract: the same images on any replica), /invert and /interpolate (deterministic), /edit at eta = 0 or
with a seed, never an event stream.
The retried answer carries X-Retries. Loaded into the proxy by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=
app.distributed.proxy:middlewares, which ddim-serve-ray sets on the Serve controller (and so on its proxies).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)
RETRIES = 2
IDEMPOTENT = {"/invert", "/interpolate"}


def middlewares() -> list[Middleware]:
    return [Middleware(RetryOnReplicaDeath)]


def _retryable(scope: Scope, body: bytes) -> bool:
    if scope.get("method") != "POST":
        return False
    headers = {k.lower(): v for k, v in scope.get("headers", [])}
    if b"text/event-stream" in headers.get(b"accept", b""):
        return False
    if scope.get("path") in IDEMPOTENT:
        return True
    if scope.get("path") not in ("/generate", "/edit"):
        return False
    try:
        data: Any = json.loads(body)
    except ValueError:  # an /edit upload: deterministic unless it sets eta (whose noise a seed may not fix)
        multipart = b"multipart/form-data" in headers.get(b"content-type", b"")
        return scope.get("path") == "/edit" and multipart and b'name="eta"' not in body
    if not isinstance(data, dict):
        return False
    if scope.get("path") == "/edit":  # deterministic at eta = 0 (the default), or seeded
        return not data.get("eta") or data.get("seed") is not None
    return data.get("seed") is not None or data.get("x_T") is not None


def json_errors(send: Send) -> Send:
    """Serve's own error answers (429 backpressure, 503, 408: no replica sent them) as the API's JSON {detail}."""
    held: list[Message] = []
    body = bytearray()

    async def send_json(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            if int(message["status"]) >= 400 and not any(k.lower() == b"x-replica-id" for k, _ in headers):
                held.append(message)
                return
        elif held:
            body.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            data = json.dumps({"detail": bytes(body).decode("utf-8", "replace")}).encode()
            keep = [(k, v) for k, v in held[0].get("headers", []) if k.lower() not in (b"content-type",
                                                                                       b"content-length")]
            await send({**held.pop(), "headers": [*keep, (b"content-type", b"application/json"),
                                                  (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})
            return
        await send(message)

    return send_json


class RetryOnReplicaDeath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = json_errors(send)
        if scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        retryable = _retryable(scope, body)
        held: list[Message] = []

        async def hold(message: Message) -> None:
            held.append(message)

        for attempt in range(RETRIES + 1 if retryable else 1):
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # the disconnect, when it comes

            if not retryable:
                await self.app(scope, replay, send)
                return
            held.clear()
            await self.app(scope, replay, hold)
            start: Message = held[0] if held else {"type": "http.response.start", "status": 502, "headers": []}
            headers: list[tuple[bytes, bytes]] = list(start.get("headers", []))
            orphan = int(start["status"]) >= 500 and not any(k.lower() == b"x-replica-id" for k, _ in headers)
            if not orphan or attempt == RETRIES:
                if attempt:
                    start = {**start, "headers": [*headers, (b"x-retries", str(attempt).encode())]}
                    held[:1] = [start]
                for message in held or [start, {"type": "http.response.body", "body": b""}]:
                    await send(message)
                return
            log.warning("%s: its replica failed (%d, no X-Replica-ID); retrying (%d of %d)", scope.get("path"),
                        start["status"], attempt + 1, RETRIES)
