"""The Ray Serve deployment: every replica runs create_app's FastAPI app, with its own Engine, behind @serve.ingress.

`app_builder(args)` builds the application, for `serve run`/`serve deploy` and KubeRay (deploy/ray/serve.yaml) as
for `ddim-serve-ray` (app/distributed/cli.py). Each replica also serves its app on an internal port of its node
(lifespan off: the same app and Engine, a second door), where other replicas forward job reads and cancels and where
Prometheus can scrape that replica's own /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import ray
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from app.config import Settings
from app.distributed.directory import JobDirectory
from app.distributed.routing import JobRouter, ReplicaHeader
from app.main import create_app

log = logging.getLogger(__name__)
NAMESPACE = "ddim-serve"
HEARTBEAT_SECONDS = 5.0


def directory_name(app_name: str) -> str:
    return f"ddim-jobs-{app_name}"


def job_directory(app_name: str) -> Any:
    """The application's job directory actor (created by the first replica that asks; detached, so it outlives
    every replica; `ddim-serve-ray` removes it at shutdown)."""
    return ray.remote(JobDirectory).options(
        name=directory_name(app_name), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1).remote()


class ActorDirectory:
    """routing.Directory over the actor."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def register(self, job_id: str, entry: dict[str, Any]) -> None:
        await self.actor.register.remote(job_id, entry)

    async def lookup(self, job_id: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = await self.actor.lookup.remote(job_id)
        return found


@serve.deployment(name="DDIMServer")
@serve.ingress()
class DDIMServer:
    """One replica: the app (create_app), its Engine, and the internal door for forwarded job requests."""

    async def __init__(self, settings: dict[str, Any]) -> None:  # type: ignore[misc]  # Serve awaits it
        context = serve.get_replica_context()
        self.replica_id = str(context.replica_tag)
        self.directory = job_directory(context.app_name)
        self.fastapi: FastAPI = create_app(Settings(**settings), load_before_serving=True)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ray.util.get_node_ip_address(), 0))
        host, port = sock.getsockname()[:2]
        self.address = f"{host}:{port}"
        self.fastapi.add_middleware(ReplicaHeader, replica_id=self.replica_id)
        self.fastapi.add_middleware(JobRouter, directory=ActorDirectory(self.directory), replica_id=self.replica_id,
                                address=self.address)
        self.internal = uvicorn.Server(uvicorn.Config(self.fastapi, lifespan="off", log_config=None, access_log=False))
        self.internal_task = asyncio.get_running_loop().create_task(self.internal.serve(sockets=[sock]))
        await self.directory.add_replica.remote(self.replica_id, self.address)
        self.heartbeat = asyncio.get_running_loop().create_task(self._heartbeat())
        self.fastapi.add_api_route("/metrics/targets", self.metrics_targets, include_in_schema=False)
        log.info("replica %s: internal address %s", self.replica_id, self.address)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            with contextlib.suppress(Exception):  # the directory restarts (max_restarts); the next beat re-registers
                await self.directory.add_replica.remote(self.replica_id, self.address)

    async def metrics_targets(self) -> list[dict[str, Any]]:
        """Prometheus HTTP service discovery: every live replica's internal address, labelled with its id."""
        live: dict[str, str] = await self.directory.replicas.remote()
        return [{"targets": [address], "labels": {"replica": rid}} for rid, address in sorted(live.items())]

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.fastapi

    async def check_health(self) -> None:
        """Unhealthy (Serve restarts it) when its models failed to load; a worker restarting is not (it recovers)."""
        error = self.fastapi.state.engine.error
        if error:
            raise RuntimeError(error)

    async def __del__(self) -> None:
        if not hasattr(self, "internal"):  # __init__ failed
            return
        self.heartbeat.cancel()
        self.internal.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.internal_task, 10)
            await self.directory.remove_replica.remote(self.replica_id)


class RayArgs(BaseModel):
    """The application's arguments (serve.yaml's `args`, or ddim-serve-ray's flags)."""

    model_config = ConfigDict(extra="forbid")

    model_store: str | None = Field(None, description="the model store (else DDIM_MODEL_STORE, else model_store)")
    replicas: int | None = Field(None, ge=1, description="a fixed number of replicas; None: autoscale")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float | None = Field(None, gt=0, description="autoscaling target per replica; "
                                                  "default: the engine's max_batch_size")
    max_ongoing_requests: int | None = Field(None, ge=1, description="requests one replica takes at once; "
                                             "default: 4 x max_batch_size")
    max_queued_requests: int = Field(1024, ge=1, description="requests waiting for a replica before 429")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs per replica")
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs per replica (1: a GPU of its own)")
    settings: dict[str, Any] = Field(default_factory=dict, description="Settings fields for every replica "
                                     "(app/config.py, e.g. {max_batch_size: 32}); DDIM_* variables apply too")


def deployment_options(args: RayArgs) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the deployment's options, the replicas' settings) for args."""
    settings = dict(args.settings)
    if args.model_store is not None:
        settings["model_store"] = args.model_store
    resolved = Settings(**settings)  # validates here, before any replica starts
    batch = resolved.max_batch_size
    options: dict[str, Any] = {
        "max_ongoing_requests": args.max_ongoing_requests or 4 * batch,
        "max_queued_requests": args.max_queued_requests,
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
        "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        "graceful_shutdown_timeout_s": resolved.drain_seconds + 5,
        "health_check_period_s": 5,
        # the app logs every request itself (request id, status, timings: app/logs.py); Serve's access log per
        # request would repeat it, at a cost on the request path
        "logging_config": {"enable_access_log": False},
    }
    if args.replicas is not None:
        options["num_replicas"] = args.replicas
    else:
        options["autoscaling_config"] = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                                         "target_ongoing_requests": args.target_ongoing_requests or batch}
    return options, settings


def app_builder(args: dict[str, Any]) -> Application:
    """The application (import path app.distributed.deployment:app_builder)."""
    options, settings = deployment_options(RayArgs.model_validate(args))
    deployment: Any = DDIMServer  # a Serve Deployment once decorated (mypy sees the class)
    app: Application = deployment.options(**options).bind(settings)
    return app
