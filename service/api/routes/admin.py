"""Model repository extension of OIP v2 (Triton's semantics, for the one model this server serves), admin-keyed
(``Authorization: Bearer <ADMIN_KEY>``): index, load (hot swap of a version), unload.

Bodies are read as JSON whatever the content type (tritonclient posts ``{}`` without one), and may be empty.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Path, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from service.api.deps import AdminDep, HolderDep, SettingsDep
from service.api.responses import OrjsonResponse
from service.api.runtime import ModelHolder
from service.api.schemas import (
    IndexRequest,
    LoadRequest,
    LoadResponse,
    RepositoryModel,
    UnloadRequest,
    UnloadResponse,
    oip_errors,
)
from service.config import Settings
from service.errors import InvalidInputError

LOGGER = logging.getLogger(__name__)

router = APIRouter(prefix="/v2/repository", tags=["admin"])

_COMMON = {
    401: "missing or wrong admin key",
    403: "admin routes disabled (no MIXINFER_ADMIN_KEY), or an API key instead of the admin key",
    422: "invalid body",
    429: "too many admin requests from this client address; see Retry-After",
}
ERRORS = oip_errors(
    {
        **_COMMON,
        400: "the new version cannot replace the served one (other input shape or classes), or a body not JSON",
        404: "no such model or version in the store",
        500: "the new version failed to load; the old one keeps serving",
        503: "no model loaded yet",
    }
)
_Body = TypeVar("_Body", bound=BaseModel)
ModelName = Annotated[str, Path(max_length=64)]


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its JSON body itself (optional, any content type)."""
    return {
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


async def read_body(request: Request, model: type[_Body]) -> _Body:
    """``model`` from the body: JSON whatever the content type, an empty body is ``{}``.

    Raises:
        InvalidInputError: the body is not JSON (400).
        RequestValidationError: it does not fit ``model`` (422).
    """
    raw = await request.body()
    try:
        doc = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError(f"the body must be JSON (or empty), got invalid JSON: {exc}") from None
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


@router.post(
    "/index",
    response_model=list[RepositoryModel],
    responses={c: v for c, v in ERRORS.items() if c in _COMMON},
    openapi_extra=_json_body(IndexRequest),
)
async def index(request: Request, holder: HolderDep, settings: SettingsDep, _admin: AdminDep) -> Response:
    """Every version of the served model in the store: READY for the served one, else UNAVAILABLE with the
    reason (``{"ready": true}``: the ready ones only)."""
    body = await read_body(request, IndexRequest)
    return OrjsonResponse(repository_index(holder, settings, ready_only=body.ready))


def repository_index(holder: ModelHolder, settings: Settings, *, ready_only: bool) -> list[dict[str, str]]:
    """The repository index (REST and gRPC): every version of the served model in the store, READY for the served
    one, else UNAVAILABLE with the reason; ``ready_only``: the ready ones only."""
    from service.store import list_versions

    current = holder.current
    unloaded = holder.unloaded
    entries = []
    for version in list_versions(settings.model_dir, settings.model_name):
        ready = current is not None and current.version == version
        if ready_only and not ready:
            continue
        if ready:
            state, reason = "READY", ""
        elif unloaded is not None and unloaded.version == version:
            state, reason = "UNAVAILABLE", "unloaded"
        else:
            state, reason = "UNAVAILABLE", "not loaded: a hot swap (load) serves it"
        entries.append({"name": settings.model_name, "version": version, "state": state, "reason": reason})
    return entries


@router.post(
    "/models/{name}/load", response_model=LoadResponse, responses=ERRORS, openapi_extra=_json_body(LoadRequest)
)
async def load(request: Request, holder: HolderDep, _admin: AdminDep, name: ModelName) -> Response:
    """Load, warm up and atomically swap in a version from the store (``parameters.version``, default the highest);
    on failure the old version keeps serving. After an unload it serves the model again."""
    body = await read_body(request, LoadRequest)
    previous = holder.current or holder.unloaded
    model = await holder.swap(name, body.parameters.version)
    return OrjsonResponse(
        {
            "name": model.name,
            "version": model.version,
            "previous_version": previous.version if previous is not None else None,
        }
    )


@router.post(
    "/models/{name}/unload",
    response_model=UnloadResponse,
    responses={c: ERRORS[c] for c in (*_COMMON, 404, 503)},
    openapi_extra=_json_body(UnloadRequest),
)
async def unload(request: Request, holder: HolderDep, _admin: AdminDep, name: ModelName) -> Response:
    """Stop serving the model: requests admitted already are answered, new ones and readiness get 503 until a
    load. ``parameters.unload_dependents`` is accepted (this server has no dependent models)."""
    await read_body(request, UnloadRequest)
    served = await holder.unload(name)
    return OrjsonResponse({"name": served.name, "version": served.version, "state": "UNAVAILABLE"})
