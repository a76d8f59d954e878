"""Typed errors. Each carries the server's `detail` (a string, or a list of {field, msg}) and the HTTP status."""

from __future__ import annotations

from typing import Any


class DDIMError(Exception):
    """Base class of every error this client raises."""


class ConnectionFailed(DDIMError):
    """The server could not be reached, or the connection broke before an answer."""


class APIError(DDIMError):
    """The server answered with an error. `detail` is its JSON detail; `status` the HTTP status."""

    status: int = 0
    what = "the server answered with an error"

    def __init__(self, detail: Any, status: int | None = None, retry_after: float | None = None) -> None:
        self.detail = detail
        self.status = status if status is not None else type(self).status
        self.retry_after = retry_after
        super().__init__(f"{self.what}: {describe(detail)}")

    @property
    def fields(self) -> dict[str, str]:
        """{field: message} of a detail that names fields (422, 413, 404 on the model); else {}."""
        if not isinstance(self.detail, list):
            return {}
        return {str(d.get("field", "")): str(d.get("msg", "")) for d in self.detail if isinstance(d, dict)}


class InvalidRequest(APIError):
    status, what = 422, "invalid request"


class NotFound(APIError):
    status, what = 404, "not found"


class NotAcceptable(APIError):
    status, what = 406, "the server cannot give this media type"


class Conflict(APIError):
    """A job's result asked for while it runs, or after it was cancelled."""

    status, what = 409, "not available"


class PayloadTooLarge(APIError):
    status, what = 413, "too large"


class ModelFailed(APIError):
    """The model failed to load on the server; the detail quotes its load error. Retrying will not help."""

    status, what = 424, "the model failed to load"


class Overloaded(APIError):
    """The model's queue (or the job store) is full; `retry_after` is the server's advice in seconds."""

    status, what = 429, "the server is busy"


class Unavailable(APIError):
    """The server is loading its models or shutting down."""

    status, what = 503, "the server is not ready"


class DeadlineExceeded(APIError):
    status, what = 504, "deadline exceeded"


class ServerError(APIError):
    status, what = 500, "the server failed"


class JobCancelled(APIError):
    """The job (or streamed request) was cancelled before it finished."""

    status, what = 409, "cancelled"


BY_STATUS: dict[int, type[APIError]] = {c.status: c for c in (
    InvalidRequest, NotFound, NotAcceptable, Conflict, PayloadTooLarge, ModelFailed, Overloaded, Unavailable,
    DeadlineExceeded)}


def describe(detail: Any) -> str:
    """The detail in words: a string as it is, a list of {field, msg} as 'field: msg; ...'."""
    if isinstance(detail, list):
        parts = [f"{d.get('field')}: {d.get('msg')}" if isinstance(d, dict) and d.get("field") else
                 str(d.get("msg", d) if isinstance(d, dict) else d) for d in detail]
        return "; ".join(parts)
    return str(detail)


def error_for(status: int, detail: Any, retry_after: float | None = None) -> APIError:
    """The typed error of an HTTP status and the server's detail."""
    kind = BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    return kind(detail, status=status, retry_after=retry_after)
