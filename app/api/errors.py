"""Every error is JSON {"detail": ...} naming what is wrong with which field; bad input is never a 500."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.codecs import PayloadTooLarge
from app.engine.errors import (
    DeadlineExceeded,
    EngineError,
    InvalidRequest,
    ModelFailed,
    Overloaded,
    ShuttingDown,
    UnknownModel,
)
from app.middleware import ENDPOINTS

log = logging.getLogger(__name__)


class NotReady(Exception):
    pass


class ClientGone(Exception):
    """The client disconnected before its result was ready; the job was cancelled."""


class NotAcceptable(Exception):
    def __init__(self, accept: str, offered: list[str]) -> None:
        super().__init__(f"cannot produce {accept!r}; this endpoint offers {', '.join(offered)}")


def _reject(request: Request, reason: str) -> None:
    request.app.state.metrics.rejected.labels(reason).inc()


def _name_model(request: Request, body: Any) -> None:
    """For the request's log line: the model a refused body asked for (or the default), when no route named it."""
    if getattr(request.state, "model", None):
        return
    asked = body.get("model") if isinstance(body, dict) else None
    request.state.model = asked if isinstance(asked, str) else (request.app.state.engine.default_name or "")


def error_response(status: int, detail: Any, headers: dict[str, str] | None = None,
                   request: Request | None = None) -> JSONResponse:
    """The JSON error; with request, its reason also goes to the request's log line ("field: msg; ...")."""
    if request is not None:
        request.state.reason = _reason(detail)
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _reason(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(f"{d.get('field')}: {d.get('msg')}" if isinstance(d, dict) else str(d) for d in detail)
    return str(detail)


def _field_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    out = []
    for e in exc.errors():
        if e.get("type") == "json_invalid":
            reason = (e.get("ctx") or {}).get("error", "")
            msg = f"body is not valid JSON: {reason}".strip(": ")
            out.append({"field": "body", "msg": msg, "type": "json_invalid"})
            continue
        if tuple(e.get("loc", ())) == ("body",) and e.get("type") == "missing":
            out.append({"field": "body", "msg": "the body is empty: send a JSON object", "type": "missing"})
            continue
        if tuple(e.get("loc", ())) == ("body",) and isinstance(e.get("input"), bytes):  # not parsed: not sent as JSON
            out.append({"field": "body", "msg": "the body is not a JSON object", "type": e.get("type")})
            continue
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        out.append({"field": ".".join(loc) or "body", "msg": e.get("msg", "invalid"), "type": e.get("type")})
    return out


def _json_hint(request: Request, errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The body's errors, where it was not sent as JSON (a form, say), with what to send instead."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return errors
    hint = (f"; it was sent as {media}" if media else "; it was sent without a Content-Type") + \
        ": send a JSON object with Content-Type: application/json"
    return [{**e, "msg": e["msg"] + hint} if e["field"] == "body" else e for e in errors]


def install(app: FastAPI) -> None:
    """Register the exception handlers on app."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        _reject(request, "invalid")
        _name_model(request, exc.body)
        return error_response(422, _json_hint(request, _field_errors(exc)), request=request)

    @app.exception_handler(InvalidRequest)
    async def _invalid(request: Request, exc: InvalidRequest) -> JSONResponse:
        _reject(request, "invalid")
        return error_response(422, _json_hint(request, [{"field": exc.field, "msg": str(exc), "type": "value_error"}]),
                              request=request)

    @app.exception_handler(PayloadTooLarge)
    async def _too_large(request: Request, exc: PayloadTooLarge) -> JSONResponse:
        _reject(request, "too_large")
        return error_response(413, [{"field": exc.field, "msg": str(exc), "type": "too_large"}], request=request)

    @app.exception_handler(UnknownModel)
    async def _unknown(request: Request, exc: UnknownModel) -> JSONResponse:
        _reject(request, "unknown_model")
        return error_response(404, [{"field": "model", "msg": str(exc), "type": "not_found"}], request=request)

    @app.exception_handler(ModelFailed)
    async def _model_failed(request: Request, exc: ModelFailed) -> JSONResponse:
        """424 Failed Dependency, no Retry-After: the model will not load until its folder is fixed."""
        _reject(request, "model_failed")
        request.state.model = exc.model
        return error_response(424, [{"field": "model", "msg": str(exc), "type": "model_failed"}], request=request)

    @app.exception_handler(Overloaded)
    async def _full(request: Request, exc: Overloaded) -> JSONResponse:
        _reject(request, "queue_full")
        return error_response(429, str(exc), {"Retry-After": str(max(1, round(exc.retry_after)))}, request)

    @app.exception_handler(DeadlineExceeded)
    async def _deadline(request: Request, exc: DeadlineExceeded) -> JSONResponse:
        return error_response(504, str(exc), request=request)

    @app.exception_handler(ShuttingDown)
    async def _draining(request: Request, exc: ShuttingDown) -> JSONResponse:
        _reject(request, "shutting_down")
        return error_response(503, str(exc), {"Retry-After": "5"}, request)

    @app.exception_handler(NotReady)
    async def _not_ready(request: Request, exc: NotReady) -> JSONResponse:
        if request.url.path in ENDPOINTS:  # work refused; a probe of /readyz or a look at /models is not
            _reject(request, "not_ready")
        return error_response(503, str(exc) or "models are still loading", {"Retry-After": "5"}, request)

    @app.exception_handler(NotAcceptable)
    async def _not_acceptable(request: Request, exc: NotAcceptable) -> JSONResponse:
        _reject(request, "not_acceptable")
        return error_response(406, str(exc), request=request)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> JSONResponse:
        _reject(request, "client_gone")
        return error_response(499, "client closed the request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, exc.detail, getattr(exc, "headers", None), request)

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError) -> JSONResponse:
        """The worker failed a step (it logged the traceback) and the samples it held; it goes on serving."""
        return _internal_error(request, f"{exc}; the server log has it under request id ", tag=False)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "")
        log.exception("unhandled error on %s (request id %s)", request.url.path, request_id)
        return _internal_error(request, "internal error; the server log has it under request id ", tag=True)


def _internal_error(request: Request, detail: str, tag: bool) -> JSONResponse:
    """A 500 that names its request id in the detail; tag: also in X-Request-ID, for the catch-all handler,
    whose response does not pass through the request middleware that tags every other response."""
    request_id = getattr(request.state, "request_id", "")
    return error_response(500, detail + request_id, {"x-request-id": request_id} if tag and request_id else None)
