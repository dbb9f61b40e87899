"""A Python client of the mixinfer HTTP API (extra ``client``: httpx), sync and async.

    >>> from service.client import Client
    >>> with Client("http://127.0.0.1:8000") as client:
    ...     print(client.predict(["examples/clean_7.png"])[0].label)

Never imports the server (FastAPI, ONNX Runtime) nor torch: an import-linter contract holds it.
"""

from service.client.clients import AsyncClient, Client, RetryPolicy
from service.client.inputs import ImageLike
from service.client.results import ApiError, Health, Metadata, Prediction

__all__ = ["ApiError", "AsyncClient", "Client", "Health", "ImageLike", "Metadata", "Prediction", "RetryPolicy"]
