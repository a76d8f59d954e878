"""Which requests the Serve proxy sends again after a replica died: only those whose answer would be the same."""

from __future__ import annotations

import json

import pytest

from app.distributed.proxy import _retryable


def _scope(path: str, content_type: bytes = b"application/json", accept: bytes = b"application/json") -> dict:
    return {"method": "POST", "path": path, "headers": [(b"content-type", content_type), (b"accept", accept)]}


@pytest.mark.parametrize("path,body,retried", [
    ("/edit", {"images": ["x"]}, True),  # eta 0: deterministic
    ("/edit", {"images": ["x"], "eta": 0.5, "seed": 1}, True),
    ("/edit", {"images": ["x"], "eta": 0.5}, False),  # a random seed: another answer
    ("/generate", {"n": 1}, False),
    ("/generate", {"n": 1, "seed": 3}, True),
    ("/invert", {"images": ["x"]}, True),
])
def test_only_reproducible_requests_are_retried(path: str, body: dict, retried: bool) -> None:
    assert _retryable(_scope(path), json.dumps(body).encode()) is retried


def test_edit_uploads_and_event_streams() -> None:
    form = b'--b\r\nContent-Disposition: form-data; name="strength"\r\n\r\n0.5\r\n--b--\r\n'
    assert _retryable(_scope("/edit", b"multipart/form-data; boundary=b"), form)
    eta = form.replace(b'"strength"', b'"eta"')
    assert not _retryable(_scope("/edit", b"multipart/form-data; boundary=b"), eta)
    assert not _retryable(_scope("/edit", accept=b"text/event-stream"), b"{}")
