"""Every Prometheus metric of the server, defined once, in one registry per app (base units, histograms).

Request, latency, prediction, class and gap series, and the served version's calibrated gauges, carry the
``model`` and ``version`` labels (as Triton's ``nv_inference_*`` do), so that a hot swap never mixes two versions
in one series. Cardinality stays bounded: routes are templates, classes stop at :data:`MAX_CLASS_SERIES`, and a
version that is no longer served loses its series once a scrape has seen them final (:meth:`Metrics.render`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

LOGGER = logging.getLogger(__name__)

STAGES = ("decode", "queue", "clean", "mix_pl", "mix_ol")
GAP_QUANTILES = ("0.05", "0.5", "0.95")
#: response codes every route series is created with, so that rates start from 0
COMMON_CODES = ("200", "400", "401", "403", "404", "413", "415", "422", "429", "500", "503", "504")
#: classes beyond this many get no per-class series (cardinality)
MAX_CLASS_SERIES = 100
UNMATCHED_ROUTE = "unmatched"
#: the model/version labels of requests answered before any model was loaded (retired by the first load)
NO_MODEL = ("", "")
VERSION_LABELS = ("model", "version")

#: 0.01 wide in [-0.1, 0.3], 0.05 wide above; a few coarse buckets below -0.1, because a clean gap can be negative
#: (blending can raise confidence) and the drift alert compares the median with calibrated quantiles down there.
GAP_BUCKETS = (
    -1.0,
    -0.5,
    -0.3,
    -0.2,
    -0.15,
    *(round(-0.1 + 0.01 * i, 2) for i in range(41)),
    *(round(0.35 + 0.05 * i, 2) for i in range(14)),
)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class WithoutCreated(Collector):
    """A registry's samples minus the ``*_created`` ones (they double the output and no dashboard uses them).

    prometheus-client can only drop them for the whole process (``disable_created_metrics``); this filter keeps
    the choice to the registry the app owns.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


@dataclass
class _VersionSeries:
    """The labelled children of one model version, looked up once, and what scrapes have seen of them.

    ``.labels()`` takes a lock and builds a tuple per call, which was a measurable part of the event loop's CPU per
    request, hence the caches. Every observation and every scrape runs on the event loop (stages, observed on the
    batch thread, carry no version), so this bookkeeping needs no lock.
    """

    labels: tuple[str, str]
    requests: dict[tuple[str, int], tuple[Counter, Histogram]] = field(default_factory=dict)
    predictions: dict[tuple[str, bool | None], Counter] = field(default_factory=dict)
    classes: tuple[Counter, ...] = ()
    gap: Histogram | None = None
    #: observations so far, and their count at the last scrape since the version was retired (-1: none yet)
    observed: int = 0
    scraped: int = -1


class Metrics:
    """The server's metrics in their own :class:`CollectorRegistry` (several apps can live in one process).

    Args:
        routes: route templates to create request series for (each with :data:`COMMON_CODES`).
        queue_capacity: MAX_QUEUE_IMAGES, exported as ``mixinfer_queue_capacity_images``.
        latency_target_s: LATENCY_P99_TARGET_S, exported as ``mixinfer_latency_p99_target_seconds`` (the p99
            latency alert compares with it).
    """

    def __init__(self, routes: Iterable[str], queue_capacity: int, latency_target_s: float = 1.0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._exposed = WithoutCreated(self.registry)
        reg = self.registry
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        versioned = VERSION_LABELS
        self.requests = Counter(
            "mixinfer_requests",
            "HTTP requests answered, by model version, route template and status code (version: the one that "
            "answered, else the one served at the time)",
            [*versioned, "route", "code"],
            registry=reg,
        )
        self.request_duration = Histogram(
            "mixinfer_request_duration_seconds",
            "Time from request start to the last response byte, by model version and route",
            [*versioned, "route"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.latency_target = Gauge(
            "mixinfer_latency_p99_target_seconds",
            "Prediction latency the p99 should stay under (MIXINFER_LATENCY_P99_TARGET_S)",
            registry=reg,
        )
        self.stage_duration = Histogram(
            "mixinfer_stage_duration_seconds",
            "Time spent per stage: decode (per request), queue (per image piece), clean/mix_pl/mix_ol (per batch)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=reg,
        )
        self.batch_images = Histogram(
            "mixinfer_batch_images", "Input images per engine call", buckets=BATCH_BUCKETS, registry=reg
        )
        self.queue_images = Gauge("mixinfer_queue_images", "Images waiting for a batch", registry=reg)
        self.queue_capacity = Gauge(
            "mixinfer_queue_capacity_images", "Images that may wait before requests get 503 (overloaded)", registry=reg
        )
        self.ready = Gauge("mixinfer_ready", "1 when a model is loaded and warmed up, else 0", registry=reg)
        self.predictions = Counter(
            "mixinfer_predictions",
            "Images answered, by model version, the branch that answered and the adversarial flag",
            [*versioned, "branch", "adversarial"],
            registry=reg,
        )
        self.detection_gap = Histogram(
            "mixinfer_detection_gap",
            "Every computed detection gap c - max q_PL, by model version",
            versioned,
            buckets=GAP_BUCKETS,
            registry=reg,
        )
        self.detection_threshold = Gauge(
            "mixinfer_detection_threshold", "Detection threshold tau of the served model", versioned, registry=reg
        )
        self.calibrated_flag_ratio = Gauge(
            "mixinfer_calibrated_flag_ratio",
            "Share of clean calibration images flagged at tau (manifest), 0..1",
            versioned,
            registry=reg,
        )
        self.calibrated_gap = Gauge(
            "mixinfer_calibrated_gap",
            "Clean detection-gap quantiles measured at calibration (manifest)",
            [*versioned, "q"],
            registry=reg,
        )
        self.pool_images = Gauge(
            "mixinfer_pool_images", "Reference pool images of the served model", versioned, registry=reg
        )
        self.predicted_class = Counter(
            "mixinfer_predicted_class",
            "Images answered, by model version and returned class (first 100 classes)",
            [*versioned, "class"],
            registry=reg,
        )
        self.build_info = Gauge(
            "mixinfer_build_info",
            "Served model, version and execution provider (value 1)",
            [*versioned, "provider"],
            registry=reg,
        )
        #: every metric with the model/version labels: a retired version's series are removed from each
        self._versioned: tuple[MetricWrapperBase, ...] = (
            self.requests,
            self.request_duration,
            self.predictions,
            self.detection_gap,
            self.detection_threshold,
            self.calibrated_flag_ratio,
            self.calibrated_gap,
            self.pool_images,
            self.predicted_class,
            self.build_info,
        )
        self._routes = (*routes, UNMATCHED_ROUTE)
        self._class_names: tuple[str, ...] = ()
        self._stage_children: dict[str, Histogram] = {}
        self._versions: dict[tuple[str, str], _VersionSeries] = {}
        self._current = self._version(NO_MODEL)

        self.queue_capacity.set(queue_capacity)
        self.latency_target.set(latency_target_s)
        self.ready.set(0)
        for stage in STAGES:
            self._stage_children[stage] = self.stage_duration.labels(stage=stage)

    # --- model ------------------------------------------------------------------------------------------------
    def set_model(
        self,
        *,
        name: str,
        version: str,
        provider: str,
        class_names: Sequence[str],
        threshold: float,
        flag_ratio: float,
        gap_quantiles: dict[str, float],
        pool_images: int,
    ) -> None:
        """Export the served model's static facts (called after a load or a hot swap).

        The version served until now is retired: its series stay (requests admitted before the swap may still
        finish on it) until a scrape has seen them unchanged since the previous one, then :meth:`render` removes
        them; at once if it never observed anything.
        """
        labels = (name, version)
        self._class_names = tuple(class_names)
        previous = self._current
        self._current = self._version(labels)  # a retired version served again keeps its series
        if previous is not self._current:
            if previous.observed == 0:  # nothing to report: gone at once
                self._retire(previous.labels)
            else:
                previous.scraped = -1  # retired: removed once a scrape saw it final
        self.build_info.remove_by_labels(dict(zip(VERSION_LABELS, previous.labels, strict=True)))
        self.build_info.labels(*labels, provider).set(1)
        self.detection_threshold.labels(*labels).set(threshold)
        self.calibrated_flag_ratio.labels(*labels).set(flag_ratio)
        for q in GAP_QUANTILES:
            self.calibrated_gap.labels(*labels, q).set(gap_quantiles[q])
        self.pool_images.labels(*labels).set(pool_images)

    def _version(self, labels: tuple[str, str]) -> _VersionSeries:
        """The series of ``labels``, created (requests with every route and common code, predictions, classes,
        gap) on first use; a version that is not the current one is retired from birth."""
        series = self._versions.get(labels)
        if series is not None:
            return series
        series = self._versions[labels] = _VersionSeries(labels)
        model, version = labels
        for route in self._routes:
            duration = self.request_duration.labels(model, version, route)
            for code in COMMON_CODES:
                series.requests[(route, int(code))] = (self.requests.labels(model, version, route, code), duration)
        for branch, adversarial in (("pl", False), ("ol", True), ("pl", None), ("ol", None), ("off", None)):
            self._prediction_child(series, branch, adversarial)
        if labels != NO_MODEL:
            series.gap = self.detection_gap.labels(model, version)
            series.classes = tuple(
                self.predicted_class.labels(model, version, cls) for cls in self._class_names[:MAX_CLASS_SERIES]
            )
        return series

    def _series_of(self, model: str | None, version: str | None) -> _VersionSeries:
        if model is None or version is None:
            return self._current
        current = self._current
        if current.labels[0] == model and current.labels[1] == version:
            return current
        return self._version((model, version))  # a retired version still answering: kept until it is idle

    @property
    def served(self) -> tuple[str, str]:
        """(model, version) of the served model; ``("", "")`` before the first load."""
        return self._current.labels

    # --- per request / batch ----------------------------------------------------------------------------------
    def observe_request(
        self, route: str, code: int, seconds: float, model: str | None = None, version: str | None = None
    ) -> None:
        """Count and time one request; ``model``/``version``: the version that answered (None: none did, the
        one served now is used)."""
        series = self._series_of(model, version)
        series.observed += 1
        children = series.requests.get((route, code))
        if children is None:  # route templates and status codes are few: the cache stays small
            m, v = series.labels
            children = (self.requests.labels(m, v, route, str(code)), self.request_duration.labels(m, v, route))
            series.requests[(route, code)] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        child = self._stage_children.get(stage)
        if child is None:
            child = self._stage_children[stage] = self.stage_duration.labels(stage=stage)
        child.observe(seconds)

    def queue_changed(self, images: int) -> None:
        self.queue_images.set(images)

    def batch_started(self, images: int, waited_s: list[float]) -> None:
        self.batch_images.observe(images)
        queue = self._stage_children["queue"]
        for w in waited_s:
            queue.observe(w)

    def observe_predictions(
        self,
        class_index: NDArray[np.int64],
        branch: Sequence[str],
        adversarial: Sequence[bool | None],
        gap: NDArray[np.float32],
        *,
        model: str,
        version: str,
    ) -> None:
        """Count the images ``model``/``version`` answered and observe every computed (finite) gap."""
        series = self._series_of(model, version)
        series.observed += 1
        classes = series.classes
        for k, b, adv in zip(class_index.tolist(), branch, adversarial, strict=True):
            child = series.predictions.get((b, adv))
            if child is None:
                child = self._prediction_child(series, b, adv)
            child.inc()
            if k < len(classes):
                classes[k].inc()
        if series.gap is None:
            series.gap = self.detection_gap.labels(*series.labels)
        gap_child = series.gap
        for g in gap.tolist():
            if not math.isnan(g):
                gap_child.observe(g)

    def _prediction_child(self, series: _VersionSeries, branch: str, adversarial: bool | None) -> Counter:
        flag = "none" if adversarial is None else str(adversarial).lower()
        child = self.predictions.labels(*series.labels, branch, flag)
        series.predictions[(branch, adversarial)] = child
        return child

    # --- exposition ---------------------------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type; first removes the series of every retired version that no
        observation touched since the previous scrape (which therefore exposed their final values)."""
        for labels, series in list(self._versions.items()):
            if series is self._current:
                continue
            if series.scraped == series.observed:
                self._retire(labels)
            else:
                series.scraped = series.observed
        return generate_latest(self._exposed), CONTENT_TYPE_LATEST

    def _retire(self, labels: tuple[str, str]) -> None:
        del self._versions[labels]
        for metric in self._versioned:
            metric.remove_by_labels(dict(zip(VERSION_LABELS, labels, strict=True)))
        LOGGER.debug("removed the series of %s/%s, no longer served", *labels)
