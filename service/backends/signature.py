"""What a served model and its pool must look like, checked in one place for the store and the backend.

The model: one float32 input (B, C, H, W) with a dynamic batch axis and the pool's (C, H, W), and a float32
logits output (B, K) with K >= 2 (K may be symbolic, e.g. a Reshape to [batch, -1]: the backend then finds it with
one forward).
The pool: uint8 (P, C, H, W) with P >= 1. Every check raises :class:`ValueError` with what, expected and got; the
store turns it into a ``BundleError``, the backend into a ``BackendError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: a dimension as the model declares it: a size, or a symbol ("batch", "?" when unnamed)
Dim = int | str


@dataclass(frozen=True)
class Signature:
    """The declared inputs and outputs of an ONNX graph (initializers are not inputs)."""

    #: (name, element type name e.g. "FLOAT", dims) per graph input
    inputs: tuple[tuple[str, str, tuple[Dim, ...]], ...]
    #: dims per output name
    outputs: dict[str, tuple[Dim, ...]]
    #: element type name (e.g. "FLOAT") per output name
    output_types: dict[str, str]


def read_signature(model: Any) -> Signature:
    """The signature of an ``onnx.ModelProto``."""
    import onnx

    def dims(value_info: Any) -> tuple[Dim, ...]:
        shape = value_info.type.tensor_type.shape.dim
        return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape)

    init_names = {i.name for i in model.graph.initializer}
    inputs = tuple(
        (i.name, onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type), dims(i))
        for i in model.graph.input
        if i.name not in init_names
    )
    outputs = {o.name: dims(o) for o in model.graph.output}
    types = {o.name: onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type) for o in model.graph.output}
    return Signature(inputs, outputs, types)


def check_signature(
    sig: Signature,
    *,
    input_name: str,
    output_name: str,
    pool_shape: tuple[int, ...],
    expected_shape: tuple[int, ...] | None = None,
    expected_classes: int | None = None,
) -> int | None:
    """Check a model against its pool (and the manifest's shape and class count when given).

    Returns:
        K when the model declares it, None when the class axis is symbolic.

    Raises:
        ValueError: what, expected and got.
    """
    names = [name for name, _, _ in sig.inputs]
    if len(sig.inputs) != 1 or names[0] != input_name:
        raise ValueError(f"expected one input named {input_name!r}, got {names}")
    _, elem_type, dims = sig.inputs[0]
    if elem_type != "FLOAT":
        raise ValueError(f"input {input_name!r} must be float32, got {elem_type}")
    if len(dims) != 4:
        raise ValueError(f"input {input_name!r} must be 4-D (B,C,H,W), got {list(dims)}")
    if isinstance(dims[0], int):
        raise ValueError(f"input {input_name!r} must have a dynamic batch axis, got fixed size {dims[0]}")
    wanted = [("pool", tuple(pool_shape))] + ([("manifest", tuple(expected_shape))] if expected_shape else [])
    if any(tuple(dims[1:]) != shape for _, shape in wanted):
        raise ValueError(
            f"model input shape must agree with the {' and the '.join(w for w, _ in wanted)}, expected "
            f"{' = '.join(f'{shape} ({w})' for w, shape in wanted)}, got {tuple(dims[1:])}"
        )
    if output_name not in sig.outputs:
        raise ValueError(f"expected an output named {output_name!r}, got {list(sig.outputs)}")
    if sig.output_types[output_name] != "FLOAT":
        raise ValueError(f"output {output_name!r} must be float32 logits, got {sig.output_types[output_name]}")
    out = [d if isinstance(d, int) else None for d in sig.outputs[output_name]]
    if len(out) != 2 or (out[1] is not None and expected_classes is not None and out[1] != expected_classes):
        raise ValueError(f"output {output_name!r} must be (B, {expected_classes or 'K'}) logits, got {out}")
    if out[1] is not None:
        check_classes(out[1], expected_classes, output_name)
    return out[1]


def check_classes(k: int, expected: int | None, output_name: str = "logits") -> None:
    """K >= 2, and K equal to the manifest's when given (also for a K found by a forward)."""
    if k < 2:
        raise ValueError(f"output {output_name!r} must have >= 2 classes, got {k}")
    if expected is not None and k != expected:
        raise ValueError(f"output {output_name!r} must have the manifest's {expected} classes, got {k}")


def check_pool_images(images: np.ndarray) -> None:
    """uint8 (P, C, H, W) with P >= 1."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"pool images must be uint8 (P,C,H,W), got {images.dtype} {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"pool must hold >= 1 image, got shape {images.shape}")
