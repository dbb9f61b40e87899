"""Open Inference Protocol v2 over gRPC: decode a ``ModelInferRequest`` into the image tensor, encode the answer, and
map the exception tree to gRPC status codes the way :mod:`service.api.errors` maps it to HTTP.

The messages are the generated modules NVIDIA's ``tritonclient`` ships (``tritonclient.grpc.service_pb2``), which
are KServe's ``inference.GRPCInferenceService`` protocol; they are imported lazily, by the gRPC server only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from numpy.typing import NDArray

from service.api.oip import check_shape, raw_tensor
from service.api.schemas import INPUT_DATATYPE
from service.errors import InvalidInputError, MixinferError
from service.mi.params import Mode
from service.preprocess import ImageSpec, check_pixel_values

if TYPE_CHECKING:
    from tritonclient.grpc import service_pb2

LOGGER = logging.getLogger(__name__)

#: every typed ``contents`` field of the protocol; an FP32 input may use ``fp32_contents`` only
_TYPED = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)
_FP32 = np.dtype("<f4")
#: HTTP status of the exception tree -> gRPC status code (499: the client cancelled)
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


@dataclass(frozen=True)
class GrpcInfer:
    """One validated gRPC infer request: a float32 (B, C, H, W) batch in [0, 1] and what to answer."""

    images: NDArray[np.float32]
    mode: Mode | None
    outputs: list[str]  #: output names in the order to return


def decode_infer(
    request: service_pb2.ModelInferRequest,
    input_name: str,
    spec: ImageSpec,
    max_images: int,
    *,
    default_outputs: tuple[str, ...],
) -> GrpcInfer:
    """The request's one input, from ``raw_input_contents`` or typed ``fp32_contents``, checked as REST checks it
    (:func:`service.api.oip.parse_infer`): name, FP32, the shape against the model and ``max_images`` before any
    data is converted, then the pixel values. ``default_outputs`` are returned when the request names none.

    Raises:
        InvalidInputError: wrong input count, name, datatype, shape, contents or values.
        PayloadTooLargeError: more than ``max_images`` images.
    """
    if len(request.inputs) != 1:
        raise InvalidInputError(
            f"inference request must have exactly 1 input named {input_name!r}, got {len(request.inputs)}"
        )
    inp = request.inputs[0]
    if inp.name != input_name:
        raise InvalidInputError(f"input must be named {input_name!r}, got {inp.name!r}")
    if inp.datatype != INPUT_DATATYPE:
        raise InvalidInputError(f"input datatype must be {INPUT_DATATYPE!r}, got {inp.datatype!r}")
    count = check_shape(list(inp.shape), spec, max_images)
    given = [f for f in _TYPED if len(getattr(inp.contents, f))]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1 or given:
            raise InvalidInputError(
                f"send the input once: 1 raw_input_contents entry and no typed contents, got "
                f"{len(request.raw_input_contents)} raw entries and typed {given}"
            )
        raw = request.raw_input_contents[0]
        if len(raw) != count * _FP32.itemsize:
            raise InvalidInputError(
                f"raw input of shape {list(inp.shape)} FP32 needs {count * _FP32.itemsize} bytes, got {len(raw)}"
            )
        images = np.frombuffer(raw, dtype=_FP32).astype(np.float32, copy=False).reshape(list(inp.shape))
    else:
        if given != ["fp32_contents"]:
            raise InvalidInputError(
                f"an FP32 input needs contents.fp32_contents or raw_input_contents, got {given or 'none'}"
            )
        values = inp.contents.fp32_contents
        if len(values) != count:
            raise InvalidInputError(f"input shape {list(inp.shape)} needs {count} values, got {len(values)}")
        images = np.asarray(values, dtype=np.float32).reshape(list(inp.shape))
    check_pixel_values(images)
    return GrpcInfer(images, _mode_parameter(request), [o.name for o in request.outputs] or list(default_outputs))


def _mode_parameter(request: service_pb2.ModelInferRequest) -> Mode | None:
    if "mode" not in request.parameters:
        return None
    param = request.parameters["mode"]
    value = getattr(param, param.WhichOneof("parameter_choice") or "string_param")
    if not isinstance(value, str) or value not in {m.value for m in Mode}:
        raise InvalidInputError(
            f"parameters.mode must be a string_param, one of {[m.value for m in Mode]}, got {value!r}"
        )
    return Mode(value)


def encode_infer(
    response: service_pb2.ModelInferResponse, tensors: dict[str, tuple[str, NDArray[Any]]], outputs: list[str]
) -> None:
    """Append ``outputs`` to ``response`` as raw little-endian tensors (what Triton sends and tritonclient reads)."""
    for name in outputs:
        datatype, arr = tensors[name]
        response.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        response.raw_output_contents.append(raw_tensor(datatype, arr))


def error_status(exc: MixinferError) -> tuple[grpc.StatusCode, tuple[tuple[str, str | bytes], ...]]:
    """The gRPC status code of ``exc`` and the trailing metadata that goes with it.

    An error REST answers with ``Retry-After`` (429 rate limited: RESOURCE_EXHAUSTED; 503 queue full or not ready:
    UNAVAILABLE) carries ``google.rpc.RetryInfo`` in the standard ``grpc-status-details-bin`` trailer plus a
    ``retry-after`` trailer in seconds.
    """
    code = GRPC_CODES.get(exc.status_code, grpc.StatusCode.INTERNAL)
    if exc.retry_after_s is None:
        return code, ()
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2

    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=exc.retry_after_s)))
    status = status_pb2.Status(code=code.value[0], message=exc.message, details=[detail])
    return code, (("grpc-status-details-bin", status.SerializeToString()), ("retry-after", str(exc.retry_after_s)))
