"""Each metric counts what its help text (and the README's table) says, read from a real server's /metrics."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from harness.server import running_server
from tests.api.helpers import png_b64


def sample(client: httpx.Client, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 when the series does not exist yet)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def counts(client: httpx.Client, model: str = "tiny") -> dict[str, float]:
    out = {e: sample(client, "ddim_images_total", model=model, endpoint=e)
           for e in ("generate", "invert", "interpolate")}
    out["steps"] = sample(client, "ddim_sample_steps_total", model=model)
    return out


def grown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


def test_images_count_the_outputs_returned_and_steps_count_every_step(client: httpx.Client) -> None:
    png = png_b64(Image.new("L", (8, 8), 200))
    before = counts(client)
    assert client.post("/generate", json={"model": "tiny", "n": 3, "steps": 4}).status_code == 200
    assert grown(before, after := counts(client)) == {"generate": 3, "invert": 0, "interpolate": 0, "steps": 12}
    # two images inverted, with their reconstruction: two latents returned; the sampler stepped 2 x 5 twice
    r = client.post("/invert", json={"model": "tiny", "images": [png, png], "steps": 5, "return_reconstruction": True})
    assert r.status_code == 200 and len(r.json()["reconstruction"]) == 2
    assert grown(after, again := counts(client)) == {"generate": 0, "invert": 2, "interpolate": 0, "steps": 20}
    # four frames, one end an image (inverted first): four images returned
    r = client.post("/interpolate", json={"model": "tiny", "start": {"image": png}, "end": {"seed": 1}, "frames": 4,
                                          "steps": 3})
    assert r.status_code == 200 and len(r.json()["images"]) == 4
    assert grown(again, counts(client)) == {"generate": 0, "invert": 0, "interpolate": 4, "steps": 3 + 12}


def test_readiness_probes_are_not_rejections(tmp_path: Path) -> None:
    """A store whose only model is broken: the server serves HTTP but never becomes ready; /models lists the failure
    once loading is over (503 before)."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    with running_server(tmp_path, wait_for="/healthz") as url, httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(5):
            assert c.get("/readyz").status_code == 503
            assert c.get("/models").status_code in (200, 503)
        assert sample(c, "ddim_requests_rejected_total", reason="not_ready") == 0
        png = base64.b64decode(png_b64(Image.new("L", (8, 8))))
        assert c.post("/generate", json={}).status_code == 503
        assert c.post("/invert", files=[("files", ("a.png", png, "image/png"))]).status_code == 503
        assert sample(c, "ddim_requests_rejected_total", reason="not_ready") == 2
        for _ in range(100):
            if c.get("/models").status_code == 200:
                break
            time.sleep(0.1)
        assert [m["status"] for m in c.get("/models").json()["models"]] == ["failed"]
