"""``GET /info`` (the served model, for clients and the browser page) and ``GET /recent-gaps`` (the latest
detection gaps, only where the server discloses gaps: ``MIXINFER_RESPONSE_DETAIL=full``)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from service import __version__
from service.api.deps import ServedDep
from service.api.responses import OrjsonResponse
from service.api.runtime import RECENT_GAPS
from service.api.schemas import ErrorBody, InfoResponse, RecentGapsResponse
from service.errors import ForbiddenError

LOGGER = logging.getLogger(__name__)

router = APIRouter(tags=["info"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong API key (when API keys are configured)"},
    429: {"model": ErrorBody, "description": "rate limit; see Retry-After"},
    503: {"model": ErrorBody, "description": "model not loaded and warmed up yet"},
}


@router.get("/info", response_model=InfoResponse, responses=_ERRORS)
async def info(served: ServedDep) -> Response:
    """The served model, its classes and input shape, and how much the server discloses per prediction."""
    model = served.holder.model
    return OrjsonResponse(
        {
            "server_version": __version__,
            "model": model.name,
            "version": model.version,
            "classes": list(model.class_names),
            "input_shape": list(model.spec.shape),
            "response_detail": served.settings.response_detail,
        }
    )


@router.get(
    "/recent-gaps",
    response_model=RecentGapsResponse,
    responses={
        **_ERRORS,
        403: {"model": ErrorBody, "description": "gaps are hidden (MIXINFER_RESPONSE_DETAIL is not full)"},
    },
)
async def recent_gaps(served: ServedDep) -> Response:
    """The latest detection gaps of the served version and its threshold (only with full response detail)."""
    detail = served.settings.response_detail
    if detail != "full":
        raise ForbiddenError(
            f"recent detection gaps are hidden: this server runs MIXINFER_RESPONSE_DETAIL={detail}, they are "
            "published with MIXINFER_RESPONSE_DETAIL=full only"
        )
    model = served.holder.model
    return OrjsonResponse(
        {
            "model": model.name,
            "version": model.version,
            "threshold": model.threshold,
            "window": RECENT_GAPS,
            "gaps": list(model.recent_gaps),
        }
    )
