"""The Grafana dashboard's queries, and a real Prometheus to run them on (tests/deploy, tests/distributed).

Grafana's variables are substituted as Grafana would for a short time range, with 'All' for template
variables; the Prometheus runs on loopback, scraping every second.
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml
from PIL import Image

from harness.server import free_port, stop

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy/grafana/dashboards/ddim-serve.json"
PROMETHEUS = shutil.which("prometheus")
# Grafana's built-in interval variables, as Grafana would set them for a short time range; the tests'
# Prometheus scrapes every second, so a 1m window holds many samples of every series.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m", "__interval_ms": "15000",
            "__range_s": "300"}
NO_PROMETHEUS = "no prometheus binary on PATH (apt-get install prometheus; CI does)"


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


def legend_labels(target: dict[str, Any]) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))


def variable_query(d: dict[str, Any], name: str) -> tuple[str, str]:
    """(metric, label) of a label_values(metric, label) variable."""
    variable = next(v for v in d["templating"]["list"] if v["name"] == name)
    match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
    assert match and variable["query"]["query"] == variable["definition"], variable
    return match.group(1), match.group(2)


def scrape_config(job: str, **where: Any) -> dict[str, Any]:
    """The repo's deploy/prometheus/prometheus.yml, scraping every second, with its one job renamed and pointed
    where the test says (static_configs=..., or http_sd_configs=...)."""
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (scrape,) = config["scrape_configs"]
    scrape.pop("static_configs")
    scrape.update(job_name=job, **where)
    return config


@contextmanager
def running_prometheus(config: dict[str, Any], workdir: Path) -> Iterator[str]:
    """A real Prometheus on loopback with this config; yields its URL once ready."""
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    assert PROMETHEUS, NO_PROMETHEUS
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


def wait_for(condition: Callable[[], Any], message: str, proc: subprocess.Popen[Any] | None = None,
             timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, message
        assert time.monotonic() < deadline, message
        time.sleep(0.25)


def query(prometheus: str, expr: str, at: float | None = None) -> dict[str, Any]:
    """Prometheus' answer to an instant query, now or at a given time."""
    params = {"query": expr, **({"time": str(at)} if at is not None else {})}
    return httpx.get(f"{prometheus}/api/v1/query", params=params, timeout=10).json()


def series(prometheus: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    answer = query(prometheus, expr, at)
    assert answer["status"] == "success", (expr, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def series_over(prometheus: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    """Prometheus' answer to a range query, one point a second from start to end."""
    params = {"query": expr, "start": str(start), "end": str(end), "step": "1"}
    answer = httpx.get(f"{prometheus}/api/v1/query_range", params=params, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def scraped_after(prometheus: str, job: str) -> Callable[[], bool]:
    """A condition: every target of job has been scraped since now (so each new series has its samples)."""
    now = time.time()  # Prometheus runs on this machine's clock
    return lambda: bool(targets := series(prometheus, f'timestamp(up{{job="{job}"}})')) and all(
        float(s["value"][1]) > now + 1 for s in targets)


def failing_queries(prometheus: str, d: dict[str, Any], optional_labels: frozenset[str] = frozenset()) -> list[str]:
    """Each dashboard query that errs, returns no series, or returns series that lack a label its legend names
    (optional_labels: labels this deployment does not have)."""
    failures = []
    for title, target in queries(d):
        expr, labels = substitute(target["expr"], d), legend_labels(target) - optional_labels
        answer = query(prometheus, expr)
        if answer["status"] != "success":
            failures.append(f"{title}: {expr}: {answer.get('errorType')}: {answer.get('error')}")
        elif not answer["data"]["result"]:
            failures.append(f"{title}: {expr}: no series")
        else:
            missing = {lb for s in answer["data"]["result"] for lb in labels - set(s["metric"])}
            if missing:
                failures.append(f"{title}: {expr}: legend names labels the result lacks: {sorted(missing)}")
    return failures


def png_b64(size: int = 8) -> str:
    buf = io.BytesIO()
    Image.new("L", (size, size), 128).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def drive_load(url: str, max_queue: int | None) -> int:
    """A short load over every endpoint and both models, with some invalid requests, and one 429 from a full
    queue when the server's DDIM_MAX_QUEUE is max_queue (None: no 429).

    Returns the number of requests sent."""
    ok = [("/generate", {"model": "tiny", "n": 2, "steps": 4, "seed": 0}),
          ("/generate", {"model": "tiny-rgb", "n": 1, "steps": 4, "eta": 1.0, "seed": 1}),
          ("/invert", {"model": "tiny", "images": [png_b64()], "steps": 4}),
          ("/interpolate", {"model": "tiny", "start": {"seed": 1}, "end": {"seed": 2}, "frames": 3, "steps": 4})]
    refused = [("/generate", {"model": "tiny", "n": 1, "steps": 4}, 429)] if max_queue else []  # queue filled
    refused += [("/generate", {"model": "tiny", "steps": 0}, 422),
                ("/invert", {"model": "tiny", "images": []}, 422),
                ("/interpolate", {"model": "tiny", "start": {"seed": 1}, "end": {"seed": 2}, "frames": 1}, 422),
                ("/generate", {"model": "no-such-model"}, 404)]
    with httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(1) as pool:
        for path, body in ok:
            r = client.post(path, json=body)
            assert r.status_code == 200, (path, r.status_code, r.text)
        if max_queue:
            filler = pool.submit(client.post, "/generate", json={"model": "tiny", "n": max_queue, "steps": 1000})
            wait_for(lambda: any(m["active"] for m in client.get("/models").json()["models"]), "the filler never ran")
        for path, body, status in refused:
            r = client.post(path, json=body)
            assert r.status_code == status, (path, body, r.status_code, r.text)
            if status == 429:
                assert int(r.headers["retry-after"]) >= 1
        if max_queue:
            assert filler.result().status_code == 200
        # a job, a cancelled job and a deadline: the jobs row's series (jobs are not /generate requests)
        done = client.post("/jobs/generate", json={"model": "tiny", "steps": 4}).json()
        cancelled = client.post("/jobs/generate", json={"model": "tiny", "steps": 1000}).json()
        wait_for(lambda: client.get(f"/jobs/{done['id']}").json()["status"] == "succeeded", "the job never finished")
        assert client.delete(f"/jobs/{cancelled['id']}").json()["status"] == "cancelled"
        late = client.post("/generate", json={"model": "tiny", "n": 2, "steps": 1000, "timeout_s": 0.1})
        assert late.status_code == 504, late.text
    return len(ok) + len(refused) + 2
