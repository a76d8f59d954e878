"""`ddim-serve-ray`: the same HTTP API over N replicas on a Ray cluster (joined, or started here)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from types import FrameType
from typing import Any

from app import logs

log = logging.getLogger("ddim.ray")
# Serve's request path, tuned for throughput: of Ray's own RAY_SERVE_THROUGHPUT_OPTIMIZED set, the settings that
# change neither the path (its direct ingress would bypass the proxy, and so its retries) nor where logs go (its log
# settings would buffer the app's request log in Serve's files): gRPC from proxy to replicas, the app on the
# replica's own event loop, the router on the proxy's. Measured in docs/ray.md ("Serve, tuned for throughput").
# A variable already in the environment wins.
SERVE_TUNING = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
FORWARDED = ("PYTHONPATH", "OMP_NUM_THREADS", *SERVE_TUNING)


def replica_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment every Serve process of the application gets: DDIM_* settings, the forwarded variables, and
    the Serve tuning where the environment does not set it."""
    return {**SERVE_TUNING, **{k: v for k, v in environ.items() if k.startswith("DDIM_") or k in FORWARDED}}


def main(argv: list[str] | None = None) -> None:
    """`ddim-serve-ray --model-store DIR --replicas N [--host H] [--port P] [--address RAY_ADDRESS]`; DDIM_*
    variables are read here and passed to every replica."""
    p = argparse.ArgumentParser(prog="ddim-serve-ray", description=main.__doc__)
    p.add_argument("--model-store")
    p.add_argument("--replicas", type=int, default=2, help="replicas (0: autoscale between --min and --max)")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=4)
    p.add_argument("--host", default="127.0.0.1", help="where Serve's proxy listens")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", help="a Ray cluster to join (e.g. head:6379, or auto); default: start one here")
    p.add_argument("--num-cpus", type=float, default=1.0, help="Ray CPUs per replica")
    p.add_argument("--num-gpus", type=float, default=0.0, help="Ray GPUs per replica")
    p.add_argument("--max-ongoing-requests", type=int, help="per replica (default: 4 x DDIM_MAX_BATCH_SIZE)")
    p.add_argument("--max-queued-requests", type=int, default=1024, help="waiting for a replica, before 429")
    p.add_argument("--name", default="ddim", help="the Serve application's name")
    args = p.parse_args(argv)
    logs.setup(False)
    try:
        import ray
        from ray import serve
    except ImportError:
        sys.exit("ddim-serve-ray needs the ray extra: pip install -e '.[ray]'")
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    from app.distributed.deployment import NAMESPACE, app_builder, directory_name

    settings = {k[5:].lower(): v for k, v in os.environ.items() if k.startswith("DDIM_")}
    env = replica_env(os.environ)
    os.environ.update({k: env[k] for k in SERVE_TUNING})  # a cluster started here inherits them
    application = app_builder({
        "model_store": args.model_store, "replicas": args.replicas or None, "min_replicas": args.min_replicas,
        "max_replicas": args.max_replicas, "num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
        "max_ongoing_requests": args.max_ongoing_requests, "max_queued_requests": args.max_queued_requests,
        "settings": settings})

    stop = threading.Event()

    def on_signal(sig: int, frame: FrameType | None) -> None:
        stop.set()

    loopback = args.address is None and args.host == "127.0.0.1"
    local: dict[str, Any] = {"_node_ip_address": "127.0.0.1"} if loopback else {}
    ray.init(address=args.address, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False,
             **local)  # a local cluster behind a loopback proxy stays on loopback
    signal.signal(signal.SIGTERM, on_signal)  # after ray.init, which installs its own
    signal.signal(signal.SIGINT, on_signal)
    try:
        # the proxy retries seeded, idempotent requests whose replica died (app/distributed/proxy.py); Serve applies
        # controller_options only when this call starts it
        proxy_env = {**env, "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "app.distributed.proxy:middlewares"}
        with contextlib.suppress(ValueError):  # ValueError: Serve does not run on this cluster yet
            ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
            log.warning("Serve already runs on this cluster: its proxies keep their own environment (no retries of a "
                        "dead replica's requests, no Serve tuning unless the nodes set them; docs/ray.md)")
        serve.start(http_options={"host": args.host, "port": args.port},
                    controller_options={"runtime_env": {"env_vars": proxy_env}},
                    logging_config={"enable_access_log": False})  # the proxy's: the replicas log every request
        serve.run(application, name=args.name, route_prefix="/", blocking=False)
        log.info("ddim-serve-ray: serving on http://%s:%d (%s replicas)", args.host, args.port, args.replicas or "auto")
        while not stop.wait(1.0):
            pass
        log.info("ddim-serve-ray: shutting down (replicas drain their work first)")
        serve.delete(args.name)
        with contextlib.suppress(ValueError):  # ValueError: no replica created it
            ray.kill(ray.get_actor(directory_name(args.name), namespace=NAMESPACE))
        if not serve.status().applications:
            serve.shutdown()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
