"""Fixtures of the HTTP tests: a tiny real model store and a shared real server (helpers live in mixserver.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from mixserver import ADMIN_KEY, Served, run_server, settings_for
from testtools import require_tool
from tinybundle import make_tiny_bundle


@pytest.fixture(scope="session")
def http_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Store with tiny/1 and tiny/2 (other weights, same classes) and a 3-channel 'rgb' model."""
    root = tmp_path_factory.mktemp("http-store")
    make_tiny_bundle(root, name="tiny", version="1", seed=0)
    make_tiny_bundle(root, name="tiny", version="2", seed=1)
    make_tiny_bundle(root, name="rgb", version="1", shape=(3, 8, 8), n_classes=3, seed=2)
    return root


@pytest.fixture(scope="session")
def plain(http_store: Path) -> Callable[[np.ndarray], np.ndarray]:
    """softmax(f(x)) of tiny/1 computed directly with onnxruntime: the independent expectation for mode=off."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(http_store / "tiny" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        logits = sess.run(None, {"images": x.astype(np.float32).reshape(-1, 1, 8, 8)})[0]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return run


@pytest.fixture(scope="session")
def server(http_store: Path) -> Iterator[Served]:
    """The shared server: tiny/1 pinned, admin enabled, no API keys, mode override allowed, fixed seed, and the full
    response detail (gap, threshold, every probability: what these tests check; the label default has its own)."""
    settings = settings_for(
        http_store, model_version="1", admin_key=ADMIN_KEY, allow_mode_override=True, seed=0, response_detail="full"
    )
    with run_server(settings) as served:
        yield served


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool (skipped locally when missing, a failure under CI)."""
    return require_tool("promtool")
