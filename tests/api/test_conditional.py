"""Flow and class-conditional models on a real server: /generate, /invert and /interpolate with class labels and
guidance, /models, the seed recipe, and the 422s that name their field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from harness.server import running_server
from tests.api.helpers import npy, png
from tests.conftest import TINY_CLASSES


@pytest.fixture(scope="module")
def cond(cond_store: Path) -> Iterator[httpx.Client]:
    with running_server(cond_store, DDIM_DEFAULT_MODEL="tiny-flow") as url, \
            httpx.Client(base_url=url, timeout=120) as c:
        yield c


def _x0(client: httpx.Client, **body: object) -> np.ndarray:
    r = client.post("/generate", json={"steps": 5, **body}, headers={"accept": "application/x-npy"})
    assert r.status_code == 200, r.text
    return npy(r.content)


def test_models_show_kind_prediction_and_classes(cond: httpx.Client) -> None:
    models = {m["name"]: m for m in cond.get("/models").json()["models"]}
    flow, vp, plain = models["tiny-flow"], models["tiny-cond"], models["tiny-plain-flow"]
    assert (flow["kind"], flow["prediction_type"], flow["shift"], flow["schedules"]) == ("flow", "flow", 3.0,
                                                                                        ["linspace"])
    assert (vp["kind"], vp["prediction_type"], vp["beta_schedule"]) == ("vp", "epsilon", "linear")
    assert flow["conditional"] and flow["class_names"] == TINY_CLASSES and flow["null_class"] == 3
    assert not plain["conditional"] and plain["class_names"] is None


@pytest.mark.parametrize("model", ["tiny-flow", "tiny-cond"])
def test_guided_generation_echoes_and_reproduces(cond: httpx.Client, model: str) -> None:
    body = {"model": model, "n": 2, "steps": 5, "seed": 4, "class_label": "Ankle Boot", "guidance_scale": 3}
    r = cond.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["class_label"] == ["ankle boot", "ankle boot"] and out["guidance_scale"] == 3
    assert out["schedule"] == ("linspace" if model == "tiny-flow" else "uniform")
    assert [png(b).size for b in out["images"]] == [(8, 8), (8, 8)]
    again = cond.post("/generate", json={**body, "class_label": 2}).json()
    assert again["images"] == out["images"]  # a name and its index are the same class


@pytest.mark.parametrize("model", ["tiny-flow", "tiny-cond"])
def test_w_zero_is_unconditional_and_labels_change_samples(cond: httpx.Client, model: str) -> None:
    uncond = _x0(cond, model=model, n=2, seed=9)
    assert np.array_equal(_x0(cond, model=model, n=2, seed=9, class_label="dog", guidance_scale=0), uncond)
    assert not np.allclose(_x0(cond, model=model, n=2, seed=9, class_label="dog"), uncond, atol=1e-4)
    per_image = _x0(cond, model=model, n=2, seed=9, class_label=["cat", "dog"], guidance_scale=2)
    alone = _x0(cond, model=model, n=1, seed=10, class_label="dog", guidance_scale=2)
    np.testing.assert_allclose(per_image[1:], alone, rtol=1e-5, atol=1e-5)  # float32: batch-size rounding only


def test_flow_seed_recipe_holds_with_noise(cond: httpx.Client) -> None:
    """Image 1 of seed 10 is image 0 of seed 11, also with eta > 0 (one noise draw per step per image)."""
    two = _x0(cond, model="tiny-plain-flow", n=2, seed=10, eta=0.7)
    one = _x0(cond, model="tiny-plain-flow", n=1, seed=11, eta=0.7)
    np.testing.assert_allclose(two[1:], one, rtol=0, atol=1e-5)
    assert not np.allclose(two, _x0(cond, model="tiny-plain-flow", n=2, seed=10), atol=1e-4)


def test_flow_inversion_and_interpolation(cond: httpx.Client) -> None:
    image = cond.post("/generate", json={"steps": 5, "seed": 1, "class_label": "cat"},
                      headers={"accept": "image/png"}).content
    r = cond.post("/invert", files={"files": ("a.png", image, "image/png")},
                  data={"steps": "20", "class_label": "cat", "return_reconstruction": "true"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert npy(out["x_T"]).shape == (1, 1, 8, 8) and out["schedule"] == "linspace"
    assert out["class_label"] == ["cat"] and len(out["reconstruction_mse"]) == 1
    r = cond.post("/interpolate", json={"start": {"seed": 1}, "end": {"seed": 2}, "frames": 3, "steps": 4,
                                        "class_label": "dog", "guidance_scale": 2, "return_latents": True})
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 3 and r.json()["class_label"] == ["dog"] * 3


@pytest.mark.parametrize("body,field,words", [
    ({"model": "tiny-plain-flow", "class_label": "cat"}, "class_label", "not class-conditional"),
    ({"class_label": "horse"}, "class_label", "valid classes: 0='cat', 1='dog', 2='ankle boot'"),
    ({"class_label": ["cat"], "n": 2}, "class_label", "1 labels for 2 images"),
    ({"class_label": "cat", "guidance_scale": 21}, "guidance_scale", "less than or equal to 20"),
    ({"guidance_scale": -1}, "guidance_scale", "greater than or equal to 0"),
    ({"variance": "large"}, "variance", "VP models only"),
    ({"schedule": "trailing"}, "schedule", "not offered for flow model"),
    ({"n": 33, "steps": 1000, "class_label": "cat", "guidance_scale": 2}, "n", "x 2 rows for guidance"),
])
def test_bad_conditioning_gets_422_naming_the_field(cond: httpx.Client, body: dict, field: str, words: str) -> None:
    r = cond.post("/generate", json={"steps": 3, **body})
    assert r.status_code == 422, r.text
    assert field in str(r.json()["detail"]) and words in str(r.json()["detail"]), r.json()
