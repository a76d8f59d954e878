"""The playground: one static page at GET / (HTML, CSS and ES modules in static/, no build step), which drives
the API from the browser. Nothing is loaded from outside the server; the page's CSP says so to the browser."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; script-src 'self'; style-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def install(app: FastAPI) -> None:
    """GET / serves the page, /playground/ its assets."""

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

    app.mount("/playground", StaticFiles(directory=STATIC), name="playground")
