"""The served graph: the server's convention (NCHW float32 in [0, 1] -> logits) wrapped around the user's model
with ``onnx.helper`` nodes, so that serving, calibration and evaluation all run one and the same graph.

Adapters, in order: layout transpose (NHWC models), scaling to 0-255, ``(x - mean) / std``, the input's element
type (float16: Cast; uint8: Round -> Clip(0, 255) -> Cast), the model, float32 output, and for a model that ends in
softmax ``log(max(p, 1e-30))`` (the engine applies softmax to what the graph returns: ``softmax(log p) = p``).

Batch: a model whose batch axis is symbolic keeps it (``symbolic``); a fixed batch of 1 is made symbolic
(``dynamic``); when that does not reproduce the model at a batch above 1 (hard-coded Reshape nodes), the model runs
inside an ONNX ``Scan`` over the batch, one image at a time (``scan``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.importing.graph import Source
from service.importing.options import ImportOptions, ImportRefusedError, Layout, OutputKind, PixelRange

LOGGER = logging.getLogger(__name__)

BatchMode = Literal["symbolic", "dynamic", "scan"]
PROB_FLOOR = 1e-30
#: names of the adapter nodes that the differentiable twin replaces by straight-through versions
ROUND_NODE, CAST_NODE = "mixinfer_round", "mixinfer_cast_uint8"
_ONNX_TYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "uint8": TensorProto.UINT8}


@dataclass(frozen=True)
class Adapters:
    """How the server's pixels become the model's input, and what the model returns."""

    layout: Layout
    shape: tuple[int, int, int]  #: (C, H, W) of one served image
    pixel_range: PixelRange
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    input_type: str
    output: OutputKind

    def model_input(self, images_u8: np.ndarray) -> np.ndarray:
        """The input the user's own pipeline would give the model for uint8 (B, C, H, W) images (numpy)."""
        if self.input_type == "uint8":
            x: np.ndarray = images_u8.astype(np.uint8)
        else:
            x = images_u8.astype(np.float32)
            if self.pixel_range == "0-1":
                x = x / np.float32(255.0)
            if self.mean is not None and self.std is not None:
                shape = (1, -1, 1, 1)
                x = (x - np.asarray(self.mean, np.float32).reshape(shape)) / np.asarray(self.std, np.float32).reshape(
                    shape
                )
            x = x.astype(self.input_type)
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1) if self.layout == "nhwc" else x)


def resolve_adapters(src: Source, opts: ImportOptions) -> Adapters:
    """Check the options against the graph and settle the served image shape.

    Raises:
        ImportRefusedError: a fixed batch other than 1, channels not 1 or 3, a symbolic size without
            ``--input-size`` (or one that disagrees with the graph), mean/std of the wrong length or zero std,
            normalisation on a uint8 input.
    """
    layout, input_size, pixel_range = opts.input_layout, opts.input_size, opts.pixel_range
    mean, std, output = opts.mean, opts.std, opts.output
    d = src.input_dims
    if isinstance(d[0], int) and d[0] != 1:
        raise ImportRefusedError(
            f"input {src.input_name!r} {list(d)}: expected a symbolic batch axis or a fixed batch of 1, got a fixed "
            f"batch of {d[0]} (re-export it with a dynamic batch axis)"
        )
    c, h, w = (d[1], d[2], d[3]) if layout == "nchw" else (d[3], d[1], d[2])
    if c not in (1, 3):
        raise ImportRefusedError(
            f"input {src.input_name!r} {list(d)} read as {layout.upper()}: expected 1 or 3 channels, got {c} "
            "(is --input-layout right?)"
        )
    size = (h, w)
    if isinstance(h, int) and isinstance(w, int):
        if input_size is not None and input_size != (h, w):
            raise ImportRefusedError(
                f"--input-size: expected the graph's fixed {h}x{w}, got {input_size[0]}x{input_size[1]}"
            )
    elif input_size is None:
        raise ImportRefusedError(
            f"input {src.input_name!r} {list(d)}: expected a fixed size or --input-size HxW, got a symbolic size"
        )
    else:
        size = input_size
    if (mean is None) != (std is None):
        raise ImportRefusedError(
            f"--mean/--std: expected both or neither, got {'--mean' if std is None else '--std'} only"
        )
    if src.input_type == "uint8":
        if pixel_range != "0-255":
            raise ImportRefusedError(
                f"--pixel-range: a uint8 input holds 0-255 pixels, expected 0-255, got {pixel_range}"
            )
        if mean is not None:
            raise ImportRefusedError(
                "--mean/--std: a uint8 input takes raw pixels, expected no normalisation, got --mean"
            )
    for flag, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) not in (1, int(c)):
            raise ImportRefusedError(f"{flag}: expected 1 or {c} values (one per channel), got {len(values)}")
    if std is not None and any(s == 0 for s in std):
        raise ImportRefusedError(f"--std: expected non-zero values, got {list(std)}")
    chw = (int(c), int(size[0]), int(size[1]))
    full = lambda v: None if v is None else tuple(float(x) for x in (v * int(c) if len(v) == 1 else v))  # noqa: E731
    return Adapters(layout, chw, pixel_range, full(mean), full(std), src.input_type, output)


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(value, name))


def _input_nodes(a: Adapters, source_name: str, target: str) -> list[onnx.NodeProto]:
    """served float32 NCHW [0, 1] ``source_name`` -> the model's input ``target``."""
    nodes: list[onnx.NodeProto] = []
    cur = source_name

    def step(op: str, extra: list[str], **attrs: Any) -> None:
        nonlocal cur
        out = f"mixinfer_{len(nodes)}_{op.lower()}"
        nodes.append(helper.make_node(op, [cur, *extra], [out], name=out, **attrs))
        cur = out

    if a.layout == "nhwc":
        step("Transpose", [], perm=[0, 2, 3, 1])
    bshape = (1, 1, 1, -1) if a.layout == "nhwc" else (1, -1, 1, 1)
    if a.pixel_range == "0-255":
        nodes.append(_const("mixinfer_255", np.array(255.0, np.float32)))
        step("Mul", ["mixinfer_255"])
    if a.mean is not None and a.std is not None:
        nodes.append(_const("mixinfer_mean", np.asarray(a.mean, np.float32).reshape(bshape)))
        nodes.append(_const("mixinfer_std", np.asarray(a.std, np.float32).reshape(bshape)))
        step("Sub", ["mixinfer_mean"])
        step("Div", ["mixinfer_std"])
    if a.input_type == "uint8":
        nodes.append(helper.make_node("Round", [cur], ["mixinfer_rounded"], name=ROUND_NODE))
        nodes.append(_const("mixinfer_lo", np.array(0.0, np.float32)))
        nodes.append(_const("mixinfer_hi", np.array(255.0, np.float32)))
        nodes.append(helper.make_node("Clip", ["mixinfer_rounded", "mixinfer_lo", "mixinfer_hi"], ["mixinfer_clipped"]))
        nodes.append(helper.make_node("Cast", ["mixinfer_clipped"], [target], name=CAST_NODE, to=TensorProto.UINT8))
    elif a.input_type == "float16":
        nodes.append(helper.make_node("Cast", [cur], [target], name="mixinfer_cast_float16", to=TensorProto.FLOAT16))
    else:
        nodes.append(helper.make_node("Identity", [cur], [target], name="mixinfer_input"))
    return nodes


def _output_nodes(a: Adapters, src: Source, scores: str, target: str) -> list[onnx.NodeProto]:
    """the model's scores -> float32 logits ``target``."""
    nodes: list[onnx.NodeProto] = []
    cur = scores
    if len(src.output_dims) > 2:  # (B, 1, K), (B, K, 1, 1): unit axes dropped
        nodes.append(helper.make_node("Flatten", [cur], ["mixinfer_scores2d"], name="mixinfer_flatten", axis=1))
        cur = "mixinfer_scores2d"
    if src.output_type != "float32":
        nodes.append(
            helper.make_node("Cast", [cur], ["mixinfer_scores32"], name="mixinfer_cast_out", to=TensorProto.FLOAT)
        )
        cur = "mixinfer_scores32"
    if a.output == "probabilities":
        nodes.append(_const("mixinfer_floor", np.array(PROB_FLOOR, np.float32)))
        nodes.append(helper.make_node("Max", [cur, "mixinfer_floor"], ["mixinfer_floored"], name="mixinfer_floor_p"))
        nodes.append(helper.make_node("Log", ["mixinfer_floored"], [target], name="mixinfer_log_p"))
    else:
        nodes.append(helper.make_node("Identity", [cur], [target], name="mixinfer_output"))
    return nodes


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def served_names(src: Source) -> tuple[str, str]:
    """Input and output names of the served graph: ``images`` and ``logits`` unless the model uses them."""
    used = _tensor_names(src.model.graph)
    return (
        "images" if "images" not in used else "mixinfer_images",
        "logits" if "logits" not in used else "mixinfer_logits",
    )


def _core(src: Source) -> onnx.GraphProto:
    """The model's graph cut to the chosen input and output (auxiliary outputs dropped)."""
    model = src.model
    if len(model.graph.output) > 1:
        from onnx.utils import Extractor

        model = Extractor(model).extract_model([src.input_name], [src.output_name])
    return model.graph


def build_served_model(src: Source, a: Adapters, batch: BatchMode) -> onnx.ModelProto:
    """The served graph (checked with ``onnx.checker``)."""
    core = _core(src)
    in_name, out_name = served_names(src)
    c, h, w = a.shape
    model_dims = [c, h, w] if a.layout == "nchw" else [h, w, c]
    elem = _ONNX_TYPE[a.input_type]
    served_in = helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["batch", c, h, w])
    served_out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", None])
    inits = list(core.initializer)
    if batch == "scan":
        adapted = "mixinfer_adapted"
        body_nodes = [
            _const("mixinfer_one_shape", np.asarray([1, *model_dims], np.int64)),
            helper.make_node("Reshape", ["mixinfer_scan_x", "mixinfer_one_shape"], [src.input_name]),
            *core.node,
            _const("mixinfer_flat_shape", np.asarray([-1], np.int64)),
            helper.make_node("Reshape", [src.output_name, "mixinfer_flat_shape"], ["mixinfer_scan_y"]),
        ]
        out_elem = _ONNX_TYPE[src.output_type]
        body = helper.make_graph(
            body_nodes,
            "mixinfer_one_image",
            [helper.make_tensor_value_info("mixinfer_scan_x", elem, model_dims)],
            [helper.make_tensor_value_info("mixinfer_scan_y", out_elem, [None])],
            initializer=inits,  # inside the body: the fused MI graph renames outer names (onnx.compose.add_prefix)
        )
        body.sparse_initializer.extend(core.sparse_initializer)
        inits = []
        scan = helper.make_node("Scan", [adapted], ["mixinfer_scan_scores"], body=body, num_scan_inputs=1)
        nodes = [*_input_nodes(a, in_name, adapted), scan, *_output_nodes(a, src, "mixinfer_scan_scores", out_name)]
    else:
        nodes = [
            *_input_nodes(a, in_name, src.input_name),
            *core.node,
            *_output_nodes(a, src, src.output_name, out_name),
        ]
    graph = helper.make_graph(nodes, "mixinfer_served", [served_in], [served_out], initializer=inits)
    if batch != "scan":
        graph.sparse_initializer.extend(core.sparse_initializer)
    model = helper.make_model(graph, opset_imports=list(src.model.opset_import), producer_name="mixinfer import")
    model.ir_version = src.model.ir_version
    model.functions.extend(src.model.functions)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ImportRefusedError(f"served graph ({batch} batch): expected it to pass onnx.checker, got {exc}") from None
    return model
