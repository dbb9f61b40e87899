"""Shared test plumbing: the gpu marker, and tools that must exist under CI."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of an external tool; skip locally when missing, fail under CI (where `make test` installs it)."""
    path = shutil.which(name)
    if path is None:
        message = f"required tool {name!r} not found on PATH (`make system-deps` installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


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
