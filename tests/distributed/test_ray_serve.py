"""ddim-serve-ray on a real local Ray cluster: the same API through Serve's proxy, over two replicas of tiny models.

One cluster for the module (2 CPUs, no dashboard, loopback only); `ddim-serve-ray` joins it as its own process, as
an operator's would, and is stopped with SIGTERM at the end. Skipped without the ray extra, unless DDIM_REQUIRE_RAY=1
(CI), where a missing Ray fails instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from harness.server import ray_serve_process, running_server
from tests.api.helpers import npy, sse_events
from tests.deploy.dashboard import (
    NO_PROMETHEUS,
    PROMETHEUS,
    dashboard,
    drive_load,
    failing_queries,
    running_prometheus,
    scrape_config,
    scraped_after,
    series,
    series_over,
    substitute,
    variable_query,
    wait_for,
)

try:
    import ray
except ImportError:
    if os.environ.get("DDIM_REQUIRE_RAY") == "1":
        raise
    pytest.skip("ray is not installed: pip install -e '.[dev,ray]' (DDIM_REQUIRE_RAY=1 makes this a failure)",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
APP = "ddim"
PINS = {"DDIM_DTYPE": "float32", "DDIM_CHANNELS_LAST": "false", "DDIM_THREADS": "1", "OMP_NUM_THREADS": "1",
        "DDIM_MAX_BATCH_SIZE": "16", "DDIM_DEFAULT_MODEL": "tiny", "DDIM_DRAIN_SECONDS": "5"}


TEMP_DIR = [""]  # the module's cluster's, where its raylet's sockets are


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray cluster (this process is its head's driver); yields its address."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    TEMP_DIR[0] = temp
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=temp, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_store(tmp_path_factory: pytest.TempPathFactory, tiny_store: Path) -> Path:
    """The tiny store and a folder that cannot load (its weights cut short): replicas serve the others (issue 24)."""
    store = tmp_path_factory.mktemp("ray_store")
    for name in ("tiny", "tiny-rgb"):
        shutil.copytree(tiny_store / name, store / name)
    shutil.copytree(tiny_store / "tiny", store / "truncated")
    weights = store / "truncated" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return store


@pytest.fixture(scope="module")
def serving(cluster: str, ray_store: Path) -> Iterator[tuple[str, subprocess.Popen]]:  # type: ignore[type-arg]
    """`ddim-serve-ray --replicas 2` joined to the cluster; yields (the proxy's URL, the process). The Serve tuning
    is left to the command (not inherited from the shell running the tests)."""
    from app.distributed.cli import SERVE_TUNING

    args = ["--address", cluster, "--model-store", str(ray_store), "--replicas", "2", "--num-cpus", "0.5",
            "--max-ongoing-requests", "8", "--max-queued-requests", "16"]
    with ray_serve_process(args, {**PINS, **dict.fromkeys(SERVE_TUNING)}, ready_timeout=180, stop_timeout=60) as served:
        yield served


@pytest.fixture
def proxy(serving: tuple[str, subprocess.Popen]) -> Iterator[httpx.Client]:  # type: ignore[type-arg]
    with httpx.Client(base_url=serving[0], timeout=120) as c:
        yield c


def directory() -> ray.actor.ActorHandle:
    return ray.get_actor(f"ddim-jobs-{APP}", namespace="ddim-serve")


def replicas() -> dict[str, str]:
    """Replica id -> its internal address, from the job directory."""
    return dict(ray.get(directory().replicas.remote()))


def generate(client: httpx.Client, body: dict) -> httpx.Response:
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r


def test_serve_yaml_builds_the_application() -> None:
    """deploy/ray/serve.yaml is a valid Serve config whose import path and args build the application."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from app.distributed.deployment import app_builder

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy/ray/serve.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "app.distributed.deployment:app_builder"
    assert config.logging_config is not None and config.logging_config.enable_access_log is False
    assert app_builder(application.args) is not None
    with pytest.raises(ValueError, match="replicaz"):
        app_builder({**application.args, "replicaz": 2})


def test_serve_runs_tuned_for_throughput(serving: tuple[str, subprocess.Popen]) -> None:  # type: ignore[type-arg]
    """On a cluster it joined, ddim-serve-ray's Serve tuning reaches the proxy and every replica (gRPC between them
    only works when both agree), through the runtime environments it gives the controller and the replicas."""
    from app.distributed.cli import SERVE_TUNING

    processes = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            processes[cmdline.parent.name] = (cmdline.read_bytes(), (cmdline.parent / "environ").read_bytes())
        except OSError:  # gone meanwhile
            continue
    (raylet,) = [pid for pid, (cmd, _) in processes.items()  # this module's cluster's, not another's on the machine
                 if b"/raylet" in cmd.split(b"\0")[0] and TEMP_DIR[0].encode() in cmd]
    seen: dict[str, int] = {}
    for cmd, environ in processes.values():
        name = cmd.split(b"\0")[0].decode()
        env = dict(e.decode(errors="replace").split("=", 1) for e in environ.split(b"\0") if b"=" in e)
        if env.get("RAY_RAYLET_PID") == raylet and name.startswith(
                ("ray::ProxyActor", "ray::ServeReplica", "ray::ServeController")):
            assert {k: env.get(k) for k in SERVE_TUNING} == SERVE_TUNING, name
            seen[name.split(":")[2]] = seen.get(name.split(":")[2], 0) + 1
    assert seen == {"ProxyActor": 1, "ServeController": 1, "ServeReplica": 2}, seen
    doc = (ROOT / "docs/ray.md").read_text()  # operators of serve deploy / KubeRay set them from the doc
    assert [f"{k}={v}" for k, v in SERVE_TUNING.items() if f"`{k}={v}`" not in doc] == []


SEEDED = [{"n": 3, "steps": 8, "eta": 0.0, "seed": 11, "return_latents": True},
          {"n": 2, "steps": 6, "eta": 1.0, "seed": 5, "return_latents": True}]


def test_answers_equal_the_single_servers_on_every_replica(proxy: httpx.Client, ray_store: Path) -> None:
    """Answers, /models (the failed model listed as on one server) and errors (a 424 for the failed model too)."""
    bad = [{"steps": 0}, {"model": "nope"}, {"model": "truncated", "steps": 2}]
    with running_server(ray_store, DDIM_DEFAULT_MODEL="tiny") as url, httpx.Client(base_url=url, timeout=120) as one:
        expected = [generate(one, body).json() for body in SEEDED]
        single_models = one.get("/models").json()
        single_errors = [one.post("/generate", json=body) for body in bad]
    assert [e.status_code for e in single_errors] == [422, 404, 424]
    seen: set[str] = set()
    for _ in range(20):  # until both replicas have answered
        for body, want in zip(SEEDED, expected):
            r = generate(proxy, body)
            seen.add(r.headers["x-replica-id"])
            got = r.json()
            assert got["images"] == want["images"]
            for key in ("x_T", "x_0"):
                np.testing.assert_array_equal(npy(got[key]), npy(want[key]))
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen
    assert proxy.get("/models").json() == single_models
    assert [m["status"] for m in single_models["models"]] == ["ready", "ready", "failed"]
    for want, got in zip(single_errors, [proxy.post("/generate", json=body) for body in bad]):
        assert (got.status_code, got.json()) == (want.status_code, want.json())
        assert got.headers["x-replica-id"] in seen


def test_concurrent_load_reaches_both_replicas(proxy: httpx.Client) -> None:
    bodies = [{"n": 2, "steps": 30, "seed": i} for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda b: proxy.post("/generate", json=b, headers={"accept": "application/x-npy"}),
                                  bodies))
    assert [r.status_code for r in responses] == [200] * 12
    served = {r.headers["x-replica-id"] for r in responses}
    assert served == set(replicas()), (served, replicas())
    assert len(served) == 2
    targets = proxy.get("/metrics/targets").json()  # Prometheus scrapes each replica, labelled with its id
    assert sorted(t["labels"]["replica"] for t in targets) == sorted(served)
    for target in targets:
        text = httpx.get(f"http://{target['targets'][0]}/metrics", timeout=30).text
        images = re.search(r'^ddim_images_total\{endpoint="generate",model="tiny"\} ([0-9.e+]+)$', text, re.M)
        assert images is not None and float(images.group(1)) >= 2, target


@pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)
def test_the_dashboard_over_replicas_on_a_real_prometheus(proxy: httpx.Client, tmp_path: Path) -> None:
    """A real Prometheus configured as docs/ray.md says finds every replica at /metrics/targets; every dashboard
    query returns series, the per-replica panels one per replica, labelled; the replica variable lists them; the
    totals are the sums over replicas; choosing one replica narrows a panel to it."""
    import yaml

    block = re.search(r"```yaml\n(scrape_configs:.*?)```", (ROOT / "docs/ray.md").read_text(), re.S)
    assert block, "docs/ray.md lost its scrape config"
    (job,) = yaml.safe_load(block.group(1))["scrape_configs"]
    job["http_sd_configs"][0].update(url=f"{proxy.base_url}/metrics/targets", refresh_interval="1s")
    job["scrape_interval"] = "1s"
    name = job.pop("job_name")
    live = {t["labels"]["replica"] for t in proxy.get("/metrics/targets").json()}
    assert len(live) == 2, live
    with running_prometheus(scrape_config(name, **job), tmp_path) as prometheus:
        wait_for(lambda: len(series(prometheus, f'up{{job="{name}"}} == 1')) == 2, "Prometheus never found both")
        started = time.time()
        drive_load(str(proxy.base_url), max_queue=None)
        with ThreadPoolExecutor(12) as pool:  # both replicas busy at once
            busy = list(pool.map(lambda i: proxy.post("/generate", json={"n": 2, "steps": 30, "seed": i}), range(12)))
        assert {r.headers["x-replica-id"] for r in busy} == live
        wait_for(scraped_after(prometheus, name), "Prometheus stopped scraping")

        d = dashboard()
        failures = failing_queries(prometheus, d)
        assert not failures, "dashboard queries that fail:\n" + "\n".join(failures)
        metric, label = variable_query(d, "replica")
        assert {s["metric"][label] for s in series(prometheus, f"group by ({label}) ({metric})")} == live

        by_title = {p["title"]: p["targets"][0]["expr"] for p in d["panels"] if p.get("targets")}
        by_replica = substitute(by_title["Sample-steps/s by replica"], d)

        def busy_instants() -> list[float]:  # settled instants (no scrape in flight adds to them) since the load
            # began at which the panel shows every replica at work. A busy replica's 1 s scrapes can time out (CI),
            # so its counter may have only flat samples in the window at any one instant: look over the whole span.
            end = time.time() - 3
            if end <= started:
                return []
            span = series_over(prometheus, by_replica, started, end)
            rates: dict[float, dict[str, float]] = {}
            for s in span:
                for t, v in s["values"]:
                    rates.setdefault(float(t), {})[s["metric"]["replica"]] = float(v)
            return [t for t, r in sorted(rates.items()) if set(r) == live and all(v > 0 for v in r.values())]

        instants: list[float] = []

        def found() -> bool:
            instants[:] = busy_instants()
            return bool(instants)

        wait_for(found, "no instant at which every replica's sample-steps had a positive rate")
        at = instants[-1]
        total = series(prometheus, substitute(by_title["Sample-steps/s"], d), at)
        per_replica = series(prometheus, by_replica, at)
        assert {s["metric"]["replica"] for s in per_replica} == live
        values = {s["metric"]["replica"]: float(s["value"][1]) for s in per_replica}
        assert all(v > 0 for v in values.values()), values
        assert float(total[0]["value"][1]) == pytest.approx(sum(values.values()), rel=1e-9)
        one = sorted(live)[0]
        narrowed = substitute(by_title["Sample-steps/s"].replace("$replica", one), d)
        assert float(series(prometheus, narrowed, at)[0]["value"][1]) == pytest.approx(values[one], rel=1e-9)


def test_jobs_are_read_and_cancelled_through_any_replica(proxy: httpx.Client) -> None:
    r = proxy.post("/jobs/generate", json={"n": 1, "steps": 1000, "seed": 3, "preview_every": 0})
    assert r.status_code == 202, r.text
    job, owner = r.json()["id"], r.headers["x-replica-id"]
    (other,) = [a for rid, a in replicas().items() if rid != owner]
    with httpx.Client(base_url=f"http://{other}", timeout=60) as via:
        state = via.get(f"/jobs/{job}")
        assert state.status_code == 200 and state.json()["id"] == job
        assert (state.headers["x-replica-id"], state.headers["x-served-via"]) == (owner, next(
            rid for rid, a in replicas().items() if a == other))
        with via.stream("GET", f"/jobs/{job}/events") as events:
            steps = []
            for kind, data in sse_events(events):
                assert kind == "progress"
                steps.append(data["step"])
                if len(steps) == 3:
                    break
        assert steps == sorted(steps)
        assert via.get(f"/jobs/{job}/result").status_code == 409
        cancelled = via.delete(f"/jobs/{job}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert proxy.get(f"/jobs/{job}").json()["status"] == "cancelled"

        short = proxy.post("/jobs/generate", json={"n": 2, "steps": 5, "seed": 8, "return_latents": True}).json()
        for _ in range(200):
            if via.get(f"/jobs/{short['id']}").json()["status"] == "succeeded":
                break
            time.sleep(0.1)
        result = via.get(f"/jobs/{short['id']}/result")
        assert result.status_code == 200, result.text
        sync = generate(proxy, {"n": 2, "steps": 5, "seed": 8, "return_latents": True}).json()
        assert result.json()["images"] == sync["images"]
        assert via.get("/jobs/0123456789abcdef0123456789abcdef").status_code == 404


def test_a_replica_killed_with_requests_in_flight(proxy: httpx.Client) -> None:
    """Seeded synchronous requests on the dead replica are retried on the other (the same answers); its job fails
    with an error that says so; Serve starts a new replica."""
    from ray import serve

    job = proxy.post("/jobs/generate", json={"n": 1, "steps": 1000, "seed": 4})
    victim, job_id = job.headers["x-replica-id"], job.json()["id"]
    for _ in range(300):  # bounded: until the job runs
        if proxy.get(f"/jobs/{job_id}").json()["progress"]["step"] >= 1:
            break
        time.sleep(0.1)
    bodies = [{"n": 2, "steps": 200, "seed": 100 + i, "return_latents": True} for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        pending = [pool.submit(proxy.post, "/generate", json=b) for b in bodies]
        time.sleep(1.0)  # 12 in flight: at most 8 per replica, so some are on the victim
        (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith("SERVE_REPLICA") and a["name"].endswith(victim)]
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        responses = [f.result() for f in pending]
    assert [r.status_code for r in responses] == [200] * 12, [r.text[:200] for r in responses if r.status_code != 200]
    assert any(r.headers.get("x-retries") for r in responses)
    assert all(r.headers["x-replica-id"] != victim for r in responses if r.headers.get("x-retries"))
    for body, r in zip(bodies, responses):  # the seed contract: equal to float32 precision, whatever the batch
        if r.headers.get("x-retries"):
            again = generate(proxy, body).json()
            np.testing.assert_array_equal(npy(again["x_T"]), npy(r.json()["x_T"]))
            np.testing.assert_allclose(npy(again["x_0"]), npy(r.json()["x_0"]), rtol=1e-4, atol=1e-4)

    state = proxy.get(f"/jobs/{job_id}").json()
    assert state["status"] == "failed" and state["error"]["status"] == 503, state
    assert victim in state["error"]["detail"] and "gone" in state["error"]["detail"]
    assert proxy.get(f"/jobs/{job_id}/result").status_code == 503
    with proxy.stream("GET", f"/jobs/{job_id}/events") as events:
        assert [kind for kind, _ in sse_events(events)] == ["error"]

    for _ in range(240):  # bounded: Serve replaces the replica
        states = serve.status().applications[APP].deployments["DDIMServer"].replica_states
        if states.get("RUNNING") == 2:
            break
        time.sleep(0.5)
    assert states.get("RUNNING") == 2, states
    assert proxy.get("/readyz").status_code == 200


def test_overload_is_429_with_retry_after(proxy: httpx.Client) -> None:
    """2 replicas x 8 ongoing + 16 queued: past that, of 48 concurrent requests, Serve's proxy refuses some."""
    with ThreadPoolExecutor(48) as pool:
        responses = list(pool.map(lambda i: proxy.post("/generate", json={"n": 2, "steps": 150, "seed": i},
                                                       headers={"accept": "application/x-npy"}), range(48)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 1 and codes.count(200) >= 16, codes  # 2 x 8 run at once, at least
    refused = [r for r in responses if r.status_code == 429]
    assert all(int(r.headers["retry-after"]) >= 1 and "backpressure" in r.json()["detail"] for r in refused)


def test_a_clean_shutdown(serving: tuple[str, subprocess.Popen], proxy: httpx.Client) -> None:  # type: ignore[type-arg]
    url, proc = serving
    assert proxy.get("/readyz").status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/readyz", timeout=5)
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert f"ddim-jobs-{APP}" not in names
    assert not [n for n in names if n.startswith("SERVE_")], names  # replicas, proxy and controller are gone
