"""Open Inference Protocol v2 (KServe / Triton): server and model metadata, health, infer (JSON and binary)."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from service import __version__
from service.api.deps import HolderDep, ServedDep, resolve_mode
from service.api.detail import OIP_OUTPUTS, answer_view, check_requested_outputs, model_metadata_doc, oip_tensors
from service.api.inference import (
    INLINE_BODY_BYTES,
    off_loop,
    refuse_banned_caller,
    request_deadline,
    run_inference,
    served_model,
)
from service.api.oip import HEADER_LENGTH, SERVER_EXTENSIONS, encode_infer, parse_infer
from service.api.responses import OrjsonResponse
from service.api.routes.health import NOT_READY_HEADERS
from service.api.schemas import InferResponse, ModelMetadata, OipErrorBody, ServerMetadata
from service.errors import NotReadyError

LOGGER = logging.getLogger(__name__)

router = APIRouter(prefix="/v2", tags=["v2"])

ModelName = Annotated[str, Path(description="the bundle's directory name", max_length=64)]
Version = Annotated[str, Path(description="the served version", max_length=16)]
_ERR = {"model": OipErrorBody}
ERRORS: dict[int | str, dict[str, Any]] = {
    c: {**_ERR, "description": d}
    for c, d in {
        400: "malformed request, wrong input name, datatype, shape or values",
        401: "missing or wrong API key",
        403: "mode override refused",
        404: "no such model or version",
        413: "body or image count over the limit",
        429: "queue full; see Retry-After",
        503: "model not ready",
        504: "deadline exceeded",
    }.items()
}
INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "JSON header of Inference-Header-Content-Length bytes, then the binary tensors",
            },
        },
    }
}


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> Response:
    """Server name, version and protocol extensions."""
    return OrjsonResponse({"name": "mixinfer", "version": __version__, "extensions": list(SERVER_EXTENSIONS)})


@router.get("/health/live", response_class=Response, responses={200: {"description": "live"}})
async def v2_live() -> Response:
    """Liveness (independent of the model)."""
    return Response(status_code=200)


@router.get(
    "/health/ready",
    response_class=Response,
    responses={200: {"description": "ready"}, 503: {"description": "not ready"}},
)
async def v2_ready(holder: HolderDep) -> Response:
    """Readiness: 200 once the model is loaded and warmed up."""
    if holder.ready:
        return Response(status_code=200)
    return Response(status_code=503, headers=NOT_READY_HEADERS)


@router.get("/models/{name}", response_model=ModelMetadata, responses=ERRORS)
@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=ERRORS)
async def model_metadata(served: ServedDep, name: ModelName, version: Version | None = None) -> Response:
    """Model metadata: input [-1, C, H, W] FP32 in [0, 1]; the outputs of the server's response detail."""
    return OrjsonResponse(model_metadata_doc(served_model(served.holder, name, version), served.settings))


@router.get("/models/{name}/ready", response_class=Response, responses={200: {"description": "ready"}, **ERRORS})
@router.get(
    "/models/{name}/versions/{version}/ready",
    response_class=Response,
    responses={200: {"description": "ready"}, **ERRORS},
)
async def model_ready(holder: HolderDep, name: ModelName, version: Version | None = None) -> Response:
    """200 when this model (version) is loaded and warmed up."""
    if not holder.ready:
        raise NotReadyError(holder.not_ready_reason())
    served_model(holder, name, version, disclose=False)
    return Response(status_code=200)


@router.post("/models/{name}/infer", response_model=InferResponse, responses=ERRORS, openapi_extra=INFER_BODY)
@router.post(
    "/models/{name}/versions/{version}/infer", response_model=InferResponse, responses=ERRORS, openapi_extra=INFER_BODY
)
async def infer(
    request: Request,
    *,
    served: ServedDep,
    name: ModelName,
    version: Version | None = None,
) -> Response:
    """Classify a [B, C, H, W] tensor with Mixup Inference (Triton/KServe clients, JSON or binary tensors)."""
    settings, metrics = served.settings, served.metrics
    model = served_model(served.holder, name, version)
    refuse_banned_caller(request, served.caller)
    t0 = time.perf_counter()
    detail = settings.response_detail
    body = await request.body()
    args = (body, request.headers.get(HEADER_LENGTH), model.manifest.input.name, model.spec)
    if len(body) > INLINE_BODY_BYTES:  # parsed and converted on a worker thread: the event loop keeps serving
        deadline = request_deadline(request, settings)
        parsed = await off_loop(
            deadline, parse_infer, *args, settings.max_images_per_request, default_outputs=OIP_OUTPUTS[detail]
        )
    else:
        parsed = parse_infer(*args, settings.max_images_per_request, default_outputs=OIP_OUTPUTS[detail])
    check_requested_outputs(parsed.outputs, detail)
    mode = resolve_mode(parsed.mode, settings)
    images = parsed.images
    metrics.observe_stage("decode", time.perf_counter() - t0)
    answer = await run_inference(
        request,
        holder=served.holder,
        metrics=metrics,
        settings=settings,
        images=images,
        mode=mode,
        caller=served.caller,
    )
    tensors = oip_tensors(answer_view(answer, detail))
    header: dict[str, Any] = {"model_name": answer.model.name, "model_version": answer.model.version}
    if parsed.request_id is not None:
        header["id"] = parsed.request_id
    body, header_len = encode_infer(header, tensors, parsed.outputs)
    if header_len is None:
        return Response(body, media_type="application/json")
    return Response(
        body, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(header_len)}
    )
