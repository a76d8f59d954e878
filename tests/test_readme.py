"""The README's curl examples, pasted into a shell against a real server, produce what they say."""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from tests.server import running_server

README = Path(__file__).resolve().parents[1] / "README.md"


def curl_block() -> str:
    text = README.read_text()
    section = text[text.index("## HTTP API"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README has no sh block under HTTP API"
    return block.group(1)


def test_readme_curl_examples_work(tiny_store: Path, tmp_path: Path) -> None:
    script = curl_block()
    assert {"/generate", "/invert", "/interpolate"} <= set(re.findall(r"localhost:8000(/\w+)", script))
    with running_server(tiny_store) as url:
        shell = "set -euo pipefail\n" + script.replace("localhost:8000", url.removeprefix("http://"))
        r = subprocess.run(["bash", "-c", shell], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "grid.png").format == "PNG"
    gen = json.loads((tmp_path / "generated.json").read_text())
    assert len(gen["images"]) == 2 and gen["seed"] == 7
    assert np.load(tmp_path / "x0.npy").shape[0] == 4
    inv = json.loads((tmp_path / "inverted.json").read_text())
    assert "x_T" in inv and len(inv["reconstruction_mse"]) == 1
    assert np.load(tmp_path / "xT.npy").shape[0] == 1
    gif = Image.open(tmp_path / "interpolation.gif")
    assert gif.format == "GIF" and 2 <= gif.n_frames <= 16  # Pillow merges identical neighbouring frames
    assert Image.open(io.BytesIO((tmp_path / "strip.png").read_bytes())).format == "PNG"
    assert "models" in json.loads(r.stdout)
