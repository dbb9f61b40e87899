"""Metric names, buckets and initial series, model/version labels across hot swaps, and the bounded cardinality;
the exposition passes `promtool check metrics` (tests/integration/test_http_metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import GAP_BUCKETS, Metrics

NAMES = {
    "mixinfer_requests",
    "mixinfer_request_duration_seconds",
    "mixinfer_latency_p99_target_seconds",
    "mixinfer_stage_duration_seconds",
    "mixinfer_batch_images",
    "mixinfer_queue_images",
    "mixinfer_queue_capacity_images",
    "mixinfer_ready",
    "mixinfer_predictions",
    "mixinfer_detection_gap",
    "mixinfer_detection_threshold",
    "mixinfer_calibrated_flag_ratio",
    "mixinfer_calibrated_gap",
    "mixinfer_pool_images",
    "mixinfer_predicted_class",
    "mixinfer_build_info",
}
V1 = (("model", "tiny"), ("version", "1"))
V2 = (("model", "tiny"), ("version", "2"))
VERSIONED = (
    "mixinfer_requests_total",
    "mixinfer_request_duration_seconds_count",
    "mixinfer_predictions_total",
    "mixinfer_detection_gap_count",
    "mixinfer_detection_threshold",
    "mixinfer_calibrated_flag_ratio",
    "mixinfer_calibrated_gap",
    "mixinfer_pool_images",
    "mixinfer_predicted_class_total",
)

Key = tuple[str, tuple[tuple[str, str], ...]]


def samples(m: Metrics) -> dict[Key, float]:
    text = m.render()[0].decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def labels(*pairs: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(pairs))


def versions_in(got: dict[Key, float]) -> set[str]:
    return {dict(k[1])["version"] for k in got if k[0].startswith("mixinfer_") and "version" in dict(k[1])}


def install(m: Metrics, version: str, n_classes: int = 3, threshold: float = 0.2) -> None:
    m.set_model(
        name="tiny",
        version=version,
        provider="CPUExecutionProvider",
        class_names=[f"c{k}" for k in range(n_classes)],
        threshold=threshold,
        flag_ratio=0.05,
        gap_quantiles={"0.05": -0.01, "0.5": 0.02, "0.95": 0.15},
        pool_images=30,
    )


def loaded(n_classes: int = 3) -> Metrics:
    m = Metrics(["/predict", "/v2/models/{name}/infer"], queue_capacity=1024, latency_target_s=0.75)
    install(m, "1", n_classes)
    return m


def predict(m: Metrics, version: str, gaps: list[float]) -> None:
    n = len(gaps)
    m.observe_predictions(
        np.zeros(n, np.int64), ["pl"] * n, [False] * n, np.array(gaps, np.float32), model="tiny", version=version
    )


def test_every_documented_metric_exists_with_its_type():
    fams = {f.name: f.type for f in text_string_to_metric_families(loaded().render()[0].decode())}
    assert set(fams) >= NAMES
    assert fams["mixinfer_requests"] == "counter" and fams["mixinfer_predictions"] == "counter"
    assert fams["mixinfer_detection_gap"] == "histogram" and fams["mixinfer_batch_images"] == "histogram"
    assert fams["mixinfer_calibrated_flag_ratio"] == "gauge"
    assert any(name.startswith("process_") for name in fams)


def test_labelled_series_start_at_zero():
    s = samples(loaded())
    assert s[("mixinfer_requests_total", labels(*V1, ("code", "429"), ("route", "/predict")))] == 0
    assert s[("mixinfer_requests_total", labels(*V1, ("code", "200"), ("route", "unmatched")))] == 0
    for stage in ("decode", "queue", "clean", "mix_pl", "mix_ol"):
        assert s[("mixinfer_stage_duration_seconds_count", (("stage", stage),))] == 0
    assert s[("mixinfer_predictions_total", labels(*V1, ("adversarial", "true"), ("branch", "ol")))] == 0
    assert s[("mixinfer_predictions_total", labels(*V1, ("adversarial", "false"), ("branch", "pl")))] == 0
    assert s[("mixinfer_predicted_class_total", labels(*V1, ("class", "c2")))] == 0
    assert s[("mixinfer_detection_gap_count", V1)] == 0
    assert s[("mixinfer_calibrated_gap", labels(*V1, ("q", "0.95")))] == pytest.approx(0.15)
    assert s[("mixinfer_calibrated_flag_ratio", V1)] == pytest.approx(0.05)
    assert s[("mixinfer_queue_capacity_images", ())] == 1024
    assert s[("mixinfer_latency_p99_target_seconds", ())] == 0.75


def test_created_series_are_dropped_from_the_apps_registry_only():
    """The app's exposition has no `*_created` samples, and no other registry of the process loses them."""
    text = loaded().render()[0].decode()
    assert "_created" not in text
    other = CollectorRegistry()
    Counter("unrelated_events", "a counter of another library", registry=other).inc()
    assert "unrelated_events_created" in generate_latest(other).decode()


def test_gap_buckets_are_0_01_wide_to_0_3_then_0_05():
    assert GAP_BUCKETS[:5] == (-1.0, -0.5, -0.3, -0.2, -0.15)
    fine = GAP_BUCKETS[5:]
    assert fine[0] == -0.1 and fine[40] == 0.3 and fine[-1] == 1.0
    np.testing.assert_allclose(np.diff(fine[:41]), 0.01, atol=1e-9)
    np.testing.assert_allclose(np.diff(fine[40:]), 0.05, atol=1e-9)


def test_every_computed_gap_is_observed_and_nan_is_not():
    m = loaded()
    gaps = np.array([0.005, 0.25, np.nan, -0.5], np.float32)
    m.observe_predictions(
        np.array([0, 1, 2, 0]), ["pl", "ol", "off", "pl"], [False, True, None, False], gaps, model="tiny", version="1"
    )
    s = samples(m)
    assert s[("mixinfer_detection_gap_count", V1)] == 3
    assert s[("mixinfer_detection_gap_bucket", labels(*V1, ("le", "0.01")))] == 2  # 0.005 and -0.5
    assert s[("mixinfer_detection_gap_bucket", labels(*V1, ("le", "0.25")))] == 3
    assert s[("mixinfer_predictions_total", labels(*V1, ("adversarial", "none"), ("branch", "off")))] == 1
    assert s[("mixinfer_predictions_total", labels(*V1, ("adversarial", "false"), ("branch", "pl")))] == 2
    assert s[("mixinfer_predicted_class_total", labels(*V1, ("class", "c0")))] == 2


def test_a_hot_swap_keeps_the_versions_apart_then_removes_the_old_once_a_scrape_saw_it_final():
    m = loaded()
    predict(m, "1", [0.01, 0.02])
    m.observe_request("/predict", 200, 0.01, "tiny", "1")
    install(m, "2", threshold=0.3)
    predict(m, "2", [0.5])
    predict(m, "1", [0.03])  # admitted before the swap, answered by version 1 after it
    m.observe_request("/predict", 200, 0.02, "tiny", "1")
    m.observe_request("/health/ready", 200, 0.001)  # no model answered: counted under the served version
    first = samples(m)
    assert first[("mixinfer_detection_gap_count", V1)] == 3
    assert first[("mixinfer_detection_gap_count", V2)] == 1
    assert first[("mixinfer_requests_total", labels(*V1, ("code", "200"), ("route", "/predict")))] == 2
    assert first[("mixinfer_requests_total", labels(*V2, ("code", "200"), ("route", "/predict")))] == 0
    assert first[("mixinfer_detection_threshold", V1)] == pytest.approx(0.2)
    assert first[("mixinfer_detection_threshold", V2)] == pytest.approx(0.3)
    build = [k for k in first if k[0] == "mixinfer_build_info"]
    assert build == [("mixinfer_build_info", labels(*V2, ("provider", "CPUExecutionProvider")))]
    assert versions_in(first) == {"1", "2"}
    # nothing more for version 1: the previous scrape exposed its final values, this one drops them everywhere
    second = samples(m)
    assert versions_in(second) == {"2"}
    for name in VERSIONED:
        assert any(k[0] == name for k in second), f"{name} lost the served version's series"
    assert second[("mixinfer_detection_gap_count", V2)] == 1
    assert second[("mixinfer_requests_total", labels(*V2, ("code", "200"), ("route", "/health/ready")))] == 1


def test_a_retired_version_that_still_answers_stays_until_a_scrape_sees_it_idle():
    m = loaded()
    install(m, "2")
    samples(m)
    predict(m, "1", [0.1])  # a late answer of version 1 between two scrapes
    assert samples(m)[("mixinfer_detection_gap_count", V1)] == 1
    assert "1" not in versions_in(samples(m))


def test_cardinality_stays_bounded_over_many_swaps():
    m = loaded(n_classes=150)
    predict(m, "1", [0.1])
    samples(m)
    counts = []
    for version in range(2, 12):
        install(m, str(version), n_classes=150)
        predict(m, str(version), [0.1])
        m.observe_request("/predict", 200, 0.01, "tiny", str(version))
        samples(m)
        counts.append(len(samples(m)))
    assert len(set(counts)) == 1, counts
    final = samples(m)
    assert versions_in(final) == {"11"}
    assert len([k for k in final if k[0] == "mixinfer_predicted_class_total"]) == 100


def test_serving_a_retired_version_again_keeps_its_counts():
    m = loaded()
    predict(m, "1", [0.1, 0.2])
    install(m, "2")
    install(m, "1")
    got = samples(m)
    assert got[("mixinfer_detection_gap_count", V1)] == 2
    build = [k for k in got if k[0] == "mixinfer_build_info"]
    assert build == [("mixinfer_build_info", labels(*V1, ("provider", "CPUExecutionProvider")))]


def test_requests_before_the_first_load_have_empty_version_labels_retired_by_the_load():
    m = Metrics(["/predict"], queue_capacity=8)
    m.observe_request("/health/ready", 503, 0.001)
    before = samples(m)
    unloaded = labels(("model", ""), ("version", ""), ("code", "503"), ("route", "/health/ready"))
    assert before[("mixinfer_requests_total", unloaded)] == 1
    install(m, "1")
    assert versions_in(samples(m)) == {"", "1"}  # the load is after the last scrape: one more for the 503
    assert versions_in(samples(m)) == {"1"}


def test_class_series_are_capped_at_100_classes():
    m = loaded(n_classes=150)
    m.observe_predictions(
        np.array([120, 5]), ["pl", "pl"], [False, False], np.zeros(2, np.float32), model="tiny", version="1"
    )
    classes = [k for k in samples(m) if k[0] == "mixinfer_predicted_class_total"]
    assert len(classes) == 100


def test_cached_children_count_into_the_labelled_series():
    """Per-request paths reuse labelled children; repeated and first-seen label values land in the right series."""
    m = loaded(n_classes=3)
    for _ in range(2):
        m.observe_request("/predict", 200, 0.001, "tiny", "1")
        m.observe_request("/predict", 418, 0.001)  # a code outside COMMON_CODES: created on first use
        m.observe_stage("decode", 0.0001)
        m.observe_predictions(
            np.array([2, 0]),
            ["pl", "ol"],
            [False, True],
            np.array([0.01, 0.5], dtype=np.float32),
            model="tiny",
            version="1",
        )
    got = samples(m)
    assert got[("mixinfer_requests_total", labels(*V1, ("code", "200"), ("route", "/predict")))] == 2
    assert got[("mixinfer_requests_total", labels(*V1, ("code", "418"), ("route", "/predict")))] == 2
    assert got[("mixinfer_request_duration_seconds_count", labels(*V1, ("route", "/predict")))] == 4
    assert got[("mixinfer_stage_duration_seconds_count", (("stage", "decode"),))] == 2
    assert got[("mixinfer_predictions_total", labels(*V1, ("adversarial", "false"), ("branch", "pl")))] == 2
    assert got[("mixinfer_predictions_total", labels(*V1, ("adversarial", "true"), ("branch", "ol")))] == 2
    assert got[("mixinfer_predicted_class_total", labels(*V1, ("class", "c2")))] == 2
    assert got[("mixinfer_predicted_class_total", labels(*V1, ("class", "c1")))] == 0
