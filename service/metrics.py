"""Every Prometheus metric of the server, defined once, in one registry per app (base units, histograms)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

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
from prometheus_client import disable_created_metrics as _disable_created
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

LOGGER = logging.getLogger(__name__)

STAGES = ("decode", "queue", "clean", "mix_pl", "mix_ol")
GAP_QUANTILES = ("0.05", "0.5", "0.95")
#: response codes every route series is created with, so that rates start from 0
COMMON_CODES = ("200", "400", "401", "403", "404", "413", "415", "422", "429", "500", "503", "504")
#: classes beyond this many get no per-class series (cardinality)
MAX_CLASS_SERIES = 100
UNMATCHED_ROUTE = "unmatched"

# 0.01 wide in [-0.1, 0.3], 0.05 wide above, up to the largest possible gap (1.0)
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

_disable_created()  # *_created series double the output and no dashboard uses them


class Metrics:
    """The server's metrics in their own :class:`CollectorRegistry` (several apps can live in one process).

    Args:
        routes: route templates to create request series for (each with :data:`COMMON_CODES`).
        queue_capacity: MAX_QUEUE_IMAGES, exported as ``mixinfer_queue_capacity_images``.
    """

    def __init__(self, routes: Iterable[str], queue_capacity: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        self.requests = Counter(
            "mixinfer_requests",
            "HTTP requests answered, by route template and status code",
            ["route", "code"],
            registry=reg,
        )
        self.request_duration = Histogram(
            "mixinfer_request_duration_seconds",
            "Time from request start to the last response byte, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
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
            "mixinfer_queue_capacity_images", "Images that may wait before requests get 429", registry=reg
        )
        self.ready = Gauge("mixinfer_ready", "1 when a model is loaded and warmed up, else 0", registry=reg)
        self.predictions = Counter(
            "mixinfer_predictions",
            "Images answered, by the branch that answered and the adversarial flag",
            ["branch", "adversarial"],
            registry=reg,
        )
        self.detection_gap = Histogram(
            "mixinfer_detection_gap", "Every computed detection gap c - max q_PL", buckets=GAP_BUCKETS, registry=reg
        )
        self.detection_threshold = Gauge(
            "mixinfer_detection_threshold", "Detection threshold tau of the served model", registry=reg
        )
        self.calibrated_flag_rate = Gauge(
            "mixinfer_calibrated_flag_rate", "Clean flag rate measured at calibration (manifest)", registry=reg
        )
        self.calibrated_gap = Gauge(
            "mixinfer_calibrated_gap",
            "Clean detection-gap quantiles measured at calibration (manifest)",
            ["q"],
            registry=reg,
        )
        self.pool_images = Gauge("mixinfer_pool_images", "Reference pool images of the served model", registry=reg)
        self.predicted_class = Counter(
            "mixinfer_predicted_class",
            "Images answered, by returned class (first 100 classes)",
            ["class"],
            registry=reg,
        )
        self.build_info = Gauge(
            "mixinfer_build_info",
            "Served model, version and execution provider (value 1)",
            ["model", "version", "provider"],
            registry=reg,
        )
        self._build_labels: tuple[str, str, str] | None = None
        self._class_names: tuple[str, ...] = ()
        # Labelled children, looked up once: ``.labels()`` takes a lock and builds a tuple per call, which was a
        # measurable part of the event loop's CPU per request. Plain dicts: a racing first lookup from two threads
        # gets the same child from prometheus-client, so at worst it is stored twice.
        self._request_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self._stage_children: dict[str, Histogram] = {}
        self._prediction_children: dict[tuple[str, bool | None], Counter] = {}
        self._class_children: tuple[Counter, ...] = ()

        self.queue_capacity.set(queue_capacity)
        self.ready.set(0)
        for route in (*routes, UNMATCHED_ROUTE):
            self.request_duration.labels(route=route)
            for code in COMMON_CODES:
                self.requests.labels(route=route, code=code)
        for stage in STAGES:
            self._stage_children[stage] = self.stage_duration.labels(stage=stage)
        for branch, adversarial in (("pl", False), ("ol", True), ("pl", None), ("ol", None), ("off", None)):
            self._prediction_child(branch, adversarial)

    # --- model ------------------------------------------------------------------------------------------------
    def set_model(
        self,
        *,
        name: str,
        version: str,
        provider: str,
        class_names: Sequence[str],
        threshold: float,
        flag_rate: float,
        gap_quantiles: dict[str, float],
        pool_images: int,
    ) -> None:
        """Export the served model's static facts (called after a load or a hot swap)."""
        if self._build_labels is not None:
            self.build_info.remove(*self._build_labels)
        self._build_labels = (name, version, provider)
        self.build_info.labels(model=name, version=version, provider=provider).set(1)
        self.detection_threshold.set(threshold)
        self.calibrated_flag_rate.set(flag_rate)
        for q in GAP_QUANTILES:
            self.calibrated_gap.labels(q=q).set(gap_quantiles[q])
        self.pool_images.set(pool_images)
        self._class_names = tuple(class_names)
        self._class_children = tuple(
            self.predicted_class.labels(**{"class": cls}) for cls in self._class_names[:MAX_CLASS_SERIES]
        )

    # --- per request / batch ----------------------------------------------------------------------------------
    def observe_request(self, route: str, code: int, seconds: float) -> None:
        children = self._request_children.get((route, code))
        if children is None:  # route templates and status codes are few: the cache stays small
            children = (self.requests.labels(route=route, code=str(code)), self.request_duration.labels(route=route))
            self._request_children[(route, code)] = children
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
    ) -> None:
        """Count answered images and observe every computed (finite) gap."""
        classes = self._class_children
        for k, b, adv in zip(class_index.tolist(), branch, adversarial, strict=True):
            child = self._prediction_children.get((b, adv))
            if child is None:
                child = self._prediction_child(b, adv)
            child.inc()
            if k < len(classes):
                classes[k].inc()
        for g in gap.tolist():
            if not math.isnan(g):
                self.detection_gap.observe(g)

    def _prediction_child(self, branch: str, adversarial: bool | None) -> Counter:
        child = self.predictions.labels(
            branch=branch, adversarial="none" if adversarial is None else str(adversarial).lower()
        )
        self._prediction_children[(branch, adversarial)] = child
        return child

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
