"""Liveness, readiness (always open) and ``/metrics`` (open unless MIXINFER_METRICS_KEY is set)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.deps import HolderDep, MetricsDep, SettingsDep
from service.api.metrics_port import UNAUTHORIZED_MESSAGE, metrics_authorised
from service.api.responses import OrjsonResponse
from service.api.schemas import ErrorBody, LiveResponse, ReadyResponse
from service.errors import NotFoundError, NotReadyError, UnauthorizedError

LOGGER = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

#: a 503 readiness answer says when to look again, as a 503 error does
NOT_READY_HEADERS = {"Retry-After": str(NotReadyError.retry_after_s)}


@router.get("/health/live", response_model=LiveResponse)
async def live() -> Response:
    """The process answers (independent of the model)."""
    return OrjsonResponse({"live": True})


@router.get("/health/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def ready(holder: HolderDep) -> Response:
    """200 once the model is loaded and warmed up, 503 before."""
    if holder.ready:
        return OrjsonResponse({"ready": True})
    return OrjsonResponse({"ready": False}, status_code=503, headers=NOT_READY_HEADERS)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}},
        401: {"model": ErrorBody, "description": "MIXINFER_METRICS_KEY is set and the request lacks it"},
        404: {"model": ErrorBody, "description": "served on MIXINFER_METRICS_PORT instead"},
    },
)
async def metrics(request: Request, m: MetricsDep, settings: SettingsDep) -> Response:
    """Prometheus exposition text (on MIXINFER_METRICS_PORT instead when set; behind MIXINFER_METRICS_KEY if set)."""
    if settings.metrics_port is not None:
        raise NotFoundError(f"/metrics is served on port {settings.metrics_port}")
    if not metrics_authorised(request.headers.get("Authorization"), settings.metrics_key_value()):
        raise UnauthorizedError(UNAUTHORIZED_MESSAGE)
    body, content_type = m.render()
    return Response(body, media_type=content_type)
