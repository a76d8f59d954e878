"""The Makefile's first run: `make serve` installs the package alone and says where the server really listens;
`make test` adds the dev extra. Real `make`: dry runs for the install recipes, and `make serve` starting a server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from harness.server import free_port

ROOT = Path(__file__).resolve().parents[1]


def dry_run(*args: str) -> str:
    r = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=_top_level())
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_serve_installs_the_package_alone_and_test_adds_the_dev_extra(tmp_path: Path) -> None:
    venv = f"VENV={tmp_path / 'venv'}"  # none there yet: the whole recipe
    serve = dry_run("serve", venv)
    assert "pip install --progress-bar on -e .\n" in serve and ".[dev" not in serve and "-m pytest" not in serve
    assert dry_run("install", venv, "EXTRAS=") == serve.split("url=")[0]  # `make install EXTRAS=`: the same
    test = dry_run("test", venv)
    assert test.startswith(serve.split("url=")[0])  # the same base install, then the extra on top
    assert "pip install --progress-bar on -e '.[dev]'" in test and "-m pytest" in test
    assert "-e '.[dev,ray]'" in dry_run("test", venv, "EXTRAS=dev,ray")


def test_the_serve_banner_names_the_address_the_server_listens_on(tiny_store: Path, tmp_path: Path) -> None:
    """DDIM_PORT=P make serve: the banner says P, and the server answers there."""
    venv = tmp_path / "venv"  # this interpreter's environment, installed as far as make can tell
    venv.mkdir()
    (venv / "bin").symlink_to(Path(sys.executable).parent)
    (venv / ".installed").touch()
    port = free_port()
    env = {**_top_level(), "DDIM_PORT": str(port), "DDIM_MODEL_STORE": str(tiny_store), "PYTHONPATH": str(ROOT),
           "DDIM_WARMUP": "false", "DDIM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(["make", "serve", f"VENV={venv}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        banner = [proc.stdout.readline() for _ in range(2)]
        url = f"http://127.0.0.1:{port}"
        assert banner[0].startswith(f"==> starting ddim-serve on {url} ") and f"{url}/readyz" in banner[1], banner
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "make serve did not come up"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # make and the server it started
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _top_level() -> dict[str, str]:
    """This environment as a user's shell has it: under `make test` (CI, the README) make's own variables would make
    the make run here a sub-make, which prints "Entering directory" lines around its output; and the variables given
    on that make's command line (CI's `make test EXTRAS=dev,ray`), which make exports, would override this file's."""
    inherited = ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES", "EXTRAS", "VENV", "PYTHON", "TORCH_PIP_ARGS")
    return {k: v for k, v in os.environ.items() if k not in inherited}
