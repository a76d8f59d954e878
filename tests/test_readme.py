"""The README's examples, pasted into a shell in order (the curl block against a real server, then the CLI block),
produce what they say, write nothing into the folder they run from, and agree with each other."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from harness.server import running_server

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLES = "/tmp/ddim-examples"
# the server's settings, which the CLI reads from the same variables (running_server sets these for the server)
SETTINGS = {"DDIM_THREADS": "1", "OMP_NUM_THREADS": "1", "DDIM_MAX_BATCH_SIZE": "16"}


def sh_block(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, f"README has no sh block under {heading}"
    return block.group(1)


def run(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})


def test_readme_examples_run_in_order_and_keep_out_of_the_tree(tiny_store: Path, tmp_path: Path) -> None:
    curl, cli = sh_block("## HTTP API"), sh_block("## Command line")
    assert {"/generate", "/invert", "/interpolate"} <= set(re.findall(r"localhost:8000(/\w+)", curl))
    for block in (curl, cli):  # every file written or read lies in the examples' folder
        paths = re.findall(r"\s(?:-o|--out|--latents-out)\s+(\S+)", block) + re.findall(r"@(\S+)", block)
        paths += re.findall(r"ddim invert .*? (\S+\.png)", block)
        assert len(paths) >= 5 and all(p.startswith(EXAMPLES + "/") for p in paths), paths
    out, cwd = tmp_path / "examples", tmp_path / "cwd"
    cwd.mkdir()
    env = {**SETTINGS, "DDIM_MODEL_STORE": str(tiny_store), "PYTHONPATH": str(ROOT)}
    with running_server(tiny_store, plain=False) as url:
        r = run(curl.replace("localhost:8000", url.removeprefix("http://")).replace(EXAMPLES, str(out)), cwd, env)
    assert r.returncode == 0, r.stderr
    assert "models" in json.loads(r.stdout)
    r = run(cli.replace(".venv/bin/ddim", f"{sys.executable} -m app.cli").replace(EXAMPLES, str(out)), cwd, env)
    assert r.returncode == 0, r.stderr
    assert list(cwd.iterdir()) == []  # nothing lands where the examples were pasted

    assert Image.open(out / "grid.png").format == "PNG"
    gen = json.loads((out / "generated.json").read_text())
    assert len(gen["images"]) == 2 and gen["seed"] == 7
    assert np.load(out / "x0.npy").shape[0] == 4
    inv = json.loads((out / "inverted.json").read_text())
    assert "x_T" in inv and len(inv["reconstruction_mse"]) == 1
    assert np.load(out / "xT.npy").shape[0] == 1
    gif = Image.open(out / "interpolation.gif")
    assert gif.format == "GIF" and 2 <= gif.n_frames <= 16  # Pillow merges identical neighbouring frames
    assert Image.open(io.BytesIO((out / "strip.png").read_bytes())).format == "PNG"
    assert np.load(out / "cli-x0.npy").shape[0] == 16 and Image.open(out / "cli-ddpm.png").format == "PNG"
    assert np.load(out / "cli-xT.npy").shape[0] == 1
    # as the README says: the same settings and seeds give the same images from the CLI and the server
    assert (out / "cli-grid.png").read_bytes() == (out / "grid.png").read_bytes()
    assert (out / "cli-one.png").read_bytes() == (out / "one.png").read_bytes()
