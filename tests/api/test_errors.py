"""A table of bad inputs: each gets its status and a JSON detail naming the field; none gets a 500."""

from __future__ import annotations

import base64
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from harness.server import running_server
from tests.api.helpers import npy_b64, png_b64

PNG = png_b64(Image.new("RGB", (8, 8), "red"))
TRUNCATED_PNG = base64.b64encode(base64.b64decode(PNG)[:40]).decode()
GOOD_LATENT = npy_b64(np.zeros((1, 1, 8, 8), np.float32))
HUGE_HEADER = base64.b64encode(base64.b64decode(GOOD_LATENT).replace(b"(1, 1, 8, 8)", b"(99999,9999)")).decode()

CASES: list[tuple[str, str, Any, int, str]] = [
    # (name, path, json body or raw bytes, status, text the detail must contain)
    ("n wrong type", "/generate", {"n": "three"}, 422, "n"),
    ("n zero", "/generate", {"n": 0}, 422, "n"),
    ("n over server limit", "/generate", {"n": 10_000}, 422, "n must be at most"),
    ("steps zero", "/generate", {"steps": 0}, 422, "steps"),
    ("steps over T", "/generate", {"steps": 1001}, 422, "steps"),
    ("eta negative", "/generate", {"eta": -0.1}, 422, "eta"),
    ("eta above one", "/generate", {"eta": 1.5}, 422, "eta"),
    ("unknown variance", "/generate", {"variance": "huge"}, 422, "variance"),
    ("unknown schedule", "/generate", {"schedule": "cosine"}, 422, "schedule"),
    ("negative seed", "/generate", {"seed": -1}, 422, "seed"),
    ("misspelt field", "/generate", {"stpes": 10}, 422, "stpes"),
    ("not json", "/generate", b"{not json", 422, "body"),
    ("json array", "/generate", [1, 2], 422, "body"),
    ("x_T not base64", "/generate", {"x_T": "%%%"}, 422, "x_T"),
    ("x_T not npy", "/generate", {"x_T": base64.b64encode(b"hello").decode()}, 422, "x_T"),
    ("x_T wrong shape", "/generate", {"n": 2, "x_T": GOOD_LATENT}, 422, "x_T must have shape (2, 1, 8, 8)"),
    ("x_T NaN", "/generate", {"x_T": npy_b64(np.full((1, 1, 8, 8), np.nan, np.float32))}, 422, "NaN"),
    ("x_T pickled object array", "/generate", {"x_T": npy_b64(np.array([{"a": 1}], dtype=object))}, 422, "x_T"),
    ("x_T header promises 4 GB", "/generate", {"x_T": HUGE_HEADER}, 422, "header promises"),
    ("unknown model", "/generate", {"model": "nope"}, 404, "nope"),
    ("invert no images", "/invert", {"images": []}, 422, "images"),
    ("invert truncated png", "/invert", {"images": [TRUNCATED_PNG]}, 422, "images.0"),
    ("invert not an image", "/invert", {"images": [base64.b64encode(b"GIF89a-nope").decode()]}, 422, "images.0"),
    ("invert bad base64", "/invert", {"images": ["not base64!"]}, 422, "images.0"),
    ("invert not json", "/invert", b"]]", 422, "body is not valid JSON"),
    ("invert unknown model", "/invert", {"model": "nope", "images": [PNG]}, 404, "nope"),
    ("interpolate two kinds of end", "/interpolate", {"start": {"seed": 1, "x_T": GOOD_LATENT}, "end": {"seed": 2}},
     422, "start"),
    ("interpolate empty end", "/interpolate", {"start": {"seed": 1}, "end": {}}, 422, "end"),
    ("interpolate one frame", "/interpolate", {"start": {"seed": 1}, "end": {"seed": 2}, "frames": 1}, 422, "frames"),
    ("interpolate wrong latent", "/interpolate",
     {"start": {"x_T": npy_b64(np.zeros((3, 8, 8), np.float32))}, "end": {"seed": 2}}, 422, "start.x_T"),
    ("interpolate bad steps", "/interpolate", {"start": {"seed": 1}, "end": {"seed": 2}, "steps": 5000}, 422, "steps"),
]


@pytest.mark.parametrize("name,path,body,status,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(client: httpx.Client, name: str, path: str, body: Any, status: int, needle: str) -> None:
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert needle in str(detail), detail


def test_bad_multipart_and_odd_image_modes(client: httpx.Client) -> None:
    r = client.post("/invert", content=b"--xyz\r\nnot a form",
                    headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code in (400, 422) and "detail" in r.json()
    r = client.post("/invert", files=[("files", ("a.png", b"\x89PNG\r\n\x1a\nbroken", "image/png"))])
    assert r.status_code == 422 and "files.0" in str(r.json()["detail"])  # the field the client used
    for mode, size in (("I;16", (9, 9)), ("CMYK", (5, 20)), ("RGBA", (30, 30)), ("P", (8, 8)), ("1", (12, 12))):
        r = client.post("/invert", json={"model": "tiny-rgb", "images": [png_b64(Image.new(mode, size),
                                                                                "TIFF" if mode == "CMYK" else "PNG")],
                                         "steps": 2})
        assert r.status_code in (200, 422), (mode, r.text)


def one_error(r: httpx.Response, status: int = 422) -> dict[str, str]:
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert len(detail) == 1, detail
    return detail[0]


def test_errors_name_the_field_the_client_used_in_plain_words(client: httpx.Client) -> None:
    text = ("a.txt", b"hello, not an image", "text/plain")
    png = ("b.png", base64.b64decode(PNG), "image/png")
    # the multipart form names its images files: so do its errors, with the item's index
    e = one_error(client.post("/invert", files=[("files", png), ("files", text)]))
    assert e == {"field": "files.1", "type": "value_error",
                 "msg": "files.1 is not an image in a format this server reads (PNG, JPEG, ...)"}
    e = one_error(client.post("/invert", json={"images": [PNG, base64.b64encode(text[1]).decode()]}))
    assert e["field"] == "images.1" and "not an image" in e["msg"]
    e = one_error(client.post("/invert", files={"steps": (None, "3")}))  # a form without files
    assert e["field"] == "files" and "images" not in e["msg"]
    e = one_error(client.post("/invert", files={"files": (None, "image.png")}))  # -F files=image.png, no @
    assert e["field"] == "files" and "file uploads" in e["msg"]
    e = one_error(client.post("/invert", files=[("files", png)], data={"steps": "0"}))
    assert e["field"] == "steps"
    # an empty body is empty, not invalid JSON
    for headers in ({}, {"content-type": "application/json"}):
        e = one_error(client.post("/invert", content=b"", headers=headers))
        assert e["field"] == "body" and e["msg"].startswith("the body is empty"), e
    e = one_error(client.post("/generate", content=b"", headers={"content-type": "application/json"}))
    assert e["field"] == "body" and e["msg"].startswith("the body is empty"), e
    e = one_error(client.post("/invert", content=b"{oops", headers={"content-type": "application/json"}))
    assert e["field"] == "body" and e["msg"].startswith("body is not valid JSON"), e


def test_no_error_shows_a_python_repr(client: httpx.Client) -> None:
    bad = [client.post("/invert", files=[("files", ("x.png", b"\x00" * 64, "image/png"))]),
           client.post("/invert", json={"images": [base64.b64encode(b"\x00" * 64).decode()]}),
           client.post("/interpolate", json={"start": {"image": base64.b64encode(b"nope").decode()},
                                             "end": {"seed": 1}})]
    for r in bad:
        assert r.status_code == 422, r.text
        assert not re.search(r"<[\w.]+ object at 0x|Traceback|BytesIO", r.text), r.text


def test_unacceptable_accept_header(client: httpx.Client) -> None:
    r = client.post("/generate", json={"steps": 2}, headers={"accept": "text/html"})
    assert r.status_code == 406 and "image/png" in r.json()["detail"]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): only the header is read before the size check."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def test_huge_image_and_body_are_413(tmp_path: Path, tiny_store: Path) -> None:
    big = png_b64(Image.new("L", (3000, 3000)))
    with running_server(tiny_store, DDIM_MAX_IMAGE_PIXELS="1000000", DDIM_MAX_BODY_BYTES="200000") as url:
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/invert", json={"images": [big]})
            assert r.status_code == 413 and "images.0" in str(r.json()["detail"])
            # one message whatever the size: 9 Mpixel, and 400 Mpixel (past Pillow's own decompression-bomb limit)
            for side in (3000, 20000):
                r = c.post("/invert", files=[("files", ("big.png", png_header_only(side, side), "image/png"))])
                assert r.status_code == 413, r.text
                assert r.json()["detail"] == [{"field": "files.0", "type": "too_large", "msg": (
                    f"files.0 is {side}x{side} pixels; this server takes at most 1000000 pixels per image")}]
            r = c.post("/generate", content=b"{" + b" " * 300_000 + b"}", headers={"content-type": "application/json"})
            assert r.status_code == 413 and "body" in str(r.json()["detail"])
            # no content-length: a chunked body is counted as it arrives
            r = c.post("/generate", content=iter([b"{", b" " * 300_000, b"}"]),
                       headers={"content-type": "application/json"})
            assert r.status_code == 413
            # the queue bound: n over max_queue (default 1024) cannot be admitted -> 429 with Retry-After


def test_queue_full_is_429_with_retry_after(tiny_store: Path) -> None:
    with running_server(tiny_store, DDIM_MAX_QUEUE="4", DDIM_MAX_BATCH_SIZE="2") as url:
        with httpx.Client(base_url=url, timeout=120) as c:
            body = {"model": "tiny", "n": 4, "steps": 300}
            with ThreadPoolExecutor(2) as pool:
                running = pool.submit(c.post, "/generate", json=body)
                deadline = 0
                while not c.get("/models").json()["models"][0]["active"] and deadline < 5000:
                    deadline += 1
                rejected = c.post("/generate", json={"model": "tiny", "n": 1, "steps": 3})
                assert running.result().status_code == 200
            assert rejected.status_code == 429, rejected.text
            assert int(rejected.headers["retry-after"]) >= 1 and "full" in rejected.json()["detail"]
            assert c.post("/generate", json={"model": "tiny", "n": 1, "steps": 3}).status_code == 200
            never_fits = c.post("/generate", json={"model": "tiny", "n": 5, "steps": 3})  # n > max_queue
            assert never_fits.status_code == 422 and "queue" in str(never_fits.json()["detail"])


def test_not_ready_is_503(tmp_path: Path) -> None:
    """A store with a broken model: the server serves /healthz but never becomes ready."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    import subprocess
    import sys
    import time

    from harness.server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app.main", "--port", str(port), "--model-store", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        deadline = time.monotonic() + 60  # the layout is timed in a spawned process first: a few seconds
        while "still loading" in (r := httpx.get(f"{url}/readyz")).json()["detail"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 503 and "broken" in r.json()["detail"]
        r = httpx.post(f"{url}/generate", json={})
        assert r.status_code == 503 and r.headers["retry-after"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_failing_model_is_a_500_that_names_its_request_id(tmp_path: Path) -> None:
    """A UNet of odd sample size loads, but its upsampled features (6x6) cannot meet its skips (5x5): every step
    fails. The client gets a JSON 500 with the request id (header and detail), and the server keeps serving."""
    from app.models.folder import random_model_folder
    from tests.conftest import LINEAR_SCHEDULER, TINY_UNET

    random_model_folder(tmp_path / "odd-size", {**TINY_UNET, "sample_size": 5}, LINEAR_SCHEDULER)
    with running_server(tmp_path, DDIM_WARMUP="false") as url, httpx.Client(base_url=url, timeout=60) as c:
        for attempt in range(2):
            r = c.post("/generate", json={"steps": 3}, headers={"x-request-id": f"boom-{attempt}"})
            assert r.status_code == 500
            assert r.headers["x-request-id"] == f"boom-{attempt}"
            assert f"boom-{attempt}" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200
