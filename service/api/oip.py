"""Open Inference Protocol v2 codec, with Triton's binary-tensor extension (``Inference-Header-Content-Length``).

A request is a JSON header, optionally followed by the raw bytes of the inputs that declare
``parameters.binary_data_size`` (in input order). A response is JSON, or a JSON header followed by the raw bytes of
every output returned with ``binary_data`` (FP32 little-endian, BOOL one byte each, BYTES as 4-byte little-endian
length + bytes per element).
"""

from __future__ import annotations

import logging
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray
from pydantic import ValidationError

from service.api.schemas import InferRequest, InferRequestedOutput
from service.errors import InvalidInputError, PayloadTooLargeError
from service.mi.params import Mode
from service.preprocess import ImageSpec, check_pixel_values, numeric_array

LOGGER = logging.getLogger(__name__)

HEADER_LENGTH = "inference-header-content-length"
#: ASCII digits only (``str.isdigit`` also takes "²"); 12 digits is far beyond any body limit
_LENGTH = re.compile(r"[0-9]{1,12}")
_FP32 = np.dtype("<f4")
#: the gRPC service of the protocol (KServe / Triton ``grpc_service.proto``), served by service/api/grpc_server.py
GRPC_SERVICE = "inference.GRPCInferenceService"
#: the protocol extensions server metadata lists (REST and gRPC)
SERVER_EXTENSIONS = ("binary_tensor_data", "model_repository")
#: at most this many characters of a refused value are quoted back in an error message
_QUOTE_CHARS = 60


@dataclass(frozen=True)
class ParsedInfer:
    """One validated inference request: a float32 (B, C, H, W) batch in [0, 1] and what to answer."""

    request_id: str | None
    images: NDArray[np.float32]
    mode: Mode | None
    outputs: list[tuple[str, bool]]  #: (name, binary) in the order to return


def parse_infer(
    body: bytes,
    header_length: str | None,
    input_name: str,
    spec: ImageSpec,
    max_images: int,
    *,
    default_outputs: tuple[str, ...],
) -> ParsedInfer:
    """Validate an infer request body (JSON, or JSON header + binary tensors) and convert its one input.

    ``default_outputs`` are returned when the request names none (they depend on the response detail).

    The JSON header is validated as data (:class:`~service.api.schemas.InferRequest`), then the shape against the
    model and ``max_images``; only then is any tensor data converted.

    Raises:
        InvalidInputError: malformed header, wrong types, input name, datatype, shape, sizes or pixel values.
        PayloadTooLargeError: ``shape[0]`` over ``max_images``.
    """
    head, rest = _split(body, header_length)
    request = _validate_header(head)
    inp = request.inputs[0]
    if inp.name != input_name:
        raise InvalidInputError(f"input must be named {input_name!r}, got {inp.name!r}")
    count = check_shape(inp.shape, spec, max_images)
    binary_size = inp.parameters.binary_data_size if inp.parameters is not None else None
    if binary_size is not None:
        if binary_size != len(rest):
            raise InvalidInputError(f"binary_data_size is {binary_size} but {len(rest)} binary bytes follow the header")
        if binary_size != count * _FP32.itemsize:
            raise InvalidInputError(
                f"binary input of shape {inp.shape} FP32 needs {count * _FP32.itemsize} bytes, got {binary_size}"
            )
        images = np.frombuffer(rest, dtype=_FP32).astype(np.float32, copy=False).reshape(inp.shape)
    else:
        if rest:
            raise InvalidInputError("binary bytes follow the header but the input declares no binary_data_size")
        if inp.data is None:
            raise InvalidInputError("input needs 'data' (or parameters.binary_data_size with binary bytes)")
        flat = numeric_array(inp.data, "input data (FP32)").reshape(-1)
        if flat.size != count:
            raise InvalidInputError(f"input shape {inp.shape} needs {count} values, got {flat.size}")
        images = flat.reshape(inp.shape)
    check_pixel_values(images)
    params = request.parameters
    binary_default = params.binary_data_output if params is not None else False
    return ParsedInfer(
        request.id,
        images,
        params.mode if params is not None else None,
        _requested_outputs(request.outputs, binary_default, default_outputs),
    )


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary part, split at ``Inference-Header-Content-Length``."""
    if header_length is None:
        return body, memoryview(b"")
    if not _LENGTH.fullmatch(header_length) or int(header_length) > len(body):
        raise InvalidInputError(
            f"Inference-Header-Content-Length must be ASCII digits giving a length <= the body size {len(body)}, "
            f"got {_quote(header_length)}"
        )
    split = int(header_length)
    return body[:split], memoryview(body)[split:]


def _validate_header(head: bytes) -> InferRequest:
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError(f"inference header is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInputError(f"inference request must be a JSON object, got {type(doc).__name__}")
    try:
        return InferRequest.model_validate(doc)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}, got {_quote(err['input'])}"
            for err in exc.errors(include_url=False)[:5]
        ]
        raise InvalidInputError("; ".join(problems)) from None


def check_shape(shape: list[int], spec: ImageSpec, max_images: int) -> int:
    """The number of values of a [B, C, H, W] input shaped for the model with 1 <= B <= ``max_images``."""
    if len(shape) != 4 or tuple(shape[1:]) != spec.shape or shape[0] < 1:
        raise InvalidInputError(
            f"input shape must be [-1, {', '.join(map(str, spec.shape))}] with at least 1 image, got {shape}"
        )
    if shape[0] > max_images:
        raise PayloadTooLargeError(f"the request holds {shape[0]} images, the limit is {max_images} per request")
    return math.prod(shape)


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 3] + "..."


def _requested_outputs(
    requested: list[InferRequestedOutput] | None, binary_default: bool, defaults: tuple[str, ...]
) -> list[tuple[str, bool]]:
    if requested is None:
        return [(name, binary_default) for name in defaults]
    out: list[tuple[str, bool]] = []
    for item in requested:
        binary = item.parameters.binary_data if item.parameters is not None else None
        out.append((item.name, binary_default if binary is None else binary))
    return out


def encode_infer(
    header: dict[str, Any], tensors: dict[str, tuple[str, NDArray[Any]]], outputs: list[tuple[str, bool]]
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header length.

    Args:
        header: ``model_name``, ``model_version`` and ``id``.
        tensors: output name -> (OIP datatype, array).
        outputs: (name, binary) in the order to return.
    """
    items: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in outputs:
        datatype, arr = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            raw = raw_tensor(datatype, arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = [s.decode() for s in arr.reshape(-1)] if datatype == "BYTES" else arr.reshape(-1)
        items.append(entry)
    head = orjson.dumps({**header, "outputs": items}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def raw_tensor(datatype: str, arr: NDArray[Any]) -> bytes:
    """An output tensor as OIP raw bytes: FP32 little-endian, BOOL one byte, BYTES 4-byte length + bytes each."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(s)) + s for s in arr.reshape(-1))
    if datatype == "BOOL":
        return np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    return np.ascontiguousarray(arr, dtype="<f4").tobytes()
