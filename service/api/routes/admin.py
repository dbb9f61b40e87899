"""Model repository admin: hot swap of the served model's version (``Authorization: Bearer <ADMIN_KEY>``)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path
from starlette.responses import Response

from service.api.deps import AdminDep, HolderDep
from service.api.responses import OrjsonResponse
from service.api.schemas import LoadRequest, LoadResponse, OipErrorBody

LOGGER = logging.getLogger(__name__)

router = APIRouter(prefix="/v2/repository", tags=["admin"])

ERRORS: dict[int | str, dict[str, Any]] = {
    c: {"model": OipErrorBody, "description": d}
    for c, d in {
        400: "the new version cannot replace the served one (other input shape or classes)",
        401: "missing or wrong admin key",
        403: "admin routes disabled (no MIXINFER_ADMIN_KEY), or an API key instead of the admin key",
        429: "too many admin requests from this client address; see Retry-After",
        404: "no such model or version in the store",
        422: "invalid body",
        500: "the new version failed to load; the old one keeps serving",
        503: "no model loaded yet",
    }.items()
}


@router.post("/models/{name}/load", response_model=LoadResponse, responses=ERRORS)
async def load(
    holder: HolderDep,
    _admin: AdminDep,
    name: Annotated[str, Path(max_length=64)],
    body: Annotated[LoadRequest | None, Body()] = None,
) -> Response:
    """Load, warm up and atomically swap in a version from the store; on failure the old version keeps serving."""
    previous = holder.model.version
    version = body.parameters.version if body is not None else None
    model = await holder.swap(name, version)
    return OrjsonResponse({"name": model.name, "version": model.version, "previous_version": previous})
