"""Every PromQL query of the Grafana dashboard returns series from a real Prometheus scraping ddim-serve.

The service runs on loopback over the tiny store; a real Prometheus scrapes it with the repo's
deploy/prometheus/prometheus.yml (target and interval rewritten); a short load goes through every
endpoint, with one 429 and some invalid requests; then each panel's query, its Grafana variables
substituted, goes through Prometheus' HTTP API.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

from harness.server import free_port, running_server, stop

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy/grafana/dashboards/ddim-serve.json"
PROVISIONED = REPO / "deploy/grafana/provisioning/datasources/prometheus.yml"
PROMETHEUS = shutil.which("prometheus")
# Grafana's built-in interval variables, as Grafana would set them for a short time range; the test's
# Prometheus scrapes every second, so a 1m window holds many samples of every series.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m", "__interval_ms": "15000",
            "__range_s": "300"}
MAX_QUEUE = 8


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(d: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])  # panels inside collapsed rows


def queries(d: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every target of every panel that has a PromQL expression."""
    return [(p["title"], t) for p in panels(d) for t in p.get("targets", []) if t.get("expr")]


def substitute(expr: str, d: dict[str, Any]) -> str:
    """Replace $var, ${var} and ${var:fmt} as Grafana would: built-ins, and 'All' for template variables."""
    values = dict(BUILTINS)
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            assert v.get("includeAll") and v.get("allValue"), f"variable {v['name']} needs an 'All' value"
            values[v["name"]] = v["allValue"]

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        assert name in values, f"unknown Grafana variable ${name} in {expr}"
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", one, expr)


def test_panels_use_the_provisioned_datasource() -> None:
    """Panels and targets name the datasource variable, whose default is the uid that provisioning creates."""
    d = dashboard()
    uid = yaml.safe_load(PROVISIONED.read_text())["datasources"][0]["uid"]
    variable = next(v for v in d["templating"]["list"] if v["type"] == "datasource")
    assert variable["query"] == "prometheus" and variable["current"]["value"] == uid
    names = {f"${variable['name']}", f"${{{variable['name']}}}", uid}
    for p in panels(d):
        if p["type"] == "row":
            continue
        for thing in (p, *p.get("targets", [])):
            assert thing["datasource"]["uid"] in names, f"panel {p['title']!r} uses another datasource"
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all("$" not in substitute(t["expr"], d) for _, t in queries(d))


@contextmanager
def running_prometheus(target: str, workdir: Path) -> Iterator[str]:
    """A Prometheus on loopback scraping target every second, with the repo's config otherwise."""
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ddim-serve"]
    job["static_configs"] = [{"targets": [target]}]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    assert PROMETHEUS
    with open(workdir / "prometheus.log", "w+") as log:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={workdir / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "GOMAXPROCS": "1"})
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: ready(url), f"Prometheus not ready; its log: {workdir / 'prometheus.log'}", proc)
            yield url
        finally:
            stop(proc)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_for(condition: Any, message: str, proc: subprocess.Popen[Any] | None = None,
             timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, message
        assert time.monotonic() < deadline, message
        time.sleep(0.25)


def query(prometheus: str, expr: str) -> dict[str, Any]:
    return httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()


def png_b64(size: int = 8) -> str:
    buf = io.BytesIO()
    Image.new("L", (size, size), 128).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def drive_load(url: str) -> int:
    """A short load over every endpoint and both models, with one 429 and some invalid requests.

    Returns the number of requests sent."""
    ok = [("/generate", {"model": "tiny", "n": 2, "steps": 4, "seed": 0}),
          ("/generate", {"model": "tiny-rgb", "n": 1, "steps": 4, "eta": 1.0, "seed": 1}),
          ("/invert", {"model": "tiny", "images": [png_b64()], "steps": 4}),
          ("/interpolate", {"model": "tiny", "start": {"seed": 1}, "end": {"seed": 2}, "frames": 3, "steps": 4})]
    refused = [("/generate", {"model": "tiny", "n": 1, "steps": 4}, 429),  # while a long request fills the queue
               ("/generate", {"model": "tiny", "steps": 0}, 422),
               ("/invert", {"model": "tiny", "images": []}, 422),
               ("/interpolate", {"model": "tiny", "start": {"seed": 1}, "end": {"seed": 2}, "frames": 1}, 422),
               ("/generate", {"model": "no-such-model"}, 404)]
    with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(1) as pool:
        for path, body in ok:
            r = client.post(path, json=body)
            assert r.status_code == 200, (path, r.status_code, r.text)
        filler = pool.submit(client.post, "/generate", json={"model": "tiny", "n": MAX_QUEUE, "steps": 1000})
        wait_for(lambda: any(m["active"] for m in client.get("/models").json()["models"]), "the filler never ran")
        for path, body, status in refused:
            r = client.post(path, json=body)
            assert r.status_code == status, (path, body, r.status_code, r.text)
            if status == 429:
                assert int(r.headers["retry-after"]) >= 1
        assert filler.result().status_code == 200
        # a job, a cancelled job and a deadline: the jobs row's series (jobs are not /generate requests)
        done = client.post("/jobs/generate", json={"model": "tiny", "steps": 4}).json()
        cancelled = client.post("/jobs/generate", json={"model": "tiny", "steps": 1000}).json()
        wait_for(lambda: client.get(f"/jobs/{done['id']}").json()["status"] == "succeeded", "the job never finished")
        assert client.delete(f"/jobs/{cancelled['id']}").json()["status"] == "cancelled"
        late = client.post("/generate", json={"model": "tiny", "n": 2, "steps": 1000, "timeout_s": 0.1})
        assert late.status_code == 504, late.text
    return len(ok) + len(refused) + 2


def legend_labels(target: dict[str, Any]) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))


@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary on PATH (apt-get install prometheus; CI does)")
def test_every_dashboard_query_returns_series(tiny_store: Path, tmp_path: Path) -> None:
    d = dashboard()
    exprs = [(title, substitute(t["expr"], d), legend_labels(t)) for title, t in queries(d)]
    assert len(exprs) >= 20
    with running_server(tiny_store, DDIM_MAX_QUEUE=str(MAX_QUEUE)) as url, \
            running_prometheus(url.removeprefix("http://"), tmp_path) as prometheus:
        wait_for(lambda: query(prometheus, 'up{job="ddim-serve"} == 1')["data"]["result"],
                 "Prometheus never scraped ddim-serve")
        sent = drive_load(url)
        # the last scrape has seen every request, and one more scrape gives each new series two samples
        wait_for(lambda: [s for s in query(prometheus, "sum(ddim_request_duration_seconds_count)")["data"]["result"]
                          if float(s["value"][1]) == sent], "Prometheus never saw the whole load")
        seen = query(prometheus, "time()")["data"]["result"][0]
        wait_for(lambda: float(query(prometheus, "timestamp(up{job='ddim-serve'})")["data"]["result"][0]["value"][1])
                 > float(seen) + 1, "Prometheus stopped scraping")

        failures = []
        for title, expr, labels in exprs:
            answer = query(prometheus, expr)
            if answer["status"] != "success":
                failures.append(f"{title}: {expr}: {answer.get('errorType')}: {answer.get('error')}")
            elif not answer["data"]["result"]:
                failures.append(f"{title}: {expr}: no series")
            else:
                missing = {lb for s in answer["data"]["result"] for lb in labels - set(s["metric"])}
                if missing:
                    failures.append(f"{title}: {expr}: legend names labels the result lacks: {sorted(missing)}")
        assert not failures, "dashboard queries that fail:\n" + "\n".join(failures)

        # the model variable's query (label_values(metric, label)) lists both models
        variable = next(v for v in d["templating"]["list"] if v["name"] == "model")
        metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"]).groups()
        found = {s["metric"][label] for s in query(prometheus, f"group by ({label}) ({metric})")["data"]["result"]}
        assert found == {"tiny", "tiny-rgb"}
        rejected = query(prometheus, 'sum by (reason) (ddim_requests_rejected_total)')["data"]["result"]
        assert {s["metric"]["reason"] for s in rejected} >= {"queue_full", "invalid", "unknown_model"}
