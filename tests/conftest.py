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


def _nvidia_gpu_present() -> bool:
    """An NVIDIA driver and device; each gpu module also skips itself without the runtime it needs (onnxruntime-gpu's
    CUDA provider, torch with CUDA)."""
    return shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _nvidia_gpu_present():
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
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
