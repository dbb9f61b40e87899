"""``Client`` and ``AsyncClient``: one pooled httpx connection set per client, timeouts, and retries on 429/503
only, after the server's ``Retry-After``."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from types import TracebackType
from typing import Any, Self

import httpx

from service import __version__
from service.client.inputs import ImageLike, predict_body
from service.client.results import ApiError, Health, Metadata, Prediction, parse_metadata, parse_predictions

LOGGER = logging.getLogger(__name__)

#: the statuses worth retrying: 429 (rate limited) and 503 (overloaded, not ready); never 403 or any other 4xx
RETRY_STATUSES = frozenset({429, 503})
_OK = frozenset({200})
_READY_STATUSES = frozenset({200, 503})  # /health/ready answers 503 while not ready: an answer, not a failure


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to wait on 429/503.

    Attributes:
        retries: retries after the first attempt.
        max_wait_s: a ``Retry-After`` longer than this is not waited for: the error is raised at once.
        backoff_s: wait before the first retry when the server sends no ``Retry-After`` (doubled each retry, at
            most ``max_wait_s``).
    """

    retries: int = 3
    max_wait_s: float = 30.0
    backoff_s: float = 0.5

    def delay(self, status: int, retry_after_s: float | None, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None to give up with the error."""
        if status not in RETRY_STATUSES or attempt >= self.retries:
            return None
        if retry_after_s is None:  # our own backoff: capped, never a reason to give up
            return min(self.backoff_s * 2**attempt, self.max_wait_s)
        return retry_after_s if retry_after_s <= self.max_wait_s else None


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header in seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def error_of(response: httpx.Response) -> ApiError:
    """The server's error as an :class:`ApiError`: ``{"error": {"code", "message"}}`` (REST) or ``{"error": msg}``
    (Open Inference Protocol); anything else keeps the start of the body as the message."""
    code, message = "http_error", response.text[:500] or response.reason_phrase
    try:
        err = response.json().get("error")
    except (ValueError, AttributeError):
        err = None
    if isinstance(err, dict):
        code, message = str(err.get("code", code)), str(err.get("message", message))
    elif isinstance(err, str):
        message = err
    return ApiError(
        response.status_code,
        code,
        message,
        request_id=response.headers.get("x-request-id"),
        retry_after_s=retry_after_seconds(response.headers.get("retry-after")),
    )


def _transport_error(exc: httpx.TransportError, url: str) -> ApiError:
    code = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection_error"
    return ApiError(None, code, f"{type(exc).__name__} talking to {url}: {exc}")


def _next_step(response: httpx.Response, attempt: int, policy: RetryPolicy, accept: frozenset[int]) -> float | None:
    """None when ``response`` is the answer, else the seconds to wait before retrying.

    Raises:
        ApiError: the server's error, when it is not worth (or no longer worth) retrying.
    """
    if response.status_code in accept:
        return None
    error = error_of(response)
    wait = policy.delay(response.status_code, error.retry_after_s, attempt)
    if wait is None:
        raise error
    LOGGER.info("HTTP %d %s; retry %d in %.2f s", response.status_code, error.code, attempt + 1, wait)
    return wait


def _options(url: str, api_key: str | None, timeout_s: float, connect_timeout_s: float) -> dict[str, Any]:
    headers = {"User-Agent": f"mixinfer-client/{__version__}", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return {
        "base_url": url.rstrip("/"),
        "headers": headers,
        "timeout": httpx.Timeout(timeout_s, connect=min(timeout_s, connect_timeout_s)),
    }


def _predict_params(top_k: int | None, mode: str | None) -> dict[str, int | str]:
    params: dict[str, int | str] = {}
    if top_k is not None:
        params["top_k"] = top_k
    if mode is not None:
        params["mode"] = mode
    return params


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise error_of(response) from None


class Client:
    """A mixinfer server, over one pool of keep-alive connections (close it, or use it as a context manager).

    Example:
        >>> with Client("http://127.0.0.1:8000") as client:
        ...     print(client.predict(["examples/clean_7.png"])[0].label)

    Args:
        url: the server's base URL.
        api_key: sent as ``Authorization: Bearer <key>``; None for an open server.
        timeout_s: longest wait for one response (connect: at most ``connect_timeout_s``).
        retry: retries on 429 and 503, after the server's ``Retry-After``.
        transport: an httpx transport in place of the network's (tests, proxies).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(transport=transport, **_options(url, api_key, timeout_s, connect_timeout_s))

    def predict(
        self, images: ImageLike | Sequence[ImageLike], *, top_k: int | None = None, mode: str | None = None
    ) -> list[Prediction]:
        """Classify images in one request; one :class:`Prediction` per image, in order.

        Args:
            images: one image or a sequence of them (see :data:`ImageLike`).
            top_k: return the k most probable classes only (the server may return fewer).
            mode: ``combined`` (the default), or ``pl``/``ol``/``off`` where the server allows overrides.

        Raises:
            ApiError: the server refused the request (bad image, key, limits), or no answer came.
            OSError: a path cannot be read.
        """
        body = predict_body(images)
        response = self._send("POST", "/predict", json=body, params=_predict_params(top_k, mode))
        return parse_predictions(_json(response))

    def health(self) -> Health:
        """Liveness and readiness (never retried: a 503 from readiness means not ready)."""
        live = self._send("GET", "/health/live", retry=False)
        ready = self._send("GET", "/health/ready", accept=_READY_STATUSES, retry=False)
        return Health(live=live.status_code == 200, ready=ready.status_code == 200)

    def metadata(self) -> Metadata:
        """The served model and the server's response detail (``GET /info``, API key required where set)."""
        return parse_metadata(_json(self._send("GET", "/info")))

    def _send(
        self, method: str, path: str, *, accept: frozenset[int] = _OK, retry: bool = True, **kw: Any
    ) -> httpx.Response:
        policy = self.retry if retry else RetryPolicy(retries=0)
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kw)
            except httpx.TransportError as exc:
                raise _transport_error(exc, self.url) from exc
            wait = _next_step(response, attempt, policy, accept)
            if wait is None:
                return response
            time.sleep(wait)
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class AsyncClient:
    """:class:`Client` for asyncio: the same arguments, methods that are awaited (``aclose`` to close)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(transport=transport, **_options(url, api_key, timeout_s, connect_timeout_s))

    async def predict(
        self, images: ImageLike | Sequence[ImageLike], *, top_k: int | None = None, mode: str | None = None
    ) -> list[Prediction]:
        """See :meth:`Client.predict`."""
        body = predict_body(images)
        response = await self._send("POST", "/predict", json=body, params=_predict_params(top_k, mode))
        return parse_predictions(_json(response))

    async def health(self) -> Health:
        """See :meth:`Client.health`."""
        live = await self._send("GET", "/health/live", retry=False)
        ready = await self._send("GET", "/health/ready", accept=_READY_STATUSES, retry=False)
        return Health(live=live.status_code == 200, ready=ready.status_code == 200)

    async def metadata(self) -> Metadata:
        """See :meth:`Client.metadata`."""
        return parse_metadata(_json(await self._send("GET", "/info")))

    async def _send(
        self, method: str, path: str, *, accept: frozenset[int] = _OK, retry: bool = True, **kw: Any
    ) -> httpx.Response:
        policy = self.retry if retry else RetryPolicy(retries=0)
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, **kw)
            except httpx.TransportError as exc:
                raise _transport_error(exc, self.url) from exc
            wait = _next_step(response, attempt, policy, accept)
            if wait is None:
                return response
            await asyncio.sleep(wait)
            attempt += 1

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
