"""create_app(settings): the FastAPI app; its lifespan loads the models and runs the workers."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import __version__, logs
from app.api import errors
from app.api.routes import router
from app.config import Settings
from app.engine.client import Engine
from app.metrics import Metrics
from app.middleware import RequestMiddleware

log = logging.getLogger(__name__)
DOCS_ASSETS = "/docs-assets"


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; works with `uvicorn --factory app.main:create_app` (settings from DDIM_* then)."""
    settings = settings or Settings()
    metrics = Metrics()
    engine = Engine(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.log_json:
            logs.setup_request_log()

        async def load() -> None:
            try:
                await asyncio.to_thread(engine.load)
            except Exception as e:
                engine.error = f"model loading failed: {e}"
                log.exception("model loading failed")

        task = asyncio.create_task(load())  # /healthz serves while models load; /readyz says 503
        yield
        task.cancel()
        await asyncio.to_thread(engine.stop)

    # /docs and /redoc with Swagger UI and ReDoc served from here (the package fastapi-offline ships them), not
    # from a CDN: the interactive docs work on a closed network
    app = FastAPIOffline(title="ddim-serve", version=__version__, lifespan=lifespan, static_url=DOCS_ASSETS,
                         swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from swagger.io
                         description="DDIM/DDPM sampling from pretrained eps-models, batched per denoising step.")
    app.state.settings, app.state.metrics, app.state.engine = settings, metrics, engine
    errors.install(app)
    app.include_router(router)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RequestMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    return app


def main(argv: list[str] | None = None) -> None:
    """`ddim-serve [--host] [--port] [--model-store]`; everything else from DDIM_* variables."""
    import uvicorn

    p = argparse.ArgumentParser(prog="ddim-serve", description=main.__doc__)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--model-store")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    logs.setup(settings.log_json)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, workers=1, log_config=None,
                access_log=False)


if __name__ == "__main__":
    main()
