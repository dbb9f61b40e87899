"""Grafana provisioning and the dashboard JSON: pinned datasource, required panels, every query valid PromQL
(parsed by promtool) over the contract's metric names. The live test runs the same queries against real data."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml
from deploy_support import (
    ALERTS,
    COMPOSE_GPU,
    DASHBOARD,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    architecture_metric_names,
    dashboard,
    dashboard_panels,
    load_yaml,
    panel_queries,
    substitute_grafana_variables,
)
from testtools import require_tool

# the panels issue 6 asks for: a title fragment (lower case) each
REQUIRED_PANELS = (
    "request rate by status code",
    "latency p50 / p95 / p99",
    "detection gap (heatmap)",
    "detection gap vs threshold and calibration",
    "adversarial flag rate vs calibrated",
    "answering branch",
    "predicted-class distribution",
    "images per engine call",
    "queue depth vs capacity",
    "429 / 503 / 504",
    "process cpu",
    "process memory",
    "gpu utilisation",
    "gpu memory",
    "build info",
)
FORBIDDEN_IN_QUERIES = (re.compile(r"\bor\s+vector\s*\("), re.compile(r"\babsent(_over_time)?\s*\("))


def _datasource_uid() -> str:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    return source["uid"]


def test_datasource_is_prometheus_with_a_pinned_uid():
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"] == "mixinfer-prometheus"
    assert source["url"] == "http://prometheus:9090"
    scrape = load_yaml(ALERTS.parent / "prometheus.yml")["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape, "$__rate_interval must know the scrape interval"


def test_dashboard_provider_reads_the_directory_compose_mounts():
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    mounts = load_yaml(COMPOSE_GPU)["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert provider["type"] == "file"


def test_dashboard_has_no_import_placeholders_and_every_panel_uses_the_pinned_uid():
    text = DASHBOARD.read_text()
    assert "__inputs" not in text and "${DS" not in text and "DS_PROMETHEUS" not in text
    uid = _datasource_uid()
    board = dashboard()
    assert board["uid"] == "mixinfer-overview"
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == uid


def test_required_panels_are_present():
    titles = [p["title"].lower() for p in dashboard_panels()]
    missing = [r for r in REQUIRED_PANELS if not any(r in t for t in titles)]
    assert not missing, f"panels missing: {missing}"
    heatmap = next(p for p in dashboard_panels() if "heatmap" in p["title"].lower())
    assert heatmap["type"] == "heatmap" and heatmap["targets"][0]["format"] == "heatmap"
    latency = next(p for p in dashboard_panels() if "p50 / p95 / p99" in p["title"])
    assert [t["legendFormat"] for t in latency["targets"]][:3] == ["p50", "p95", "p99"]
    assert "mixinfer_latency_p99_target_seconds" in latency["targets"][3]["expr"]


def test_panels_have_unique_ids_refids_and_do_not_overlap():
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
    for p in dashboard_panels():
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]


def test_no_query_hides_missing_data():
    for title, ref, expr in panel_queries():
        for pattern in FORBIDDEN_IN_QUERIES:
            assert not pattern.search(expr), f"{title}/{ref} hides missing data with {pattern.pattern}: {expr}"


def test_queries_use_only_contract_metric_names_and_every_contract_metric_is_shown_or_alerted():
    known = architecture_metric_names()
    used: set[str] = set()
    for title, _, expr in panel_queries():
        for metric in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr):
            if metric.startswith(("process_", "DCGM_FI_")):
                continue
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            assert base in known, f"{title}: {metric} is not a metric of docs/architecture.md"
            used.add(base)
    used |= {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\b(mixinfer_[a-z0-9_]+)", ALERTS.read_text())}
    assert known <= used, f"contract metrics shown nowhere: {known - used}"


def test_every_panel_query_is_valid_promql(tmp_path):
    """promtool parses each query (Grafana variables substituted) as a recording rule."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute_grafana_variables(expr)}
        for i, (_, _, expr) in enumerate(panel_queries())
    ]
    variable_queries = [v["definition"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    assert variable_queries == ['label_values(mixinfer_build_info{job="mixinfer"}, instance)']
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(
        [require_tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


@pytest.mark.parametrize("bad", ["rate(x[5m]", 'sum by (le) (x{a="b"}[5m])'])
def test_promql_check_rejects_invalid_queries(bad, tmp_path):
    """The check above can fail: a broken query and a range vector where an instant vector is needed."""
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "r", "expr": bad}]}]}))
    proc = subprocess.run(
        [require_tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode != 0
