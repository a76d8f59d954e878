"""A real ddim-serve process (uvicorn) on loopback, for tests and benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(model_store: Path, *, ready_timeout: float = 120.0, plain: bool = True,
                   wait_for: str = "/readyz", **env: str) -> Iterator[str]:
    """Start `ddim-serve` on a free loopback port; yields its base URL once wait_for answers 200 (/healthz: as soon
    as it serves HTTP, before its models are ready); DDIM_* settings via env.

    plain: run the plain path (float32, contiguous), so that exact comparisons hold on every CPU;
    plain=False keeps the server's own defaults (its fast path), as tests/api/test_fast_server.py does.
    """
    with server_process(model_store, ready_timeout=ready_timeout, plain=plain, wait_for=wait_for, **env) as (url, _):
        yield url


@contextmanager
def server_process(model_store: Path, *, ready_timeout: float = 120.0, plain: bool = True,
                   wait_for: str = "/readyz", **env: str) -> Iterator[tuple[str, subprocess.Popen]]:  # type: ignore[type-arg]
    """As running_server, yielding (base URL, the process) for tests that signal it."""
    port = free_port()
    pins = {"DDIM_DTYPE": "float32", "DDIM_CHANNELS_LAST": "false"} if plain else {}
    environ = {**os.environ, "DDIM_MODEL_STORE": str(model_store), "OMP_NUM_THREADS": "1", "DDIM_THREADS": "1",
               "DDIM_MAX_BATCH_SIZE": "16", **pins, **env}
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"ddim-serve-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "app.main", "--host", "127.0.0.1", "--port", str(port)],
                            env=environ, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"ddim-serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"{url}{wait_for}", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"ddim-serve: {wait_for} not 200 after {ready_timeout} s")
            time.sleep(0.1)
        yield url, proc
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """Terminate a child process, killing it if it does not exit within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextmanager
def ray_serve_process(args: list[str], env: Mapping[str, str | None], ready_timeout: float = 300.0,
                      stop_timeout: float = 120.0) -> Iterator[tuple[str, subprocess.Popen]]:  # type: ignore[type-arg]
    """Start `ddim-serve-ray ARGS --port P` on a free loopback port; yields (its URL, the process) once every
    replica is up. env adds to this process's environment (None: unset). It stops with SIGTERM (the application is
    deleted, a cluster it started stops), killed after stop_timeout; a test that signalled it itself finds it gone."""
    port = free_port()
    environ = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    environ["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"ddim-serve-ray-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "app.distributed.cli", *args, "--port", str(port)],
                            env=environ, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            log.seek(0)
            if "ddim-serve-ray: serving on" in log.read():  # logged after serve.run: every replica is up
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"ddim-serve-ray did not start (exit {proc.poll()}):\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
