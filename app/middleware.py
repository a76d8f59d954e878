"""ASGI middleware: the body-size limit, and per-request id, metrics and one JSON log line."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics

log = logging.getLogger("ddim.request")
ENDPOINTS = {"/generate", "/invert", "/interpolate", "/edit"}


class RequestMiddleware:
    """Caps the body (413), tags the request id, records ddim_request_duration_seconds, logs a line."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id  # for the 500 handler, whose response bypasses this middleware
        started = time.monotonic()
        status = {"code": 500}
        path = scope.get("path", "")

        async def send_tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self._handle(scope, receive, send_tagged, headers)
        finally:
            if path in ENDPOINTS or path.startswith("/jobs") or path.startswith("/v1/"):
                self._record(scope.get("method", ""), path, state, status["code"], request_id,
                             time.monotonic() - started)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        length = headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            await self._too_large(send)
            return
        received, rejected = 0, False

        async def receive_capped() -> Message:
            nonlocal received, rejected
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body and not rejected:
                    rejected = True  # answer 413 now; the app sees a disconnect and its reply is dropped
                    await self._too_large(send)
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_rejected(message: Message) -> None:
            if not rejected:
                await send(message)

        await self.app(scope, receive_capped, send_unless_rejected)

    async def _too_large(self, send: Send) -> None:
        self.metrics.rejected.labels("too_large").inc()
        body = b'{"detail":[{"field":"body","msg":"request body exceeds %d bytes","type":"too_large"}]}' % self.max_body
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _record(self, method: str, path: str, state: dict[str, Any], status: int, request_id: str,
                seconds: float) -> None:
        """The request's metric (the work endpoints) and its log line: method, path, model, status, and for an error
        its reason (the field and the message, set by the error handlers)."""
        model = state.get("model", "")
        if path in ENDPOINTS:
            self.metrics.request_duration.labels(path.strip("/"), model, str(status)).observe(seconds)
        fields = {"request_id": request_id, "method": method, "endpoint": path, "model": model,
                  "key_id": state.get("key_id"), **state.get("params", {}),
                  "status": status, "queue_seconds": round(state.get("queue_seconds", 0.0), 6),
                  "total_seconds": round(seconds, 6)}
        if status >= 400 and state.get("reason"):
            fields["reason"] = state["reason"]
        log.log(logging.WARNING if status >= 500 else logging.INFO, "request", extra={"fields": fields})
