"""ddim-serve-ray's environment for the Serve processes, without a cluster (app/distributed/cli.py)."""

from __future__ import annotations

from app.distributed.cli import SERVE_TUNING, replica_env


def test_the_serve_tuning_is_a_default_that_the_environment_overrides() -> None:
    env = replica_env({"DDIM_MAX_BATCH_SIZE": "32", "PYTHONPATH": "/srv", "HOME": "/root",
                       "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"})
    assert env == {**SERVE_TUNING, "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0", "DDIM_MAX_BATCH_SIZE": "32",
                   "PYTHONPATH": "/srv"}
    assert replica_env({}) == SERVE_TUNING
