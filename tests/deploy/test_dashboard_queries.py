"""Every PromQL query of the Grafana dashboard returns series from a real Prometheus scraping ddim-serve.

The service runs on loopback over the tiny store; a real Prometheus scrapes it with the repo's
deploy/prometheus/prometheus.yml (target and interval rewritten); a short load goes through every
endpoint, with one 429 and some invalid requests; then each panel's query, its Grafana variables
substituted, goes through Prometheus' HTTP API.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from harness.server import running_server
from tests.deploy.dashboard import (
    NO_PROMETHEUS,
    PROMETHEUS,
    REPO,
    dashboard,
    drive_load,
    failing_queries,
    panels,
    queries,
    running_prometheus,
    scrape_config,
    scraped_after,
    series,
    substitute,
    variable_query,
    wait_for,
)

PROVISIONED = REPO / "deploy/grafana/provisioning/datasources/prometheus.yml"
MAX_QUEUE = 8


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


def test_every_query_filters_by_the_replica_variable() -> None:
    """Every selector of a ddim_* metric carries replica=~"$replica", so choosing replicas narrows every panel."""
    for title, target in queries(dashboard()):
        selectors = re.findall(r"\bddim_\w+(\{[^}]*\})?", target["expr"])
        assert selectors and all('replica=~"$replica"' in s for s in selectors), (title, target["expr"])


@pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)
def test_every_dashboard_query_returns_series(tiny_store: Path, tmp_path: Path) -> None:
    d = dashboard()
    assert len(queries(d)) >= 20
    with running_server(tiny_store, DDIM_MAX_QUEUE=str(MAX_QUEUE)) as url:
        config = scrape_config("ddim-serve", static_configs=[{"targets": [url.removeprefix("http://")]}])
        with running_prometheus(config, tmp_path) as prometheus:
            wait_for(lambda: series(prometheus, 'up{job="ddim-serve"} == 1'), "Prometheus never scraped ddim-serve")
            sent = drive_load(url, max_queue=MAX_QUEUE)
            # the last scrape has seen every request, and one more scrape gives each new series two samples
            wait_for(lambda: [s for s in series(prometheus, "sum(ddim_request_duration_seconds_count)")
                              if float(s["value"][1]) == sent], "Prometheus never saw the whole load")
            wait_for(scraped_after(prometheus, "ddim-serve"), "Prometheus stopped scraping")

            # a single server has no replica label: its legends show that part empty (tests/distributed checks it)
            failures = failing_queries(prometheus, d, optional_labels=frozenset({"replica"}))
            assert not failures, "dashboard queries that fail:\n" + "\n".join(failures)

            # the model variable's query lists both models; the replica variable's lists none (All still matches)
            metric, label = variable_query(d, "model")
            assert {s["metric"][label] for s in series(prometheus, f"group by ({label}) ({metric})")} == {
                "tiny", "tiny-rgb"}
            metric, label = variable_query(d, "replica")
            assert not series(prometheus, f'group by ({label}) ({metric}{{{label}!=""}})')
            rejected = series(prometheus, "sum by (reason) (ddim_requests_rejected_total)")
            assert {s["metric"]["reason"] for s in rejected} >= {"queue_full", "invalid", "unknown_model"}
