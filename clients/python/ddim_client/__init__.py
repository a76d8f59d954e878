"""ddim-serve's Python client: generate, invert and interpolate over HTTP. Needs httpx, numpy and pillow; no torch.

    from ddim_client import Client
    with Client("http://127.0.0.1:8000") as c:
        result = c.generate(n=4, steps=50, seed=0)
        result.images[0].save("0.png")
"""

from ddim_client.aio import AsyncClient, AsyncJob
from ddim_client.client import Client, Job
from ddim_client.errors import (
    APIError,
    Conflict,
    ConnectionFailed,
    DDIMError,
    DeadlineExceeded,
    InvalidRequest,
    JobCancelled,
    ModelFailed,
    NotAcceptable,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServerError,
    Unavailable,
)
from ddim_client.wire import Event, Result, RetryPolicy

__version__ = "0.1.0"
__all__ = [
    "APIError", "AsyncClient", "AsyncJob", "Client", "Conflict", "ConnectionFailed", "DDIMError", "DeadlineExceeded",
    "Event", "InvalidRequest", "Job", "JobCancelled", "ModelFailed", "NotAcceptable", "NotFound", "Overloaded",
    "PayloadTooLarge", "Result", "RetryPolicy", "ServerError", "Unavailable",
]
