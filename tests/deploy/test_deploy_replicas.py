"""Several replicas for real: two ``mixinfer serve`` processes on loopback ports (REST and gRPC each), one real
Prometheus scraping both every second with deploy/prometheus/alerts.yml loaded, known traffic to each. Then:

- the raw counters summed over both replicas equal the totals this test sent (requests by code, images answered);
- every Grafana panel query, evaluated for both replicas ("All") and for each one alone, aggregates correctly:
  a query that keeps ``instance`` shows both replicas, one that sums equals the sum of the per-replica answers,
  and one that takes a max, min, quantile or ratio lies between them;
- every alert expression keeps ``instance``, and the alerts replica B is set up to trip (latency target, shedding,
  flag rate; its gRPC calls are needed to reach the alerts' 100-request guards) name replica B and only B.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from deploy_support import (
    ALERTS,
    REPO,
    dashboard_panels,
    free_port,
    start_prometheus,
    substitute_grafana_variables,
    wait_for,
)
from testtools import require_tool, stop_process
from tinybundle import make_tiny_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

NAME = "tiny"
#: route of gRPC infer in mixinfer_requests_total (service/api/grpc_server.py)
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
INFER_ROUTES = ("/predict", GRPC_INFER)
#: alerts replica B trips: a latency target nobody meets, a rate limit that sheds, every image flagged
TRIPPED_ON_B = {"MixinferLatencyHigh", "MixinferShedding", "MixinferFlagRateHigh"}
AGGREGATIONS = re.compile(r"^(sum|min|max|avg|count|histogram_quantile)\b")


@dataclass
class Replica:
    name: str
    port: int
    grpc_port: int
    proc: subprocess.Popen[bytes]
    log: Path
    sent: dict[tuple[str, int], int] = field(default_factory=dict)  #: (route, status) -> requests
    images_answered: int = 0

    @property
    def instance(self) -> str:
        return f"127.0.0.1:{self.port}"

    def count(self, route: str, status: int) -> None:
        self.sent[(route, status)] = self.sent.get((route, status), 0) + 1


def _start(name: str, store: Path, tmp: Path, **settings: str) -> Replica:
    port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXINFER_")}
    env |= {
        "PYTHONPATH": str(REPO),
        "MIXINFER_HOST": "127.0.0.1",
        "MIXINFER_PORT": str(port),
        "MIXINFER_GRPC_PORT": str(grpc_port),
        "MIXINFER_MODEL_DIR": str(store),
        "MIXINFER_MODEL_NAME": NAME,
        "MIXINFER_PROVIDERS": "CPUExecutionProvider",
        "MIXINFER_INTRA_OP_THREADS": "1",
        "MIXINFER_LOG_JSON": "false",
        **{f"MIXINFER_{k.upper()}": v for k, v in settings.items()},
    }
    log = tmp / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"],
        cwd=tmp,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return Replica(name, port, grpc_port, proc, log)


@dataclass
class Cluster:
    a: Replica
    b: Replica
    prometheus: str
    start: float = 0.0
    evaluated_at: float = 0.0

    def query(self, expr: str) -> dict[frozenset[tuple[str, str]], float]:
        """Instant query at :attr:`evaluated_at`: labels (without __name__) -> value."""
        response = httpx.get(
            f"{self.prometheus}/api/v1/query", params={"query": expr, "time": self.evaluated_at}, timeout=10
        )
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        return {
            frozenset((k, v) for k, v in r["metric"].items() if k != "__name__"): float(r["value"][1])
            for r in body["data"]["result"]
        }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    prometheus_bin = require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("replicas")
    # replica A never flags (no gap reaches 1); replica B flags every image whose gap is >= 0, against a calibrated
    # ratio of 0
    make_tiny_bundle(tmp / "store-a", name=NAME, seed=0, mi={"threshold": 1.0})
    make_tiny_bundle(tmp / "store-b", name=NAME, seed=0, mi={"threshold": 0.0}, calibration={"false_flag_rate": 0.0})
    a = _start("a", tmp / "store-a", tmp)
    b = _start("b", tmp / "store-b", tmp, latency_p99_target_s="0.000001", rate_limit_per_key="3")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "mixinfer", "static_configs": [{"targets": [a.instance, b.instance]}]}],
    }
    prometheus = None
    try:
        prometheus, url = start_prometheus(prometheus_bin, tmp, config)
        cluster = Cluster(a, b, url)
        for r in (a, b):
            ready = f"http://{r.instance}/v2/health/ready"
            wait_for(f"replica {r.name}", lambda u=ready: httpx.get(u, timeout=2).status_code == 200, 90, r.proc, r.log)
        wait_for("both scraped", lambda: _up(cluster) == {a.instance, b.instance}, 30, prometheus)
        cluster.start = time.time()
        _traffic(a, rest=30, rest_images=4, grpc=20, grpc_images=2)
        # 3 requests/s per client on B: most of its 120 calls are refused however fast or slow this machine is; the
        # REST calls carry 128 images each, and the first one always gets through (the bucket starts full), enough
        # for the alerts' 100-image guards
        _traffic(b, rest=60, rest_images=128, grpc=60, grpc_images=1)
        time.sleep(3.0)  # two more scrapes and rule evaluations
        cluster.evaluated_at = time.time()
        yield cluster
    finally:
        for r in (a, b):
            stop_process(r.proc)
        if prometheus is not None:
            stop_process(prometheus)


def _up(cluster: Cluster) -> set[str]:
    cluster.evaluated_at = time.time()
    return {dict(k)["instance"] for k, v in cluster.query('up{job="mixinfer"}').items() if v == 1.0}


def _traffic(replica: Replica, *, rest: int, rest_images: int, grpc: int, grpc_images: int) -> None:
    """Alternate REST /predict and gRPC ModelInfer calls; record every status the client got."""
    rng = np.random.default_rng(replica.port)
    client = triton.InferenceServerClient(f"127.0.0.1:{replica.grpc_port}")
    with httpx.Client(base_url=f"http://{replica.instance}", timeout=30) as http:
        for i in range(max(rest, grpc)):
            if i < rest:
                batch = rng.random((rest_images, 8, 8)).round(4).tolist()
                status = http.post("/predict", json={"instances": batch}).status_code
                replica.count("/predict", status)
                replica.images_answered += rest_images if status == 200 else 0
            if i < grpc:
                x = rng.random((grpc_images, 1, 8, 8), dtype=np.float32)
                inp = triton.InferInput("images", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                try:
                    client.infer(NAME, [inp])
                    status = 200
                except triton.InferenceServerException as exc:
                    assert exc.status() == "StatusCode.RESOURCE_EXHAUSTED", exc
                    status = 429
                replica.count(GRPC_INFER, status)
                replica.images_answered += grpc_images if status == 200 else 0
    client.close()


# --- tests ---------------------------------------------------------------------------------------------------
def test_traffic_reached_both_replicas_and_b_shed_some(cluster: Cluster):
    a, b = cluster.a, cluster.b
    assert set(a.sent) == {("/predict", 200), (GRPC_INFER, 200)}, a.sent
    assert b.sent.get(("/predict", 429), 0) + b.sent.get((GRPC_INFER, 429), 0) > 0, b.sent
    assert b.sent.get((GRPC_INFER, 200), 0) > 0 and b.images_answered > 100, (b.sent, b.images_answered)


def test_counters_summed_over_replicas_equal_the_totals_sent(cluster: Cluster):
    for route in INFER_ROUTES:
        for status in (200, 429):
            got = cluster.query(f'sum(mixinfer_requests_total{{job="mixinfer",route="{route}",code="{status}"}})')
            want = sum(r.sent.get((route, status), 0) for r in (cluster.a, cluster.b))
            assert list(got.values()) == [float(want)], (route, status, got, want)
    per_replica = cluster.query('sum by (instance) (mixinfer_predictions_total{job="mixinfer"})')
    assert per_replica == {
        frozenset({("instance", r.instance)}): float(r.images_answered) for r in (cluster.a, cluster.b)
    }


def _panel_exprs() -> list[tuple[str, str]]:
    return [
        (f"{p['title']} / {t['refId']}", t["expr"])
        for p in dashboard_panels()
        for t in p.get("targets", [])
        if 'job="dcgm"' not in t["expr"]  # GPU panels: no DCGM exporter here (test_deploy_live_monitoring fakes one)
    ]


def _for(expr: str, instances: str, window: str) -> str:
    return substitute_grafana_variables(
        expr.replace("${instance}", instances).replace("$instance", instances), rate_interval=window, range_=window
    )


def _without_instance(result: dict[frozenset[tuple[str, str]], float]) -> dict[frozenset[tuple[str, str]], float]:
    return {frozenset(kv for kv in k if kv[0] != "instance"): v for k, v in result.items()}


@pytest.mark.parametrize(("panel", "expr"), _panel_exprs(), ids=[p for p, _ in _panel_exprs()])
def test_dashboard_query_aggregates_across_replicas(cluster: Cluster, panel: str, expr: str):
    window = f"{math.ceil(cluster.evaluated_at - cluster.start) + 10}s"
    a, b = cluster.a.instance, cluster.b.instance
    everything = cluster.query(_for(expr, f"{a}|{b}", window))
    only_a = cluster.query(_for(expr, a, window))
    only_b = cluster.query(_for(expr, b, window))
    assert everything, f"{panel}: no data for two replicas"
    if any("instance" in dict(k) for k in everything):  # a per-replica panel: both replicas, each as alone
        assert {dict(k)["instance"] for k in everything} == {a, b}, panel
        assert everything == {**only_a, **only_b}, panel
        return
    assert AGGREGATIONS.match(expr), f"{panel}: aggregates away instance without a known aggregation"
    additive = expr.startswith("sum") and " / " not in expr
    for key, value in everything.items():
        parts = [v for v in (only_a.get(key), only_b.get(key)) if v is not None and not math.isnan(v)]
        if additive:
            assert value == pytest.approx(sum(parts), rel=1e-9, abs=1e-12), (panel, dict(key), value, parts)
        elif parts and not math.isnan(value):
            assert min(parts) - 1e-9 <= value <= max(parts) + 1e-9, (panel, dict(key), value, parts)


def _alerts() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for g in groups for rule in g["rules"]]


@pytest.mark.parametrize(("alert", "expr"), _alerts(), ids=[a for a, _ in _alerts()])
def test_alert_expression_names_the_replica(cluster: Cluster, alert: str, expr: str):
    """The condition (before its `for`) as Prometheus evaluates it now: per replica, and true on B alone for the
    alerts B was set up to trip."""
    result = cluster.query(expr)
    instances = [dict(k).get("instance") for k in result]
    assert None not in instances, f"{alert} lost the instance label: {result}"
    if alert in TRIPPED_ON_B:
        assert instances == [cluster.b.instance], f"{alert}: {result}"
    else:
        assert cluster.b.instance not in instances or alert == "MixinferGapDrift", f"{alert}: {result}"
        assert cluster.a.instance not in instances or alert == "MixinferGapDrift", f"{alert}: {result}"
