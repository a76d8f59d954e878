"""The server's output is JSON lines only, library messages included; messages that carry no information are gone."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from diffusers.utils import logging as diffusers_logging

from app import logs
from harness.server import running_server

NO_INFORMATION = "should be kept in float32"  # diffusers says so on every dtype cast, with an empty list of modules


def test_a_bfloat16_server_writes_only_json_lines(tiny_store: Path) -> None:
    # bfloat16 and the layout timed in a spawned process: the start that printed diffusers' warning as plain text
    with running_server(tiny_store, plain=False, DDIM_DTYPE="bfloat16", DDIM_CHANNELS_LAST="auto") as url:
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"ddim-serve-{url.rsplit(':', 1)[1]}.log"
        text = log.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert any('"model tiny ready' in line for line in lines), text[-2000:]
    for line in lines:
        entry = json.loads(line)  # raises on a plain-text line
        assert {"ts", "level", "logger", "msg"} <= set(entry)
    assert NO_INFORMATION not in text


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    diffusers_root = logging.getLogger("diffusers")
    # an app made in this process by an earlier test may have captured warnings already, before pytest's own
    # per-test capture: start from an uncaptured state, so that logs.setup captures them afresh
    logging.captureWarnings(False)
    yield
    root.handlers[:], root.level = handlers, level
    logging.captureWarnings(False)
    diffusers_root.propagate = False
    diffusers_logging.enable_default_handler()


def test_library_warnings_become_json_lines(root_logging: None, capfd: pytest.CaptureFixture[str]) -> None:
    logs.setup(json_lines=True)
    diffusers_logging.get_logger("diffusers.models.modeling_utils").warning("a diffusers warning")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a Python warning", UserWarning, stacklevel=1)
    err = capfd.readouterr().err
    entries = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert [(e["logger"], e["level"]) for e in entries] == [("diffusers.models.modeling_utils", "warning"),
                                                            ("py.warnings", "warning")], err
    assert "a diffusers warning" in entries[0]["msg"] and "a Python warning" in entries[1]["msg"]


def test_an_exception_is_logged_in_fields_of_its_own(root_logging: None, capfd: pytest.CaptureFixture[str]) -> None:
    logs.setup(json_lines=True)
    try:
        raise ValueError("the cause")
    except ValueError:
        logging.getLogger("ddim.test").exception("something failed")
    entry = json.loads(capfd.readouterr().err.strip())
    assert entry["msg"] == "something failed" and entry["exc_type"] == "ValueError"
    assert entry["exc_message"] == "the cause" and entry["traceback"].startswith("Traceback")


def _log_lines(url: str) -> list[dict]:
    text = (Path(os.environ.get("TMPDIR", "/tmp")) / f"ddim-serve-{url.rsplit(':', 1)[1]}.log").read_text()
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_requests_and_jobs_log_what_an_operator_needs(cond_store: Path) -> None:
    import httpx

    from tests.api.helpers import wait_for

    with running_server(cond_store, DDIM_DEFAULT_MODEL="tiny-cond") as url, httpx.Client(base_url=url) as http:
        assert http.post("/generate", json={"steps": "many"}).status_code == 422
        assert http.post("/generate", json={"model": "tiny-cond", "guidance_scale": 2, "steps": 2}).status_code == 422
        job = http.post("/jobs/generate", json={"model": "tiny-flow", "n": 2, "steps": 3, "seed": 1},
                        headers={"X-Request-ID": "job-request-1"}).json()
        wait_for(http, job["id"])
        lines = _log_lines(url)
    requests = [e for e in lines if e["msg"] == "request"]
    schema_422, engine_422 = requests[0], requests[1]
    assert schema_422["method"] == "POST" and schema_422["status"] == 422 and schema_422["model"] == "tiny-cond"
    assert schema_422["reason"].startswith("steps: ")
    assert engine_422["model"] == "tiny-cond" and engine_422["reason"].startswith("guidance_scale: ")
    created = next(e for e in lines if e["msg"] == "job created")
    assert created["request_id"] == "job-request-1" and created["job_id"] == job["id"]
    assert (created["model"], created["n"], created["steps"]) == ("tiny-flow", 2, 3)
    ended = next(e for e in lines if e["msg"] == "job succeeded")
    assert ended["job_id"] == job["id"] and ended["run_seconds"] > 0 and "queue_seconds" in ended
