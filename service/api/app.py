"""The FastAPI application: ``create_app`` wires settings, metrics, middlewares and routes; the lifespan loads,
warms up and serves the model (never at import time)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import iter_route_contexts
from pydantic import TypeAdapter

from service import __version__
from service.api.deps import RateLimiter, admin_limiter
from service.api.errors import install_error_handlers
from service.api.identity import TrustedProxies
from service.api.metrics_port import MetricsServer
from service.api.middleware import BodyLimitMiddleware, ObserveMiddleware
from service.api.oip import GRPC_SERVICE
from service.api.query_watch import QueryScreen
from service.api.responses import OrjsonResponse
from service.api.routes import admin, health, info, page, predict, stats, v2
from service.api.runtime import BackendWrapper, ModelHolder
from service.api.schemas import IndexRequest, InferRequest, LoadRequest, PredictJsonBody, UnloadRequest
from service.config import Settings
from service.metrics import Metrics
from service.mi.params import Mode

if TYPE_CHECKING:
    from service.store import Bundle

LOGGER = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    wrap_backend: BackendWrapper | None = None,
    exit_on_load_failure: bool = False,
    bundle: Bundle | None = None,
) -> FastAPI:
    """Build the app (cheap); the model is loaded and warmed up in the lifespan.

    Args:
        settings: defaults to ``Settings()`` from the environment.
        wrap_backend: wraps each loaded backend (tests gate or slow the engine with it).
        exit_on_load_failure: if the initial load fails, stop the process (SIGTERM to itself) instead of staying
            alive and not ready; ``mixinfer serve`` sets it, so a broken deployment fails at start-up.
        bundle: a bundle verified already (``mixinfer serve`` checks it before starting): served as it is, without
            resolving the version or reading the files again. None: the lifespan resolves and loads the configured
            version.
    """
    settings = settings or Settings()
    app = FastAPI(
        title="mixinfer",
        version=__version__,
        description="Mixup Inference (Pang, Xu, Zhu, ICLR 2020) model server with an Open Inference Protocol v2 API.",
        default_response_class=OrjsonResponse,
        lifespan=_lifespan,
    )
    # stats before v2: /v2/models/stats would otherwise match /v2/models/{name}
    for router in (predict.router, stats.router, v2.router, admin.router, health.router, info.router, page.router):
        app.include_router(router)
    # FastAPI >= 0.160 keeps included routers as groups in app.routes: flatten them to get every template
    routes = [rc.path or "" for rc in iter_route_contexts(app.routes) if getattr(rc.route, "include_in_schema", False)]
    if settings.grpc_port is not None:
        routes.append(f"/{GRPC_SERVICE}/ModelInfer")
    metrics = Metrics(routes, settings.max_queue_images, settings.latency_p99_target_s)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.holder = ModelHolder(settings, metrics, wrap_backend)
    app.state.exit_on_load_failure = exit_on_load_failure
    app.state.initial_bundle = bundle
    app.state.trusted_proxies = TrustedProxies(settings.trusted_proxies)
    app.state.admin_limiter = admin_limiter(settings)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_key) if settings.rate_limit_per_key else None
    app.state.query_screen = QueryScreen.from_settings(settings, metrics.registry)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ObserveMiddleware, metrics=metrics)  # outermost: sees every final status, 413 included
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    holder: ModelHolder = app.state.holder
    settings: Settings = app.state.settings
    settings.log_weak_keys()
    settings.log_open_metrics()
    metrics_server = None
    if settings.metrics_port is not None:
        metrics_server = MetricsServer(
            app.state.metrics, settings.host, settings.metrics_port, settings.metrics_key_value()
        )
        metrics_server.start()
    holder.loop = asyncio.get_running_loop()
    holder.batcher.start()
    # Load in the background: liveness answers at once, readiness flips to 200 after warm-up.
    bundle, app.state.initial_bundle = app.state.initial_bundle, None  # served once, then its memory is free
    loading = asyncio.create_task(holder.load_initial(bundle), name="mixinfer-load")
    loading.add_done_callback(lambda task: _report_load(task, exit_process=app.state.exit_on_load_failure))
    app.state.loading = loading
    grpc_server = None
    try:
        if settings.grpc_port is not None:
            from service.api.grpc_server import GrpcServer

            grpc_server = GrpcServer(app.state)
            await grpc_server.start()
        yield
    finally:
        app.state.metrics.ready.set(0)
        if grpc_server is not None:  # after uvicorn's drain: calls in flight get the same grace as HTTP requests
            await grpc_server.stop(settings.drain_s)
        if not loading.done():
            loading.cancel()
        await holder.batcher.close()
        if metrics_server is not None:
            metrics_server.stop()


def _report_load(task: asyncio.Task[None], *, exit_process: bool) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None:
        return
    if exit_process:
        LOGGER.error("model load failed, stopping the server: %s", exc)
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        LOGGER.error("model load failed, the server stays not ready: %s", exc)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the body models and query parameter types that routes read by hand (for speed and
    streaming limits)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (PredictJsonBody, InferRequest, IndexRequest, LoadRequest, UnloadRequest):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
    components.setdefault("Mode", TypeAdapter(Mode).json_schema())  # /predict's hand-declared ?mode=
    app.openapi_schema = schema
    return schema
