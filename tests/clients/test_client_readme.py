"""clients/python/README.md's examples, pasted into Python one after the other, run against a real server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.clients.conftest import CLIENT_SRC


def test_the_readme_examples_run(server: str, tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (CLIENT_SRC / "README.md").read_text(), re.S)
    assert len(blocks) >= 6
    script = "\n".join(b.replace("http://127.0.0.1:8000", server) for b in blocks)
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={"PYTHONPATH": str(CLIENT_SRC), "PATH": "/usr/bin:/bin"}, check=False)
    assert r.returncode == 0, r.stderr
    assert "cancelled" in r.stdout and "greater than or equal to 1" in r.stdout
    assert Image.open(tmp_path / "interpolation.gif").n_frames >= 2
    assert {p.name for p in tmp_path.glob("sample-*.png")} == {f"sample-{i}.png" for i in range(4)}
    assert list(tmp_path.glob("preview-*.png"))


def test_the_main_readme_example_runs(server: str, tmp_path: Path) -> None:
    readme = (CLIENT_SRC.parents[1] / "README.md").read_text()
    section = readme[readme.index("## Playground and Python client"):]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block and len(block.group(1).splitlines()) == 5
    r = subprocess.run([sys.executable, "-c", block.group(1).replace("http://127.0.0.1:8000", server)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(CLIENT_SRC)}, check=False)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "seed3.png").size == (8, 8)
