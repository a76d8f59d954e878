"""ddim_client needs no torch: used in a fresh process it never imports torch, and installed with pip into a plain
venv (httpx, numpy, pillow only) it gives the raw HTTP answers exactly."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.clients.conftest import CLIENT_SRC

# every method once, against the server at argv[1]; prints the raw answers and whether torch got imported
SCRIPT = """
import json, sys
from ddim_client import Client
with Client(sys.argv[1]) as c:
    gen = c.generate(n=2, steps=4, seed=6, return_latents=True)
    out = {"generate": gen.raw, "models": c.models(),
           "invert": c.invert(gen.images[0], steps=4, return_reconstruction=True).raw,
           "interpolate": c.interpolate(1, 2, frames=3, steps=3).raw,
           "job": c.submit("generate", steps=3, seed=2).result().raw,
           "streamed": c.generate(steps=3, seed=2, preview_every=1, on_progress=lambda e: None).raw,
           "x_0": gen.x_0.tolist()}
out["torch"] = "torch" in sys.modules
print(json.dumps(out))
"""


def raw_answers(server: str, generated: dict) -> dict:
    """What the script's calls give over plain HTTP."""
    with httpx.Client(base_url=server, timeout=120) as h:
        first = generated["images"][0]
        assert base64.b64decode(first)[:8] == b"\x89PNG\r\n\x1a\n"
        return {
            "generate": h.post("/generate", json={"n": 2, "steps": 4, "seed": 6, "return_latents": True}).json(),
            "models": h.get("/models").json()["models"],
            "invert": h.post("/invert", json={"images": [first], "steps": 4, "return_reconstruction": True}).json(),
            "interpolate": h.post("/interpolate", json={"start": {"seed": 1}, "end": {"seed": 2}, "frames": 3,
                                                        "steps": 3}).json(),
            "job": h.post("/generate", json={"steps": 3, "seed": 2}).json(),
            "streamed": h.post("/generate", json={"steps": 3, "seed": 2, "preview_every": 1}).json(),
        }


def check(out: dict, server: str) -> None:
    assert out.pop("torch") is False
    x_0 = out.pop("x_0")
    assert out == raw_answers(server, out["generate"])
    assert len(x_0) == 2 and len(x_0[0][0]) == 8  # decoded with numpy alone


def test_the_client_never_imports_torch(server: str, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", SCRIPT, server], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={"PYTHONPATH": str(CLIENT_SRC), "PATH": "/usr/bin:/bin"}, check=False)
    assert r.returncode == 0, r.stderr
    check(json.loads(r.stdout), server)


def test_pip_install_into_a_plain_venv(server: str, tmp_path: Path) -> None:
    """The distribution itself: built from clients/python by pip in a venv with no torch (bounded: 10 min)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    reach = subprocess.run([*pip, "download", "--no-deps", "--dest", str(tmp_path / "probe"), "httpx"],
                           capture_output=True, text=True, timeout=180, check=False)
    if reach.returncode != 0:
        pytest.skip(f"no package index reachable: {reach.stderr.strip().splitlines()[-1:]}")
    source = shutil.copytree(CLIENT_SRC, tmp_path / "python", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    r = subprocess.run([*pip, "install", "--quiet", str(source)], capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stderr
    python = str(venv / "bin" / "python")
    assert subprocess.run([python, "-c", "import torch"], capture_output=True, check=False).returncode != 0
    r = subprocess.run([python, "-c", SCRIPT, server], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr
    check(json.loads(r.stdout), server)
