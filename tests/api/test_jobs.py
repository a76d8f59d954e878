"""Jobs on a real server: 202 + Location, state, result with Accept negotiation, cancel, event streams with
previews, jobs that outlive their stream's connection, deadlines, and the bounded store."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx

from harness.server import running_server
from tests.api.helpers import npy, png, sse_events, wait_for

LONG = {"steps": 1000, "n": 4, "seed": 1}  # ~seconds on the tiny model: long enough to catch it running


def test_a_job_answers_202_then_gives_the_synchronous_answer(client: httpx.Client) -> None:
    body = {"n": 2, "steps": 8, "seed": 3, "return_latents": True}
    r = client.post("/jobs/generate", json=body)
    assert r.status_code == 202, r.text
    state = r.json()
    assert r.headers["location"] == f"/jobs/{state['id']}"
    assert re.fullmatch(r"[0-9a-f]{32}", state["id"])  # 128 random bits
    assert state["task"] == "generate" and state["status"] in ("queued", "running", "succeeded")
    assert state["progress"]["steps"] == 8 and "created_at" in state
    done = wait_for(client, state["id"])
    assert done["status"] == "succeeded" and done["progress"] == {"step": 8, "steps": 8}
    assert done["finished_at"] >= done["started_at"] >= done["created_at"] - 1
    assert client.get(f"/jobs/{state['id']}/result").json() == client.post("/generate", json=body).json()
    as_png = client.get(f"/jobs/{state['id']}/result", headers={"accept": "image/png"})
    assert as_png.headers["content-type"] == "image/png" and png(as_png.content).size[0] > 8
    as_npy = client.get(f"/jobs/{state['id']}/result", headers={"accept": "application/x-npy"})
    assert npy(as_npy.content).shape == (2, 1, 8, 8)
    assert client.get(f"/jobs/{state['id']}/result", headers={"accept": "image/gif"}).status_code == 406


def test_invert_and_interpolate_jobs(client: httpx.Client) -> None:
    image = client.post("/generate", json={"steps": 4, "seed": 2}, headers={"accept": "image/png"}).content
    r = client.post("/jobs/invert", files={"files": ("a.png", image, "image/png")},
                    data={"steps": "6", "return_reconstruction": "true"})
    assert r.status_code == 202, r.text
    assert r.json()["progress"]["steps"] == 12  # inversion, then the reconstruction
    wait_for(client, r.json()["id"])
    out = client.get(r.headers["location"] + "/result").json()
    assert npy(out["x_T"]).shape == (1, 1, 8, 8) and len(out["reconstruction_mse"]) == 1
    r = client.post("/jobs/interpolate", json={"start": {"seed": 1}, "end": {"seed": 2}, "frames": 3, "steps": 4})
    wait_for(client, r.json()["id"])
    gif = client.get(r.headers["location"] + "/result", headers={"accept": "image/gif"})
    assert gif.headers["content-type"] == "image/gif"


def test_cancel_frees_the_batch_and_leaves_finished_jobs_alone(client: httpx.Client) -> None:
    job = client.post("/jobs/generate", json=LONG).json()
    wait_for(client, job["id"], ("running",))
    assert client.get(f"/jobs/{job['id']}/result").status_code == 409  # unfinished
    r = client.delete(f"/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert 0 < r.json()["progress"]["step"] < 1000
    assert client.get(f"/jobs/{job['id']}/result").status_code == 409
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert models["tiny"]["active"] == 0 and models["tiny"]["waiting"] == 0  # its samples left the batch
    quick = client.post("/jobs/generate", json={"steps": 2}).json()
    wait_for(client, quick["id"])
    assert client.delete(f"/jobs/{quick['id']}").json()["status"] == "succeeded"
    assert client.get(f"/jobs/{quick['id']}/result").status_code == 200
    assert client.get("/jobs/0123456789abcdef0123456789abcdef").status_code == 404


def test_events_stream_progress_with_previews_and_end_with_the_result(client: httpx.Client) -> None:
    job = client.post("/jobs/generate", json={"n": 2, "steps": 6, "seed": 5, "preview_every": 2}).json()
    with client.stream("GET", f"/jobs/{job['id']}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"progress"}
    steps = [d["step"] for k, d in events if k == "progress"]
    assert steps == sorted(steps) and steps[-1] == 6
    previews = [d for k, d in events if k == "progress" and "preview" in d]
    assert previews and all(d["step"] % 2 == 0 for d in previews)
    assert png(previews[-1]["preview"]).size == png(client.post("/generate", json={"n": 2, "steps": 6, "seed": 5},
                                                                headers={"accept": "image/png"}).content).size
    assert events[-1][1] == client.get(f"/jobs/{job['id']}/result").json()
    # a late subscriber gets the current state, then the end
    late = list(sse_events(client.get(f"/jobs/{job['id']}/events")))
    assert [k for k, _ in late] == ["progress", "result"] and late[0][1]["step"] == 6


def test_a_job_outlives_its_event_stream(client: httpx.Client) -> None:
    job = client.post("/jobs/generate", json={**LONG, "steps": 300}).json()
    with client.stream("GET", f"/jobs/{job['id']}/events") as r:
        next(sse_events(r))  # one event, then hang up
    assert wait_for(client, job["id"])["status"] == "succeeded"


def test_synchronous_requests_stream_the_same_events(client: httpx.Client) -> None:
    body = {"n": 1, "steps": 5, "seed": 8}
    with client.stream("POST", "/generate", json=body, headers={"accept": "text/event-stream"}) as r:
        events = list(sse_events(r))
    assert [k for k, _ in events][-1] == "result" and events[-1][1] == client.post("/generate", json=body).json()
    with client.stream("POST", "/generate", json={"steps": 3, "model": "nope"},
                       headers={"accept": "text/event-stream"}) as r:
        assert r.status_code == 404  # a request refused before it runs is a plain error, not a stream


def test_deadlines_give_504_and_fail_jobs(client: httpx.Client) -> None:
    r = client.post("/generate", json={**LONG, "timeout_s": 0.2})
    assert r.status_code == 504 and r.json()["detail"].startswith("deadline exceeded")
    job = client.post("/jobs/generate", json={**LONG, "timeout_s": 0.2}).json()
    state = wait_for(client, job["id"])
    assert state["status"] == "failed" and state["error"]["status"] == 504
    r = client.get(f"/jobs/{job['id']}/result")
    assert r.status_code == 504 and "deadline exceeded" in r.json()["detail"]
    metrics = client.get("/metrics").text
    assert re.search(r'^ddim_deadline_expired_total\{model="tiny"\} [1-9]', metrics, re.M)
    assert re.search(r'^ddim_jobs\{status="failed"\} [1-9]', metrics, re.M)
    assert re.search(r'^ddim_time_to_first_progress_seconds_count\{model="tiny"\} [1-9]', metrics, re.M)


def test_the_job_store_is_bounded_and_forgets_after_its_ttl(tiny_store: Path) -> None:
    with running_server(tiny_store, DDIM_MAX_JOBS="2", DDIM_JOB_TTL_SECONDS="1") as url, \
            httpx.Client(base_url=url, timeout=60) as c:
        a, b = (c.post("/jobs/generate", json={"steps": 3}).json() for _ in range(2))
        full = c.post("/jobs/generate", json={"steps": 3})
        assert full.status_code == 429 and "DDIM_MAX_JOBS" in full.json()["detail"] and full.headers["retry-after"]
        for job in (a, b):
            wait_for(c, job["id"])
        for _ in range(100):  # bounded: the TTL is 1 s
            if c.get(f"/jobs/{a['id']}").status_code == 404:
                break
            time.sleep(0.05)
        assert c.get(f"/jobs/{a['id']}/result").status_code == 404
        assert c.post("/jobs/generate", json={"steps": 3}).status_code == 202  # room again


def test_a_cancelled_job_is_counted(client: httpx.Client) -> None:
    job = client.post("/jobs/generate", json=LONG).json()
    client.delete(f"/jobs/{job['id']}")
    assert re.search(r'^ddim_requests_cancelled_total\{model="tiny"\} [1-9]', client.get("/metrics").text, re.M)
