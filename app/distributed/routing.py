"""ASGI middleware of a replica: X-Replica-ID on every response, and jobs that answer through any replica.

A job lives on the replica that runs it (its owner). On creation (a 202 from POST /jobs/...) the owner registers it
in the job directory; a GET or DELETE of /jobs/{id}[/result|/events] that reaches another replica is forwarded, as
it came, to the owner's internal HTTP port, and the owner's answer (its status, headers and body, streamed) goes back
unchanged. When the owner is gone (it died, or was stopped), the job has failed, and the answer says so.
Nothing here imports Ray: the directory is any object with the JobDirectory's async methods.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, Protocol

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

JOB_PATH = re.compile(r"^/jobs/([0-9A-Za-z_-]{1,64})(/result|/events)?$")
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"host", b"content-length",
              b"proxy-connection", b"te", b"trailer"}


class Directory(Protocol):
    """The job directory as a replica sees it (app/distributed/directory.py)."""

    async def register(self, job_id: str, entry: dict[str, Any]) -> None: ...

    async def lookup(self, job_id: str) -> dict[str, Any] | None: ...


class ReplicaHeader:
    """X-Replica-ID: the replica that computed the response (a forwarded response keeps its owner's). X-Request-ID
    is left to Serve's proxy, which sets it (the client's, else its own, which the app was given) on every response."""

    def __init__(self, app: ASGIApp, replica_id: str) -> None:
        self.app, self.header = app, (b"x-replica-id", replica_id.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                if not any(k.lower() == b"x-replica-id" for k, _ in headers):
                    headers.append(self.header)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_tagged)


class JobRouter:
    """Registers new jobs in the directory; forwards reads and cancels of another replica's job to it."""

    def __init__(self, app: ASGIApp, directory: Directory, replica_id: str, address: str) -> None:
        self.app, self.directory, self.replica_id, self.address = app, directory, replica_id, address
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0, read=None))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if method == "POST" and path.startswith("/jobs/"):
            await self.app(scope, receive, self._registering(send))
            return
        match = JOB_PATH.match(path)
        if match and method in ("GET", "DELETE"):
            entry = await self.directory.lookup(match.group(1))
            if entry is not None and entry["replica"] != self.replica_id:
                await self._forward(entry, match.group(2) or "", scope, send)
                return
        await self.app(scope, receive, send)

    def _registering(self, send: Send) -> Send:
        """A send that registers the job of a 202 before the client hears of it, so any replica can then find it."""
        held: list[Message] = []
        body = bytearray()

        async def send_registering(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 202:
                held.append(message)
                return
            if held and message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if message.get("more_body", False):
                    return
                state = json.loads(bytes(body))
                await self.directory.register(state["id"], {"replica": self.replica_id, "address": self.address,
                                                            "state": state})
                await send(held.pop())
                await send({"type": "http.response.body", "body": bytes(body)})
                return
            await send(message)

        return send_registering

    async def _forward(self, entry: dict[str, Any], tail: str, scope: Scope, send: Send) -> None:
        url = f"http://{entry['address']}{scope['path']}"
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in HOP_BY_HOP]
        try:
            response = await self.client.send(self.client.build_request(scope["method"], url, headers=headers),
                                              stream=True)
        except httpx.TransportError as e:
            log.info("job %s: its replica %s is unreachable (%s)", entry["state"]["id"], entry["replica"], e)
            await _owner_gone(entry, tail, scope["method"], send)
            return
        try:
            if response.headers.get("x-replica-id") != entry["replica"]:  # another process on the owner's port
                await _owner_gone(entry, tail, scope["method"], send)
                return
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [*out, (b"x-served-via", self.replica_id.encode())]})
            try:
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.TransportError:
                if tail == "/events":  # the owner died mid-stream: the stream ends as a failed job's does
                    await send({"type": "http.response.body", "body": _error_event(_gone_detail(entry)),
                                "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


def _gone_detail(entry: dict[str, Any]) -> str:
    return (f"job {entry['state']['id']} failed: replica {entry['replica']}, which ran it, is gone (it died or was "
            "stopped); submit the job again")


def _error_event(detail: str) -> bytes:
    return f"event: error\ndata: {json.dumps({'status': 503, 'detail': detail})}\n\n".encode()


async def _owner_gone(entry: dict[str, Any], tail: str, method: str, send: Send) -> None:
    """The answer for a job whose replica is gone: failed, with an error that says so."""
    detail = _gone_detail(entry)
    if tail == "/events":
        status, media, body = 200, b"text/event-stream", _error_event(detail)
    elif tail == "/result" and method == "GET":
        status, media, body = 503, b"application/json", json.dumps({"detail": detail}).encode()
    else:
        state = {**entry["state"], "status": "failed", "finished_at": time.time(),
                 "error": {"status": 503, "detail": detail}}
        status, media, body = 200, b"application/json", json.dumps(state).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
