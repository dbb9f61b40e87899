"""Liveness, readiness and ``/metrics``; always open (no API key)."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from starlette.responses import Response

from service.api.deps import HolderDep, MetricsDep
from service.api.responses import OrjsonResponse
from service.api.schemas import LiveResponse, ReadyResponse

LOGGER = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=LiveResponse)
async def live() -> Response:
    """The process answers (independent of the model)."""
    return OrjsonResponse({"live": True})


@router.get("/health/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def ready(holder: HolderDep) -> Response:
    """200 once the model is loaded and warmed up, 503 before."""
    ok = holder.ready
    return OrjsonResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(m: MetricsDep) -> Response:
    """Prometheus exposition text."""
    body, content_type = m.render()
    return Response(body, media_type=content_type)
