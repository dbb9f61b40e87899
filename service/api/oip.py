"""Open Inference Protocol v2 codec, with Triton's binary-tensor extension (``Inference-Header-Content-Length``).

A request is a JSON header, optionally followed by the raw bytes of the inputs that declare
``parameters.binary_data_size`` (in input order). A response is JSON, or a JSON header followed by the raw bytes of
every output returned with ``binary_data`` (FP32 little-endian, BOOL one byte each, BYTES as 4-byte little-endian
length + bytes per element).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray

from service.errors import InvalidInputError

LOGGER = logging.getLogger(__name__)

HEADER_LENGTH = "inference-header-content-length"
_NUMPY: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "FP16": np.dtype("<f2"),
    "UINT8": np.dtype("u1"),
}
OUTPUT_NAMES = ("probabilities", "label", "adversarial", "detection_gap")


@dataclass(frozen=True)
class ParsedInfer:
    """One decoded inference request."""

    request_id: str | None
    tensor: NDArray[Any]
    parameters: dict[str, Any]
    outputs: list[tuple[str, bool]]  #: (name, binary) in the order to return


def parse_infer(body: bytes, header_length: str | None, input_name: str) -> ParsedInfer:
    """Decode an infer request body (JSON or JSON + binary tensors) into the single image tensor it carries.

    Raises:
        InvalidInputError: malformed JSON, wrong input name, datatype, shape or binary sizes.
    """
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidInputError(
                f"Inference-Header-Content-Length must be an integer <= the body size {len(body)}, "
                f"got {header_length!r}"
            )
        split = int(header_length)
        head, rest = body[:split], memoryview(body)[split:]
    else:
        head, rest = body, memoryview(b"")
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError(f"inference header is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInputError("inference request must be a JSON object")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidInputError(f"inference request must have exactly 1 input named {input_name!r}")
    inp = inputs[0]
    if inp.get("name") != input_name:
        raise InvalidInputError(f"input must be named {input_name!r}, got {inp.get('name')!r}")
    datatype = inp.get("datatype")
    if datatype not in _NUMPY:
        raise InvalidInputError(f"input datatype must be one of {sorted(_NUMPY)}, got {datatype!r}")
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidInputError(f"input shape must be a list of non-negative integers, got {shape!r}")
    count = int(np.prod(shape)) if shape else 1
    dtype = _NUMPY[datatype]
    params = inp.get("parameters") or {}
    binary_size = params.get("binary_data_size") if isinstance(params, dict) else None
    if binary_size is not None:
        if not isinstance(binary_size, int) or binary_size != len(rest):
            raise InvalidInputError(
                f"binary_data_size is {binary_size!r} but {len(rest)} binary bytes follow the header"
            )
        if binary_size != count * dtype.itemsize:
            raise InvalidInputError(
                f"binary input of shape {shape} {datatype} needs {count * dtype.itemsize} bytes, got {binary_size}"
            )
        tensor = np.frombuffer(rest, dtype=dtype).reshape(shape)
    else:
        if rest:
            raise InvalidInputError("binary bytes follow the header but the input declares no binary_data_size")
        data = inp.get("data")
        if not isinstance(data, list):
            raise InvalidInputError("input needs 'data' (or parameters.binary_data_size with binary bytes)")
        try:
            flat = np.asarray(data, dtype=dtype).reshape(-1)
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(f"input data is not a numeric array of {datatype}: {exc}") from None
        if flat.size != count:
            raise InvalidInputError(f"input shape {shape} needs {count} values, got {flat.size}")
        tensor = flat.reshape(shape)

    req_params = doc.get("parameters") or {}
    if not isinstance(req_params, dict):
        raise InvalidInputError("request 'parameters' must be an object")
    outputs = _requested_outputs(doc.get("outputs"), bool(req_params.get("binary_data_output", False)))
    rid = doc.get("id")
    return ParsedInfer(str(rid) if rid is not None else None, tensor, req_params, outputs)


def _requested_outputs(requested: Any, binary_default: bool) -> list[tuple[str, bool]]:
    if requested is None:
        return [(name, binary_default) for name in OUTPUT_NAMES]
    if not isinstance(requested, list):
        raise InvalidInputError("'outputs' must be a list of {name, parameters}")
    out: list[tuple[str, bool]] = []
    for item in requested:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in OUTPUT_NAMES:
            raise InvalidInputError(f"unknown output {name!r}; outputs are {list(OUTPUT_NAMES)}")
        params = item.get("parameters") or {}
        out.append((name, bool(params.get("binary_data", binary_default)) if isinstance(params, dict) else False))
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
            raw = _raw(datatype, arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = [s.decode() for s in arr.reshape(-1)] if datatype == "BYTES" else arr.reshape(-1)
        items.append(entry)
    head = orjson.dumps({**header, "outputs": items}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def _raw(datatype: str, arr: NDArray[Any]) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(s)) + s for s in arr.reshape(-1))
    if datatype == "BOOL":
        return np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    return np.ascontiguousarray(arr, dtype="<f4").tobytes()
