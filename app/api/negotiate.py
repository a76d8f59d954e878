"""Accept-header negotiation among the media types an endpoint offers."""

from __future__ import annotations

from fastapi import Request

from app.api.errors import NotAcceptable

JSON, PNG, GIF, NPY, SSE = "application/json", "image/png", "image/gif", "application/x-npy", "text/event-stream"


def negotiate(request: Request, offered: list[str]) -> str:
    """The offered type the client prefers (highest q, then the endpoint's order); JSON by default."""
    header = request.headers.get("accept", "").strip()
    if not header:
        return offered[0]
    best: tuple[float, int, str] | None = None
    for part in header.split(","):
        media, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if q <= 0:
            continue
        for rank, kind in enumerate(offered):
            major = kind.split("/")[0]
            if media == kind or (kind != SSE and media in ("*/*", f"{major}/*")):  # a stream only when asked for
                key = (q, -rank, kind)
                if best is None or key > best:
                    best = key
    if best is None:
        raise NotAcceptable(header, offered)
    return best[2]
