"""Metric names, buckets and initial series; the exposition passes `promtool check metrics`."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import GAP_BUCKETS, Metrics

NAMES = {
    "mixinfer_requests",
    "mixinfer_request_duration_seconds",
    "mixinfer_stage_duration_seconds",
    "mixinfer_batch_images",
    "mixinfer_queue_images",
    "mixinfer_queue_capacity_images",
    "mixinfer_ready",
    "mixinfer_predictions",
    "mixinfer_detection_gap",
    "mixinfer_detection_threshold",
    "mixinfer_calibrated_flag_rate",
    "mixinfer_calibrated_gap",
    "mixinfer_pool_images",
    "mixinfer_predicted_class",
    "mixinfer_build_info",
}


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = m.render()[0].decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def loaded(n_classes: int = 3) -> Metrics:
    m = Metrics(["/predict", "/v2/models/{name}/infer"], queue_capacity=1024)
    m.set_model(
        name="tiny",
        version="1",
        provider="CPUExecutionProvider",
        class_names=[f"c{k}" for k in range(n_classes)],
        threshold=0.2,
        flag_rate=0.05,
        gap_quantiles={"0.05": -0.01, "0.5": 0.02, "0.95": 0.15},
        pool_images=30,
    )
    return m


def test_every_documented_metric_exists_with_its_type():
    fams = {f.name: f.type for f in text_string_to_metric_families(loaded().render()[0].decode())}
    assert set(fams) >= NAMES
    assert fams["mixinfer_requests"] == "counter" and fams["mixinfer_predictions"] == "counter"
    assert fams["mixinfer_detection_gap"] == "histogram" and fams["mixinfer_batch_images"] == "histogram"
    assert any(name.startswith("process_") for name in fams)


def test_labelled_series_start_at_zero():
    s = samples(loaded())
    assert s[("mixinfer_requests_total", (("code", "429"), ("route", "/predict")))] == 0
    assert s[("mixinfer_requests_total", (("code", "200"), ("route", "unmatched")))] == 0
    for stage in ("decode", "queue", "clean", "mix_pl", "mix_ol"):
        assert s[("mixinfer_stage_duration_seconds_count", (("stage", stage),))] == 0
    assert s[("mixinfer_predictions_total", (("adversarial", "true"), ("branch", "ol")))] == 0
    assert s[("mixinfer_predictions_total", (("adversarial", "false"), ("branch", "pl")))] == 0
    assert s[("mixinfer_predicted_class_total", (("class", "c2"),))] == 0
    assert s[("mixinfer_calibrated_gap", (("q", "0.95"),))] == pytest.approx(0.15)
    assert s[("mixinfer_queue_capacity_images", ())] == 1024


def test_gap_buckets_are_0_01_wide_to_0_3_then_0_05():
    assert GAP_BUCKETS[:5] == (-1.0, -0.5, -0.3, -0.2, -0.15)
    fine = GAP_BUCKETS[5:]
    assert fine[0] == -0.1 and fine[40] == 0.3 and fine[-1] == 1.0
    np.testing.assert_allclose(np.diff(fine[:41]), 0.01, atol=1e-9)
    np.testing.assert_allclose(np.diff(fine[40:]), 0.05, atol=1e-9)


def test_every_computed_gap_is_observed_and_nan_is_not():
    m = loaded()
    gaps = np.array([0.005, 0.25, np.nan, -0.5], np.float32)
    m.observe_predictions(np.array([0, 1, 2, 0]), ["pl", "ol", "off", "pl"], [False, True, None, False], gaps)
    s = samples(m)
    assert s[("mixinfer_detection_gap_count", ())] == 3
    assert s[("mixinfer_detection_gap_bucket", (("le", "0.01"),))] == 2  # 0.005 and -0.5
    assert s[("mixinfer_detection_gap_bucket", (("le", "0.25"),))] == 3
    assert s[("mixinfer_predictions_total", (("adversarial", "none"), ("branch", "off")))] == 1
    assert s[("mixinfer_predictions_total", (("adversarial", "false"), ("branch", "pl")))] == 2
    assert s[("mixinfer_predicted_class_total", (("class", "c0"),))] == 2


def test_a_new_model_replaces_the_build_info_series():
    m = loaded()
    m.set_model(
        name="tiny",
        version="2",
        provider="CPUExecutionProvider",
        class_names=["a", "b", "c"],
        threshold=0.3,
        flag_rate=0.01,
        gap_quantiles={"0.05": 0.0, "0.5": 0.0, "0.95": 0.1},
        pool_images=9,
    )
    build = {k: v for k, v in samples(m).items() if k[0] == "mixinfer_build_info"}
    assert list(build) == [
        ("mixinfer_build_info", (("model", "tiny"), ("provider", "CPUExecutionProvider"), ("version", "2")))
    ]
    assert samples(m)[("mixinfer_detection_threshold", ())] == pytest.approx(0.3)


def test_class_series_are_capped_at_100_classes():
    m = loaded(n_classes=150)
    m.observe_predictions(np.array([120, 5]), ["pl", "pl"], [False, False], np.zeros(2, np.float32))
    classes = [k for k in samples(m) if k[0] == "mixinfer_predicted_class_total"]
    assert len(classes) == 100


def test_cached_children_count_into_the_labelled_series():
    """Per-request paths reuse labelled children; repeated and first-seen label values land in the right series."""
    m = loaded(n_classes=3)
    for _ in range(2):
        m.observe_request("/predict", 200, 0.001)
        m.observe_request("/predict", 418, 0.001)  # a code outside COMMON_CODES: created on first use
        m.observe_stage("decode", 0.0001)
        m.observe_predictions(np.array([2, 0]), ["pl", "ol"], [False, True], np.array([0.01, 0.5], dtype=np.float32))
    got = samples(m)
    assert got[("mixinfer_requests_total", (("code", "200"), ("route", "/predict")))] == 2
    assert got[("mixinfer_requests_total", (("code", "418"), ("route", "/predict")))] == 2
    assert got[("mixinfer_request_duration_seconds_count", (("route", "/predict"),))] == 4
    assert got[("mixinfer_stage_duration_seconds_count", (("stage", "decode"),))] == 2
    assert got[("mixinfer_predictions_total", (("adversarial", "false"), ("branch", "pl")))] == 2
    assert got[("mixinfer_predictions_total", (("adversarial", "true"), ("branch", "ol")))] == 2
    names = m._class_names
    assert got[("mixinfer_predicted_class_total", (("class", names[2]),))] == 2
    assert got[("mixinfer_predicted_class_total", (("class", names[1]),))] == 0
