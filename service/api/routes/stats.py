"""``GET /v2/models[/{name}[/versions/{version}]]/stats``: Triton's per-model inference statistics (readable by
tritonclient's ``get_inference_statistics``), for the served version (see :mod:`service.api.stats`)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path
from starlette.responses import Response

from service.api.deps import ServedDep
from service.api.responses import OrjsonResponse
from service.api.schemas import ModelStatsResponse, oip_errors
from service.errors import ModelNotFoundError

LOGGER = logging.getLogger(__name__)

router = APIRouter(prefix="/v2/models", tags=["v2"])
Version = Annotated[str, Path(max_length=16)]

ERRORS = oip_errors(
    {401: "missing or wrong API key", 404: "no such model or version", 429: "rate limit; see Retry-After"}
)


@router.get("/stats", response_model=ModelStatsResponse, responses=ERRORS)
async def all_stats(served: ServedDep) -> Response:
    """The statistics of every served version (one, or none while nothing is loaded)."""
    model = served.holder.current
    stats = [] if model is None else [model.stats.to_triton(model.name, model.version)]
    return OrjsonResponse({"model_stats": stats})


@router.get("/{name}/stats", response_model=ModelStatsResponse, responses=ERRORS)
@router.get("/{name}/versions/{version}/stats", response_model=ModelStatsResponse, responses=ERRORS)
async def model_stats(
    served: ServedDep,
    name: Annotated[str, Path(max_length=64)],
    version: Version | None = None,
) -> Response:
    """The statistics of the served version of ``name`` (404 for another model or version)."""
    model = served.holder.model
    if name != model.name or (version is not None and version != model.version):
        raise ModelNotFoundError(f"no statistics for model {name!r}" + (f" version {version!r}" if version else ""))
    return OrjsonResponse({"model_stats": [model.stats.to_triton(model.name, model.version)]})
