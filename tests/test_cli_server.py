"""The CLI and the server give the same numbers for the same seeds: same model, same settings, every start.

Both choose the memory layout through app.startup.layout.layouts_for (DDIM_CHANNELS_LAST, or the choice kept for
this model and machine), and a lone request runs as one batch, as the CLI does: so the PNGs are byte-equal and
the latents bit-equal, in whatever dtype DDIM_DTYPE=auto picks on this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from harness.server import running_server
from tests.api.helpers import npy

# running_server sets these for the server; the CLI gets the same
SAME = {"DDIM_THREADS": "1", "OMP_NUM_THREADS": "1", "DDIM_MAX_BATCH_SIZE": "16"}


def ddim(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.parametrize("channels_last", ["auto", "true"])
def test_cli_and_server_give_identical_outputs(tiny_store: Path, tmp_path: Path, channels_last: str) -> None:
    cache = tmp_path / "layouts.json"
    env = {**SAME, "DDIM_MODEL_STORE": str(tiny_store), "DDIM_LAYOUT_CACHE": str(cache),
           "DDIM_CHANNELS_LAST": channels_last}
    body = {"model": "tiny-rgb", "n": 4, "seed": 11, "steps": 6, "eta": 0.5}
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(photo)
    with running_server(tiny_store, plain=False, **env) as url, httpx.Client(base_url=url, timeout=120) as c:
        served_png = c.post("/generate", json=body, headers={"accept": "image/png"}).content
        served_x0 = npy(c.post("/generate", json=body, headers={"accept": "application/x-npy"}).content)
        upload = [("files", ("photo.png", photo.read_bytes(), "image/png"))]
        served_xT = npy(c.post("/invert", files=upload, data={"model": "tiny-rgb", "steps": "7"},
                               headers={"accept": "application/x-npy"}).content)
        served_layout = {m["name"]: m["channels_last"] for m in c.get("/models").json()["models"]}["tiny-rgb"]
    r = ddim("sample", "--model", "tiny-rgb", "-n", "4", "--seed", "11", "--steps", "6", "--eta", "0.5",
             "--out", str(tmp_path / "cli.png"), "--latents-out", str(tmp_path / "cli.npy"), env=env)
    assert f"channels_last={served_layout}" in r.stderr, r.stderr
    ddim("invert", "--model", "tiny-rgb", "--steps", "7", str(photo), "--out", str(tmp_path / "xT.npy"), env=env)

    assert (tmp_path / "cli.png").read_bytes() == served_png
    cli_x0 = np.load(tmp_path / "cli.npy")
    assert cli_x0.dtype == served_x0.dtype and np.array_equal(cli_x0, served_x0), np.abs(cli_x0 - served_x0).max()
    assert np.array_equal(np.load(tmp_path / "xT.npy"), served_xT)
    if channels_last == "auto":  # the choice kept at the server's start is the one the CLI read
        kept = {e["model"]: e["channels_last"] for e in json.loads(cache.read_text()).values()}
        assert kept["tiny-rgb"] == served_layout
    else:
        assert served_layout is True
