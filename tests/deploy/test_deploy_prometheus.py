"""Prometheus configs and alert rules, checked by the real promtool: syntax, and unit tests that fire every alert on
synthetic series (tests/deploy/rules/alerts_test.yml) and stay quiet on a healthy service."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_support import (
    ALERT_TESTS,
    ALERTS,
    COMPOSE_CPU,
    COMPOSE_GPU,
    PROMETHEUS_CONFIGS,
    PROMETHEUS_DIR,
    architecture_metric_names,
    load_yaml,
)
from testtools import require_tool

NEVER = "vector(1) < 0"


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def _alerts() -> dict[str, dict]:
    return {r["alert"]: r for g in load_yaml(ALERTS)["groups"] for r in g["rules"] if "alert" in r}


@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS, ids=lambda p: p.name)
def test_promtool_check_config(config):
    proc = _promtool("check", "config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 1 rule files found" in proc.stdout


def test_promtool_check_rules():
    proc = _promtool("check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in proc.stdout


def test_promtool_rule_unit_tests_pass():
    proc = _promtool("test", "rules", str(ALERT_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_the_five_issue_alerts_exist():
    names = set(_alerts())
    assert {"MixinferFlagRateHigh", "MixinferGapDrift", "MixinferErrorRatioHigh", "MixinferQueueSaturated"} <= names
    assert {"MixinferTargetDown", "MixinferNotReady"} <= names
    for name, rule in _alerts().items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert "for" in rule, f"{name} would fire on a single bad evaluation"


def test_every_alert_is_tested_quiet_when_healthy_and_firing_when_broken():
    tests = load_yaml(ALERT_TESTS)["tests"]
    healthy = [t for t in tests if t["name"] == "healthy service is quiet"]
    assert len(healthy) == 1
    quiet = {c["alertname"] for c in healthy[0]["alert_rule_test"] if c["exp_alerts"] == []}
    firing = {c["alertname"] for t in tests for c in t.get("alert_rule_test", []) if c["exp_alerts"]}
    assert quiet == set(_alerts()), f"alerts without a healthy-quiet case: {set(_alerts()) - quiet}"
    assert firing == set(_alerts()), f"alerts without a firing case: {set(_alerts()) - firing}"


@pytest.mark.parametrize("alert", sorted(_alerts()))
def test_unit_tests_catch_an_alert_that_never_fires(alert, tmp_path):
    """Mutation check: neutralise one alert's expression; the unit tests must then fail on exactly that alert."""
    rules = load_yaml(ALERTS)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = NEVER
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    unit = load_yaml(ALERT_TESTS)
    unit["rule_files"] = ["alerts.yml"]
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(unit, sort_keys=False))
    proc = _promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert proc.returncode != 0, f"the unit tests did not notice {alert} can no longer fire"
    failed = set(re.findall(r"alertname: (\w+)", proc.stdout + proc.stderr))
    assert failed == {alert}


def test_alert_rules_only_use_contract_metric_names():
    known = architecture_metric_names() | {"up"}
    for name, rule in _alerts().items():
        for metric in re.findall(r"\b(mixinfer_[a-z0-9_]+|up)\b(?=\s*[{\[])", rule["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", metric)
            assert base in known, f"{name} uses {metric}, not in docs/architecture.md"


def test_scrape_targets_are_the_compose_services():
    gpu = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    cpu = load_yaml(PROMETHEUS_DIR / "prometheus.cpu.yml")

    def targets(config: dict) -> dict[str, list[str]]:
        return {j["job_name"]: [t for s in j["static_configs"] for t in s["targets"]] for j in config["scrape_configs"]}

    assert targets(gpu)["mixinfer"] == ["mixinfer:8002"] == targets(cpu)["mixinfer"]  # MIXINFER_METRICS_PORT
    for compose in (COMPOSE_GPU, COMPOSE_CPU):
        environment = load_yaml(compose)["services"]["mixinfer"]["environment"]
        assert environment["MIXINFER_METRICS_PORT"] == "8002"
        assert all("8002" not in p for p in load_yaml(compose)["services"]["mixinfer"]["ports"])  # not published
    assert targets(gpu)["dcgm"] == ["dcgm-exporter:9400"]
    assert "dcgm" not in targets(cpu)
    assert "dcgm-exporter" in load_yaml(COMPOSE_GPU)["services"]
    assert "dcgm-exporter" not in load_yaml(COMPOSE_CPU)["services"]
    for config in (gpu, cpu):
        assert config["rule_files"] == ["alerts.yml"]
        assert config["global"]["scrape_interval"] == "5s"
