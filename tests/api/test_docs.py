"""The interactive docs work on a closed network (/docs and /redoc load every asset from the server itself), and
/openapi.json describes every request body and every response the server sends."""

from __future__ import annotations

import base64
import re
from typing import Any

import httpx
import jsonschema
import pytest
from PIL import Image

from tests.api.helpers import png_b64


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_reference_no_external_asset_and_their_assets_answer(client: httpx.Client, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    urls = re.findall(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']""", html)
    urls += re.findall(r"""url\s*:\s*['"]([^'"]+)['"]""", html)  # the spec that the page's script loads
    assert any(u.endswith(".js") for u in urls), urls  # the page does load its UI from somewhere
    external = [u for u in urls if re.match(r"^(https?:)?//", u)]
    assert external == [], external
    assert not re.search(r"https?://", html), "an absolute URL is left in the page"
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200 and asset.content, url
        if url.endswith(".js"):
            assert "javascript" in asset.headers["content-type"], (url, asset.headers["content-type"])


# -- /openapi.json describes every request body and every response ------------------------------------------

PNG_BYTES = base64.b64decode(png_b64(Image.new("L", (8, 8), 128)))
BODIES = {  # a valid JSON body per endpoint, with every optional output on
    "/generate": {"model": "tiny", "n": 2, "steps": 2, "seed": 1, "return_latents": True},
    "/invert": {"model": "tiny", "images": [base64.b64encode(PNG_BYTES).decode()], "steps": 2,
                "return_reconstruction": True},
    "/interpolate": {"model": "tiny", "start": {"seed": 1}, "end": {"seed": 2}, "frames": 2, "steps": 2,
                     "return_latents": True},
    "/edit": {"model": "tiny", "images": [base64.b64encode(PNG_BYTES).decode()], "steps": 2, "strength": 1.0,
              "return_latents": True},
}


@pytest.fixture(scope="module")
def openapi(server: str) -> dict[str, Any]:
    return httpx.get(f"{server}/openapi.json").json()


def validate(openapi: dict[str, Any], schema: dict[str, Any], instance: Any) -> None:
    """JSON Schema 2020-12 (OpenAPI 3.1's), with $refs into the document's components."""
    jsonschema.Draft202012Validator({**schema, "components": openapi["components"]}).validate(instance)


def test_invert_documents_its_json_and_its_multipart_body(openapi: dict[str, Any], client: httpx.Client) -> None:
    body = openapi["paths"]["/invert"]["post"]["requestBody"]
    assert body["required"] is True and set(body["content"]) == {"application/json", "multipart/form-data"}
    validate(openapi, body["content"]["application/json"]["schema"], BODIES["/invert"])
    form = body["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["files"] and form["properties"]["files"]["type"] == "array"
    assert form["properties"]["files"]["items"]["format"] == "binary"  # Swagger UI offers a file upload
    assert {"model", "steps", "schedule", "return_reconstruction"} <= set(form["properties"])
    # a form built from the documented fields is what the server takes
    fields = {k: v for k, v in BODIES["/invert"].items() if k != "images"}
    assert set(fields) <= set(form["properties"])
    r = client.post("/invert", files=[("files", ("a.png", PNG_BYTES, "image/png"))],
                    data={k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()})
    assert r.status_code == 200, r.text
    validate(openapi, openapi["paths"]["/invert"]["post"]["responses"]["200"]["content"]["application/json"]["schema"],
             r.json())


@pytest.mark.parametrize("path", sorted(BODIES))
def test_every_documented_response_is_what_the_server_sends(openapi: dict[str, Any], client: httpx.Client,
                                                             path: str) -> None:
    op = openapi["paths"][path]["post"]
    request_schema = op["requestBody"]["content"]["application/json"]["schema"]
    validate(openapi, request_schema, BODIES[path])
    media = op["responses"]["200"]["content"]
    assert "application/json" in media and len(media) >= 2, media
    for kind, doc in media.items():
        r = client.post(path, json=BODIES[path], headers={"accept": kind})
        assert r.status_code == 200 and r.headers["content-type"].split(";")[0] == kind, (kind, r.text[:200])
        if kind == "application/json":
            validate(openapi, doc["schema"], r.json())
        elif kind == "text/event-stream":  # documented event by event: progress events, then the result
            assert set(doc["schema"]["properties"]["event"]["enum"]) == {"progress", "result", "error", "cancelled"}
            assert r.text.startswith("event: progress") and "event: result" in r.text
        else:
            assert doc["schema"] == {"type": "string", "format": "binary"} and r.content
    errors = {
        422: client.post(path, json={**BODIES[path], "steps": 0}),
        404: client.post(path, json={**BODIES[path], "model": "nope"}),
        406: client.post(path, json=BODIES[path], headers={"accept": "text/html"}),
    }
    for status, r in errors.items():
        assert r.status_code == status, r.text
        validate(openapi, op["responses"][str(status)]["content"]["application/json"]["schema"], r.json())
