"""docker-compose.yml: valid against the Compose Specification schema, and every path it uses exists."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def check_compose_spec(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with the compose-spec schema it vendors (the schema `docker compose` validates with)."""
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], check=False, capture_output=True, text=True, timeout=60)


def test_compose_file_matches_the_compose_spec() -> None:
    done = check_compose_spec(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = compose()
    broken["services"]["app"]["depends_on"] = {"prometheus": {"condition": "when_it_feels_like_it"}}
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    done = check_compose_spec(path)
    assert done.returncode != 0, "the compose-spec check accepted an invalid file: it checks nothing"


def bind_sources(service: dict[str, Any]) -> list[str]:
    """Host paths of a service's bind mounts (long syntax with type bind, short syntax with a path)."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            if v.get("type") == "bind":
                out.append(v["source"])
        elif v.split(":")[0].startswith((".", "/", "~")):
            out.append(v.split(":")[0])
    return out


def test_every_built_and_mounted_path_exists_in_the_repo() -> None:
    missing = []
    for name, service in compose()["services"].items():
        build = service.get("build")
        if build is not None:
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = context / ("Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile"))
            missing += [f"{name}: build {p}" for p in (context, dockerfile) if not p.exists()]
        for source in bind_sources(service):
            assert not source.startswith(("/", "~")), f"{name}: {source} is outside the repo"
            if not (REPO / source).exists():
                missing += [f"{name}: mount {source}"]
    assert not missing, f"paths named in docker-compose.yml that are not in the repo: {missing}"


def test_app_serves_the_model_store_read_only_and_checks_readyz() -> None:
    app = compose()["services"]["app"]
    mounts = [v for v in app["volumes"] if isinstance(v, dict) and v.get("source") == "./model_store"]
    assert mounts and all(m.get("read_only") for m in mounts), "model_store/ must be mounted read-only"
    assert mounts[0]["target"] == app["environment"]["DDIM_MODEL_STORE"]
    assert "/readyz" in " ".join(app["healthcheck"]["test"])
    assert "8000:8000" in app["ports"]


def test_grafana_loads_the_provisioned_dashboards() -> None:
    """The dashboard provider reads the folder compose mounts the dashboards into; anonymous viewing is on."""
    grafana = compose()["services"]["grafana"]
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/ddim-serve.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    targets = {v["source"]: v["target"] for v in grafana["volumes"] if isinstance(v, dict)}
    assert targets["./deploy/grafana/dashboards"] == dashboards_path
    assert targets["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    datasource = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    prometheus_port = compose()["services"]["prometheus"]["ports"][0].split(":")[-1]
    assert datasource["datasources"][0]["url"] == f"http://prometheus:{prometheus_port}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool on PATH (apt-get install prometheus)")
def test_prometheus_config_is_one_prometheus_accepts() -> None:
    config = REPO / "deploy/prometheus/prometheus.yml"
    done = subprocess.run(["promtool", "check", "config", "--syntax-only", str(config)], check=False,
                          capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    job = yaml.safe_load(config.read_text())["scrape_configs"][0]
    assert job["job_name"] == "ddim-serve" and job["static_configs"][0]["targets"] == ["app:8000"]
