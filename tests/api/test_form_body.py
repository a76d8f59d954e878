"""A body that is not sent as JSON (an HTML form's, curl -d's) gets a 422 that says to send JSON, on the real server."""

from __future__ import annotations

import httpx
import pytest

HINT = "send a JSON object with Content-Type: application/json"


@pytest.mark.parametrize("path", ["/generate", "/invert", "/interpolate", "/jobs/generate"])
def test_a_form_body_is_told_to_send_json(client: httpx.Client, path: str) -> None:
    r = client.post(path, data={"n": "1", "steps": "5"})  # application/x-www-form-urlencoded
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["field"] == "body" and HINT in error["msg"], error
    assert "it was sent as application/x-www-form-urlencoded" in error["msg"]


def test_json_under_another_content_type_gets_the_hint_and_json_itself_none(client: httpx.Client) -> None:
    r = client.post("/generate", content=b'{"n": 1}', headers={"content-type": "text/plain"})
    assert r.status_code == 422 and HINT in r.json()["detail"][0]["msg"] and "text/plain" in r.text, r.text
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "Content-Type" not in r.text and "not valid JSON" in r.text, r.text
    r = client.post("/generate", json={"n": 0})
    assert r.status_code == 422 and "Content-Type" not in r.text, r.text
