"""The engine's errors. Each names what went wrong; the API maps each to one HTTP status."""

from __future__ import annotations


class EngineError(RuntimeError):
    """A step or a model failed (500)."""


class InvalidRequest(ValueError):
    """A request that passed the schema but cannot run on this model; field names what is wrong (422)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class PayloadTooLarge(Exception):
    """An input over a size limit (413); field names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class UnknownModel(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown model {name!r}; loaded models: {', '.join(known) or 'none'}")


class ModelFailed(LookupError):
    """A request for a model that failed to load (424): permanent until the folder is fixed and the server restarted,
    so not worth a retry."""

    def __init__(self, name: str, error: str) -> None:
        super().__init__(f"model {name!r} failed to load and cannot serve: {error}")
        self.model = name


class Overloaded(EngineError):
    """No room for the work now (429); retry_after in seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(Overloaded):
    """Admission would exceed the model's bound on waiting + active samples."""

    def __init__(self, model: str, retry_after: float) -> None:
        super().__init__(f"the queue of model {model!r} is full; retry in {retry_after:.0f} s", retry_after)


class JobCancelled(EngineError):
    """The work was cancelled before it finished (a client's cancel, or its connection closed)."""


class DeadlineExceeded(EngineError):
    """The request's timeout_s passed before its result was ready (504)."""


class ShuttingDown(EngineError):
    """The server is draining: no new work, and what was left at the end of the drain (503)."""
