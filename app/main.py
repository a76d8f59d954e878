"""create_app(settings): the FastAPI app; its lifespan loads the models and runs the workers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import __version__, logs
from app.api import errors, openai
from app.api.auth import ApiKeys, load_digests
from app.api.routes import router
from app.config import Settings
from app.engine.client import Engine
from app.metrics import Metrics
from app.middleware import RequestMiddleware
from app.models import ModelStoreError
from app.playground import install as install_playground
from app.startup import tune_process

log = logging.getLogger(__name__)
DOCS_ASSETS = "/docs-assets"


def create_app(settings: Settings | None = None, *, load_before_serving: bool = False) -> FastAPI:
    """The app; works with `uvicorn --factory app.main:create_app` (settings from DDIM_* then).

    load_before_serving: the lifespan's startup returns only once the models are loaded (or failed to load), for
    hosts that count a started app as ready, e.g. a Ray Serve replica (app/distributed); by default /healthz
    serves while the models load and /readyz says 503 until they are ready."""
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
            except ModelStoreError as e:  # no model could load (each failure was logged on its own line)
                engine.error = f"model loading failed: {e}"
                log.error("model loading failed: %s", e)
            except Exception as e:
                engine.error = f"model loading failed: {e}"
                log.exception("model loading failed")

        task = asyncio.create_task(load())  # /healthz serves while models load; /readyz says 503
        if load_before_serving:
            await task
        yield
        task.cancel()
        await drain()  # begun at SIGTERM already (DrainingServer); at once otherwise
        await asyncio.to_thread(engine.stop)

    drained: list[asyncio.Task[None]] = []

    def drain() -> asyncio.Task[None]:
        """Stop admitting work and let what is in flight finish within drain_seconds (once)."""
        if not drained:
            drained.append(asyncio.ensure_future(engine.drain(settings.drain_seconds)))
        return drained[0]

    # /docs and /redoc with Swagger UI and ReDoc served from here (the package fastapi-offline ships them), not
    # from a CDN: the interactive docs work on a closed network
    app = FastAPIOffline(title="ddim-serve", version=__version__, lifespan=lifespan, static_url=DOCS_ASSETS,
                         swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from swagger.io
                         description="DDIM sampling from pretrained diffusion and flow models, batched per "
                                     "denoising step.")
    app.state.settings, app.state.metrics, app.state.engine, app.state.drain = settings, metrics, engine, drain
    errors.install(app)
    app.include_router(router)
    app.include_router(openai.router)  # POST /v1/images/generations
    install_playground(app)  # GET /: the playground page

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    digests = load_digests(settings.api_keys, settings.api_keys_file)
    if digests:
        app.add_middleware(ApiKeys, digests=digests, metrics_auth=settings.metrics_auth)
    if settings.cors_origins.strip():
        app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in settings.cors_origins.split(",")],
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type",
                                                                                   "Accept", "X-Request-ID"],
                           expose_headers=["Location", "Retry-After", "X-Request-ID"])
    app.add_middleware(RequestMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    return app


def main(argv: list[str] | None = None) -> None:
    """`ddim-serve [--host] [--port] [--model-store]`; everything else from DDIM_* variables."""
    p = argparse.ArgumentParser(prog="ddim-serve", description=main.__doc__)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--model-store")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    logs.setup(settings.log_json)
    tune_process(settings)  # before anything allocates much: malloc keeps freed memory
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, workers=1, log_config=None, access_log=False,
                            timeout_graceful_shutdown=int(settings.drain_seconds) + 5)
    DrainingServer(config, app).run()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM (or SIGINT) first turns /readyz 503 and starts the engine's drain, then
    shuts down as uvicorn does: no new connections, open requests given the drain's time, the lifespan's end."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app.state.engine.draining = True
        asyncio.get_event_loop().call_soon_threadsafe(self.app.state.drain)
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM and sig in getattr(self, "_captured_signals", []):
            # uvicorn raises a captured signal again once it has shut down, which would end the process by
            # SIGTERM (143); a drained server exits 0, as orchestrators expect of a graceful stop
            self._captured_signals.remove(sig)


if __name__ == "__main__":
    main()
