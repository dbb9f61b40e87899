"""Per-model-version inference statistics in Triton's ``ModelStatistics`` shape (``GET /v2/models/{m}/stats``,
read by tritonclient's ``get_inference_statistics``; a gRPC front end returns the same dict).

What is counted (durations in nanoseconds, cumulative):

- ``success`` / ``fail``: requests answered / failed after admission; ns from arrival to answer.
- ``compute_input``: per answered request, arrival until its images were queued (reading, decoding, checks).
- ``queue``: per answered request, queued until answered (waiting for a batch plus that batch's engine call).
- ``compute_infer``: per engine call (``execution_count`` of them), the Mixup Inference engine's time.
- ``inference_count``: images answered; ``batch_stats``: engine calls and their time per batch size.

``compute_output`` and the cache fields are reported as zero: the response is encoded by the route after the
answer is counted, and there is no response cache.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

LOGGER = logging.getLogger(__name__)

_ZERO = {"count": 0, "ns": 0}


class ModelStats:
    """Counters of one loaded model version; thread-safe (engine calls run on the batcher's worker thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self._durations: dict[str, list[int]] = {
            k: [0, 0] for k in ("success", "fail", "compute_input", "queue", "compute_infer")
        }
        self._batches: dict[int, list[int]] = {}

    def _add(self, key: str, ns: int) -> None:
        entry = self._durations[key]
        entry[0] += 1
        entry[1] += ns

    def executed(self, batch_size: int, ns: int) -> None:
        """One engine call over ``batch_size`` images."""
        with self._lock:
            self.execution_count += 1
            self._add("compute_infer", ns)
            batch = self._batches.setdefault(batch_size, [0, 0])
            batch[0] += 1
            batch[1] += ns

    def answered(self, images: int, input_ns: int, queue_ns: int) -> None:
        """One request answered: ``input_ns`` before queueing, ``queue_ns`` queued until answered."""
        with self._lock:
            self.inference_count += images
            self.last_inference_ms = int(time.time() * 1000)
            self._add("success", input_ns + queue_ns)
            self._add("compute_input", input_ns)
            self._add("queue", queue_ns)

    def failed(self, ns: int) -> None:
        """One admitted request that got no answer (deadline, error)."""
        with self._lock:
            self._add("fail", ns)

    def to_triton(self, name: str, version: str) -> dict[str, Any]:
        """One entry of Triton's ``model_stats`` list."""
        with self._lock:
            durations = {k: {"count": c, "ns": ns} for k, (c, ns) in self._durations.items()}
            batches = sorted(self._batches.items())
            return {
                "name": name,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    **durations,
                    "compute_output": dict(_ZERO),
                    "cache_hit": dict(_ZERO),
                    "cache_miss": dict(_ZERO),
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": dict(_ZERO),
                        "compute_infer": {"count": count, "ns": ns},
                        "compute_output": dict(_ZERO),
                    }
                    for size, (count, ns) in batches
                ],
            }
