"""``POST /predict``: classify images with Mixup Inference."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import Field, TypeAdapter, ValidationError
from starlette.datastructures import QueryParams
from starlette.responses import Response

from service.api.deps import API_KEY, resolve_mode
from service.api.detail import answer_view, rest_predictions
from service.api.inference import refuse_banned_caller, request_deadline, run_inference
from service.api.inputs import read_images
from service.api.responses import OrjsonResponse
from service.api.schemas import ErrorBody, PredictResponse
from service.mi.params import Mode
from service.preprocess import MEDIA_TYPES

LOGGER = logging.getLogger(__name__)

router = APIRouter(tags=["predict"])

_IMAGE_SCHEMA = {"type": "string", "format": "binary"}
_TOP_K_DOC = "return the k most probable classes (at most 3 at MIXINFER_RESPONSE_DETAIL=label)"
_MODE_DOC = "combined (default); others need ALLOW_MODE_OVERRIDE"
#: The query parameters, declared by hand: FastAPI's generic parameter solving cost ~30 us per request even for an
#: empty query string (measured in-process on the default bundle, against ~0.3 ms for the whole route on the event
#: loop). This is exactly what FastAPI declares for ``Query(...)`` parameters (a test pins it), and
#: :func:`query_params` validates with the same pydantic constraints, so the 422 messages are unchanged.
PREDICT_QUERY: list[dict[str, Any]] = [
    {
        "name": "top_k",
        "in": "query",
        "required": False,
        "description": _TOP_K_DOC,
        "schema": {
            "anyOf": [{"type": "integer", "minimum": 1, "maximum": 100_000}, {"type": "null"}],
            "description": _TOP_K_DOC,
            "title": "Top K",
        },
    },
    {
        "name": "mode",
        "in": "query",
        "required": False,
        "description": _MODE_DOC,
        "schema": {
            "anyOf": [{"$ref": "#/components/schemas/Mode"}, {"type": "null"}],
            "description": _MODE_DOC,
            "title": "Mode",
        },
    },
]
_TOP_K: TypeAdapter[int | None] = TypeAdapter(Annotated[int | None, Field(ge=1, le=100_000)])
_MODE: TypeAdapter[Mode | None] = TypeAdapter(Mode | None)
#: /predict awaits :data:`API_KEY` itself (no FastAPI dependency to solve per request), so it declares the
#: security requirement a dependency on the scheme would declare (a test pins it)
PREDICT_BODY: dict[str, Any] = {
    "security": [{API_KEY.scheme_name: []}],
    "parameters": PREDICT_QUERY,
    "requestBody": {
        "required": True,
        "description": "images as multipart parts (any field name), one raw image body, or JSON instances",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"images": {"type": "array", "items": _IMAGE_SCHEMA, "minItems": 1}},
                    "required": ["images"],
                }
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictJsonBody"}},
            **{media: {"schema": _IMAGE_SCHEMA} for media in MEDIA_TYPES},
        },
    },
}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "undecodable image, wrong channels or shape, NaN/inf or out of range"},
    401: {"model": ErrorBody, "description": "missing or wrong API key (when API keys are configured)"},
    403: {"model": ErrorBody, "description": "mode override refused (MIXINFER_ALLOW_MODE_OVERRIDE is false)"},
    413: {"model": ErrorBody, "description": "body, image count or pixel count over the limit"},
    415: {"model": ErrorBody, "description": "unsupported content type"},
    422: {"model": ErrorBody, "description": "invalid query parameter"},
    429: {"model": ErrorBody, "description": "queue full or rate limit; see Retry-After"},
    503: {"model": ErrorBody, "description": "model not loaded and warmed up yet"},
    504: {"model": ErrorBody, "description": "no result within MIXINFER_REQUEST_TIMEOUT_S"},
}


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    openapi_extra=PREDICT_BODY,
    summary="Classify images with Mixup Inference",
)
async def predict(request: Request) -> Response:
    """Classify images with Mixup Inference; flags inputs whose detection gap reaches the threshold."""
    served = await API_KEY(request)
    refuse_banned_caller(request, served.caller)
    top_k, mode = query_params(request)
    settings = served.settings
    chosen = resolve_mode(mode, settings)
    model = served.holder.model
    t0 = time.perf_counter()
    deadline = request_deadline(request, settings)
    images = await read_images(request, model.spec, settings.max_images_per_request, deadline)
    served.metrics.observe_stage("decode", time.perf_counter() - t0)
    answer = await run_inference(
        request,
        holder=served.holder,
        metrics=served.metrics,
        settings=settings,
        images=images,
        mode=chosen,
        caller=served.caller,
    )
    return OrjsonResponse(rest_predictions(answer_view(answer, settings.response_detail, top_k)))


def query_params(request: Request) -> tuple[int | None, Mode | None]:
    """``top_k`` and ``mode`` (see :data:`PREDICT_QUERY`); nothing to parse for an empty query string.

    Raises:
        RequestValidationError: a value breaks its constraint (answered 422 like any declared parameter).
    """
    if not request.scope.get("query_string"):
        return None, None
    params = request.query_params
    errors: list[Any] = []
    top_k = _validate(_TOP_K, params, "top_k", errors)
    mode = _validate(_MODE, params, "mode", errors)
    if errors:
        raise RequestValidationError(errors)
    return top_k, mode


def _validate(adapter: TypeAdapter[Any], params: QueryParams, name: str, errors: list[Any]) -> Any:
    raw = params.get(name)
    if raw is None:
        return None
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        errors.extend({**e, "loc": ("query", name, *e["loc"])} for e in exc.errors(include_url=False))
        return None
