"""/metrics over a real server: promtool-clean, the gap histogram counts every computed gap, real batching."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.integration


def one_image(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {"instances": [rng.random((8, 8)).tolist()]}


def test_gap_histogram_counts_every_computed_gap(server):
    before_gaps = server.metric("mixinfer_detection_gap_count")
    before_preds = sum(
        server.metric("mixinfer_predictions_total", branch=b, adversarial=a)
        for b, a in (("pl", "false"), ("ol", "true"))
    )
    before_off = server.metric("mixinfer_predictions_total", branch="off", adversarial="none")
    for i in range(5):
        assert server.client.post("/predict", json=one_image(i)).status_code == 200
    r = server.client.post("/predict?mode=off", json={"instances": [one_image(9)["instances"][0]] * 3})
    assert r.status_code == 200
    after_preds = sum(
        server.metric("mixinfer_predictions_total", branch=b, adversarial=a)
        for b, a in (("pl", "false"), ("ol", "true"))
    )
    assert after_preds - before_preds == 5
    assert server.metric("mixinfer_detection_gap_count") - before_gaps == 5  # mode off computes no gap
    assert server.metric("mixinfer_predictions_total", branch="off", adversarial="none") - before_off == 3


def test_requests_are_counted_by_route_template_and_code(server):
    before = server.metric("mixinfer_requests_total", route="/v2/models/{name}", code="404")
    server.client.get("/v2/models/nope")
    assert server.metric("mixinfer_requests_total", route="/v2/models/{name}", code="404") == before + 1
    before = server.metric("mixinfer_requests_total", route="unmatched", code="404")
    server.client.get("/no/such/route")
    assert server.metric("mixinfer_requests_total", route="unmatched", code="404") == before + 1


def test_static_model_facts_are_exported(server):
    assert server.metric("mixinfer_ready") == 1
    assert server.metric("mixinfer_detection_threshold") == pytest.approx(0.2)
    assert server.metric("mixinfer_calibrated_gap", q="0.95") == pytest.approx(0.2)
    assert server.metric("mixinfer_pool_images") == 24
    assert server.metric("mixinfer_build_info", model="tiny", version="1", provider="CPUExecutionProvider") == 1
    assert server.metric("mixinfer_queue_capacity_images") == 1024


def test_concurrent_clients_are_batched(http_store):
    from mixserver import run_server, settings_for

    gate_hits = []

    def slow(inner):
        import time

        class Slow:
            n_classes, input_shape, provider = inner.n_classes, inner.input_shape, inner.provider

            def probs(self, x):
                gate_hits.append(len(x))
                time.sleep(0.02)  # an engine call slower than the arrival gap makes images accumulate
                return inner.probs(x)

            def mean_mix_probs(self, x, p, lam):
                return inner.mean_mix_probs(x, p, lam)

            def warmup(self, sizes, mixes=(1,)):
                inner.warmup(sizes, mixes)

        return Slow()

    with run_server(settings_for(http_store, model_version="1"), wrap=slow) as srv:
        gate_hits.clear()

        def call(i: int) -> int:
            with httpx.Client(base_url=srv.base_url, timeout=30) as c:
                return c.post("/predict", json=one_image(i)).status_code

        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(call, range(48)))
        assert codes == [200] * 48
        assert max(gate_hits) > 1
        count = srv.metric("mixinfer_batch_images_count")
        total = srv.metric("mixinfer_batch_images_sum")
        assert total == 48 and count < 48  # fewer engine calls than images: batched
        assert srv.metric("mixinfer_batch_images_bucket", le="1.0") < count


def test_live_metrics_pass_promtool(server, promtool):
    server.client.post("/predict", json=one_image(0))
    text = server.client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text.content, capture_output=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()


def test_each_stage_is_timed_where_it_runs(server):
    def counts() -> dict[str, float]:
        return {
            s: server.metric("mixinfer_stage_duration_seconds_count", stage=s)
            for s in ("decode", "queue", "clean", "mix_pl", "mix_ol")
        }

    before = counts()
    assert server.client.post("/predict?mode=pl", json=one_image(1)).status_code == 200
    after_pl = counts()
    assert {s: after_pl[s] - before[s] for s in before} == {
        "decode": 1,
        "queue": 1,
        "clean": 1,
        "mix_pl": 1,
        "mix_ol": 0,
    }
    assert server.client.post("/predict?mode=ol", json=one_image(2)).status_code == 200
    after_ol = counts()
    assert {s: after_ol[s] - after_pl[s] for s in before} == {
        "decode": 1,
        "queue": 1,
        "clean": 1,
        "mix_pl": 0,
        "mix_ol": 1,
    }
