"""Read and check the user's exported ONNX model: one file, a runnable opset, a valid graph, one image input and
one class-score output (or the ones named on the command line)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from service.importing.options import ImportRefusedError

LOGGER = logging.getLogger(__name__)

#: element types an image input may have, by ONNX type -> numpy dtype name
INPUT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.UINT8: "uint8"}
OUTPUT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}
#: the lowest default-domain opset the adapters are written for (older models are converted up first)
MIN_OPSET = 13

Dim = int | str


@dataclass(frozen=True)
class Source:
    """The checked original model and what the import needs to know about it."""

    model: onnx.ModelProto
    sha256: str
    opset: int
    input_name: str
    input_type: str  #: float32, float16 or uint8
    input_dims: tuple[Dim, ...]  #: 4 dims, ints where fixed, names (or "?") where symbolic
    output_name: str
    output_type: str  #: float32 or float16
    output_dims: tuple[Dim, ...]
    original: onnx.ModelProto  #: the model as read (``model`` may be converted up to :data:`MIN_OPSET`)


def _dims(value: onnx.ValueInfoProto) -> tuple[Dim, ...] | None:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)


def is_scores_shape(dims: tuple[Dim, ...]) -> bool:
    """(B, K), or (B, ...) whose axes after the batch are all 1 but one: (B, 1, K), (B, K, 1, 1)."""
    return len(dims) == 2 or (len(dims) > 2 and sum(d != 1 for d in dims[1:]) <= 1)


def scores_count(dims: tuple[Dim, ...]) -> int | None:
    """K of a scores shape when its axes after the batch are fixed, else None."""
    rest = [d for d in dims[1:] if isinstance(d, int)]
    return int(np.prod(rest)) if len(rest) == len(dims) - 1 else None


def _type_name(elem: int) -> str:
    return str(TensorProto.DataType.Name(elem)).lower()


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain ("" or "ai.onnx") opset version."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ImportRefusedError("model: expected an opset import for the default ONNX domain, got none")


def check_runtime_opset(opset: int) -> None:
    """Refuse an opset the installed ONNX Runtime cannot run (tried on a one-node model of that opset)."""
    import onnxruntime as ort

    probe = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "opset_probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        ),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    probe.ir_version = 8
    try:
        ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types for an unknown opset
        raise ImportRefusedError(
            f"model opset: expected one that onnxruntime {ort.__version__} can run, got opset {opset} "
            f"({str(exc).splitlines()[0][:160]})"
        ) from None


def load_source(path: Path) -> tuple[onnx.ModelProto, str]:
    """Read the file once: the parsed model and its sha256; refuses external data and unparsable files."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImportRefusedError(f"--onnx {path}: expected a readable ONNX file, got {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and onnx's own errors
        raise ImportRefusedError(f"--onnx {path}: expected an ONNX model, got unparsable bytes ({exc})") from None
    external = [t.name for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if external:
        raise ImportRefusedError(
            f"--onnx {path}: expected one self-contained file, got external-data tensors {external[:3]} "
            "(re-save with onnx.save_model(model, path, save_as_external_data=False))"
        )
    return model, digest


def _pick(candidates: list[str], given: str | None, every: list[str], what: str, flag: str) -> str:
    if given is not None:
        if given not in every:
            raise ImportRefusedError(
                f"{flag} {given!r}: expected one of the graph's {what}s {every}, got no such {what}"
            )
        return given
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ImportRefusedError(f"model {what}s {every}: expected one that could be the {what}, got none")
    raise ImportRefusedError(
        f"model {what}s: expected one that could be the {what}, got {len(candidates)} {candidates}; pass {flag}"
    )


def inspect_source(path: Path, input_name: str | None = None, output_name: str | None = None) -> Source:
    """Load, check and describe the user's model.

    Raises:
        ImportRefusedError: external data, an opset ONNX Runtime cannot run, a graph that fails ``onnx.checker``,
            an ambiguous or non-image input, an ambiguous output, unsupported element types.
    """
    model, digest = load_source(path)
    opset = default_opset(model)
    check_runtime_opset(opset)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise ImportRefusedError(f"--onnx {path}: expected a graph that passes onnx.checker, got: {first}") from None
    original = model
    if opset < MIN_OPSET:
        try:
            from onnx import version_converter

            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception as exc:  # noqa: BLE001 - the converter raises plain errors per operator
            raise ImportRefusedError(
                f"model opset: expected >= {MIN_OPSET} or convertible to it, got opset {opset} ({exc})"
            ) from None
        LOGGER.info("converted the model from opset %d to %d for the adapters", opset, MIN_OPSET)
        opset = MIN_OPSET
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    names = [i.name for i in inputs]
    images = [i.name for i in inputs if (d := _dims(i)) is not None and len(d) == 4]
    chosen_in = _pick(images if len(inputs) > 1 else names, input_name, names, "input", "--input-name")
    extra = [n for n in names if n != chosen_in]
    if extra:
        raise ImportRefusedError(
            f"model inputs: expected only the image input {chosen_in!r} (others need a default value), got also "
            f"{extra} without defaults"
        )
    value = next(i for i in inputs if i.name == chosen_in)
    dims = _dims(value)
    if dims is None or len(dims) != 4:
        raise ImportRefusedError(
            f"input {chosen_in!r}: expected an image tensor of rank 4 (B,C,H,W) or (B,H,W,C), got rank "
            f"{'unknown' if dims is None else len(dims)} {list(dims or [])}"
        )
    elem = value.type.tensor_type.elem_type
    if elem not in INPUT_TYPES:
        raise ImportRefusedError(
            f"input {chosen_in!r}: expected element type float32, float16 or uint8, got {_type_name(elem)}"
        )
    outputs = list(model.graph.output)
    out_names = [o.name for o in outputs]
    scores = [o.name for o in outputs if (d := _dims(o)) is None or is_scores_shape(d)]
    chosen_out = _pick(scores if len(outputs) > 1 else out_names, output_name, out_names, "output", "--output-name")
    out = next(o for o in outputs if o.name == chosen_out)
    odims = _dims(out) or ("?", "?")
    if not is_scores_shape(odims):
        raise ImportRefusedError(
            f"output {chosen_out!r}: expected class scores (B, K) (or with unit axes: (B, 1, K), (B, K, 1, 1)), got "
            f"rank {len(odims)} {list(odims)}"
        )
    oelem = out.type.tensor_type.elem_type
    if oelem not in OUTPUT_TYPES:
        raise ImportRefusedError(
            f"output {chosen_out!r}: expected element type float32 or float16, got {_type_name(oelem)}"
        )
    LOGGER.info(
        "source %s (sha256 %s, opset %d): input %r %s %s, output %r %s %s",
        path,
        digest,
        opset,
        chosen_in,
        INPUT_TYPES[elem],
        list(dims),
        chosen_out,
        OUTPUT_TYPES[oelem],
        list(odims),
    )
    return Source(
        model, digest, opset, chosen_in, INPUT_TYPES[elem], dims, chosen_out, OUTPUT_TYPES[oelem], odims, original
    )
