"""Fixtures of the HTTP tests: a tiny real model store and a shared real server (helpers live in mixserver.py).

pytest imports every ``conftest.py`` under the module name ``conftest``; tests elsewhere do
``from conftest import require_tool, IN_CI``, so this file re-exports those names from ``tests/conftest.py``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
from mixserver import ADMIN_KEY, Served, run_server, settings_for
from tinybundle import make_tiny_bundle


def _root_conftest():
    path = Path(__file__).resolve().parent.parent / "conftest.py"
    spec = importlib.util.spec_from_file_location("_mixinfer_root_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_root = _root_conftest()
IN_CI = _root.IN_CI
require_tool = _root.require_tool


@pytest.fixture(scope="session")
def http_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Store with tiny/1 and tiny/2 (other weights, same classes) and a 3-channel 'rgb' model."""
    root = tmp_path_factory.mktemp("http-store")
    make_tiny_bundle(root, name="tiny", version="1", seed=0)
    make_tiny_bundle(root, name="tiny", version="2", seed=1)
    make_tiny_bundle(root, name="rgb", version="1", shape=(3, 8, 8), n_classes=3, seed=2)
    return root


@pytest.fixture(scope="session")
def server(http_store: Path) -> Iterator[Served]:
    """The shared server: tiny/1 pinned, admin enabled, no API keys, mode override allowed, fixed seed."""
    with run_server(
        settings_for(http_store, model_version="1", admin_key=ADMIN_KEY, allow_mode_override=True, seed=0)
    ) as served:
        yield served


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool (skipped locally when missing, a failure under CI)."""
    return require_tool("promtool")
