"""Who may read ``/metrics`` and where: ``MIXINFER_METRICS_KEY`` (a bearer key) and ``MIXINFER_METRICS_PORT``.

``/metrics`` publishes the threshold and the calibrated gap quantiles, so a public deployment serves it on its own
port (8002 in the images and manifests, as Triton does), reachable by Prometheus only, and/or behind a key. The
port is served by prometheus-client's own WSGI exposition in a daemon thread: it keeps answering while the main
port drains after SIGTERM (so ``mixinfer_ready`` 0 can be scraped), and stops with the app's lifespan.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import orjson
from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from service.api.responses import error_body
from service.metrics import Metrics

LOGGER = logging.getLogger(__name__)

UNAUTHORIZED_MESSAGE = "missing or wrong metrics key: send 'Authorization: Bearer <key>'"
_UNAUTHORIZED = orjson.dumps(error_body("/metrics", "unauthorized", UNAUTHORIZED_MESSAGE))


def metrics_authorised(authorization: str | None, key: bytes | None) -> bool:
    """True when ``key`` is None (open) or ``authorization`` is ``Bearer <key>`` (constant-time comparison).

    Every front end that exposes the metrics (main port, metrics port, a gRPC server) decides with this.
    """
    if key is None:
        return True
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key)


#: a connection that sends nothing (or an unfinished request) for this long is closed, freeing its thread
IDLE_TIMEOUT_S = 5.0


class _QuietHandler(WSGIRequestHandler):
    timeout = IDLE_TIMEOUT_S  # socketserver sets it on the connection: reads time out, the handler closes it

    def log_message(self, format: str, *args: Any) -> None:
        """No per-scrape line on stderr."""


class _IPv6Server(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """``metrics`` on ``host:port`` (any path, as prometheus-client serves), behind ``key`` when set."""

    def __init__(self, metrics: Metrics, host: str, port: int, key: bytes | None) -> None:
        exposition = make_wsgi_app(metrics.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if not metrics_authorised(environ.get("HTTP_AUTHORIZATION"), key):
                start_response(
                    "401 Unauthorized",
                    [("Content-Type", "application/json"), ("WWW-Authenticate", "Bearer")],
                )
                return [_UNAUTHORIZED]
            return exposition(environ, start_response)

        server_class = _IPv6Server if ":" in host else ThreadingWSGIServer
        self._httpd = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self.port = int(self._httpd.server_port)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="mixinfer-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()
        LOGGER.info("serving /metrics on port %d", self.port)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)
