"""A Python client of the mixinfer HTTP API (extra ``client``: httpx), sync and async.

    >>> from service.client import Client
    >>> with Client("http://127.0.0.1:8000") as client:
    ...     print(client.predict(["examples/clean_7.png"])[0].label)

Never imports the server (FastAPI, ONNX Runtime) nor torch: an import-linter contract holds it. The names below
are imported at first use, so that ``mixinfer`` can register ``predict`` (``service.client.cli``) where httpx is
not installed (the server images).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.client.clients import AsyncClient, Client, RetryPolicy
    from service.client.inputs import ImageLike
    from service.client.results import ApiError, Health, Metadata, Prediction

_HOME = {
    "AsyncClient": "service.client.clients",
    "Client": "service.client.clients",
    "RetryPolicy": "service.client.clients",
    "ImageLike": "service.client.inputs",
    "ApiError": "service.client.results",
    "Health": "service.client.results",
    "Metadata": "service.client.results",
    "Prediction": "service.client.results",
}
__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "Health",
    "ImageLike",
    "Metadata",
    "Prediction",
    "RetryPolicy",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'service.client' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
