"""Shared test plumbing: the gpu marker and the tiny real model bundle (``require_tool``/``IN_CI``: ``testtools``).

Fixtures:
    tiny_bundle: Path of a fresh, verified bundle ``<tmp>/store/tiny/1`` (4 classes, (1, 8, 8) images, 6 pool
        images per class; see ``tests/tinybundle.py``). Build variants with ``make_tiny_bundle`` directly
        (``from tinybundle import make_tiny_bundle``; the tests directory is on ``sys.path``).
    tiny_store: the store root holding ``tiny_bundle`` (``<tmp>/store``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tinybundle import make_tiny_bundle


def _cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers() and shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device and onnxruntime-gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Path:
    """A fresh, verified tiny bundle at ``tmp_path/store/tiny/1`` (safe to modify)."""
    return make_tiny_bundle(tmp_path / "store")


@pytest.fixture
def tiny_store(tiny_bundle: Path) -> Path:
    """The store root that holds :func:`tiny_bundle` (name ``tiny``, version ``1``)."""
    return tiny_bundle.parent.parent
