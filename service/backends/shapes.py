"""Static shapes: calls padded to power-of-two row buckets, one ONNX Runtime session per (graph, rows, N).

ONNX Runtime's CUDA convolutions keep the cuDNN state of the last input shape only: every change of shape re-plans
every convolution. Measured on an H200 (onnxruntime-gpu 1.31.1, heuristic search): a session that alternates
between two shapes pays ~8 ms per change on the MNIST CNN and ~37 ms on a CIFAR ResNet-18, against 0.4 ms and 4 ms
for a whole steady call of 64 x 5 blends; the exhaustive search pays ~33 ms and ~200 ms. A micro-batching server
changes shape on almost every call (batch sizes vary, and so does the number of flagged rows that the OL branch
runs). With static shapes every call is padded to a power-of-two row bucket and each (graph, bucket, N) gets its
own session, which only ever sees one shape. Padding rows are zeros (partner 0) and are cut from the result, so the
numbers are those of the unpadded call. Each session holds its own copy of the weights, of the pool and of its
memory arena on the device (with the defaults 28 sessions: about 1.3 GB of weights for a ResNet-18).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray


def bucket(rows: int, cap: int) -> int:
    """The smallest power of two >= ``rows``, but at most ``cap`` (callers never pass more than ``cap`` rows)."""
    return min(1 << (rows - 1).bit_length(), cap)


def buckets_up_to(rows: int) -> list[int]:
    """Every power of two below ``rows``, and ``rows`` itself."""
    out = [1 << i for i in range(rows.bit_length()) if 1 << i < rows]
    return [*out, rows]


def pad_rows(a: NDArray[Any], rows: int) -> NDArray[Any]:
    """``a`` with zero rows appended up to ``rows`` (``a`` itself when it already has them)."""
    if a.shape[0] == rows:
        return a
    out = np.zeros((rows, *a.shape[1:]), dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


class BucketSessions:
    """The session that only ever runs one graph on one (rows, N) shape, made once on first use (thread-safe).

    Args:
        make: ``make(graph, what) -> session`` for a graph name (e.g. ``classifier``, ``fused``).
    """

    def __init__(self, make: Callable[[str, str], Any]) -> None:
        self._make = make
        self._sessions: dict[tuple[str, int, int], Any] = {}
        self._lock = threading.Lock()

    def get(self, graph: str, rows: int, n: int) -> Any:
        key = (graph, rows, n)
        session = self._sessions.get(key)
        if session is None:
            with self._lock:
                session = self._sessions.get(key)
                if session is None:
                    session = self._make(graph, f"{graph} session for {rows}x{n}")
                    self._sessions[key] = session
        return session

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def shapes(self) -> list[tuple[str, int, int]]:
        """The (graph, rows, N) shapes that have their own session, sorted."""
        return sorted(self._sessions)
