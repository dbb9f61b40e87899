"""The fused MI graph: pool gather, blend, classifier, softmax and mean over N in one ONNX model.

Built once at load time from the bundle's ``model.onnx`` and pool. Inputs: ``images`` float32 (B, C, H, W),
``partners`` int64 (B, N), ``lam`` float32 scalar. Output: ``mean_probs`` float32 (B, K) =
mean_j softmax(f(lam * images[b] + (1 - lam) * pool[partners[b, j]] / 255)). The pool is a uint8 initializer,
so on CUDA it is uploaded once and only images and indices cross the bus per call. The arithmetic follows the
host path step by step (u8 -> f32, / 255, ``x * lam + (1 - lam) * s``), so both agree to float rounding.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

LOGGER = logging.getLogger(__name__)

FUSED_INPUTS = ("images", "partners", "lam")
FUSED_OUTPUT = "mean_probs"
_PREFIX = "clf/"


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ValueError("the classifier has no default-domain opset import")


def build_fused_model(
    model_bytes: bytes,
    pool_images: NDArray[np.uint8],
    *,
    input_name: str = "images",
    output_name: str = "logits",
) -> onnx.ModelProto:
    """Wrap a classifier (images (B,C,H,W) -> logits (B,K)) into the fused MI graph described in the module doc.

    Args:
        model_bytes: the serialized classifier ONNX model.
        pool_images: uint8 (P, C, H, W).
        input_name: the classifier's input name.
        output_name: the classifier's logits output name.

    Returns:
        The fused model (same opset and IR version as the classifier).
    """
    clf = onnx.load_from_string(model_bytes)
    opset = _default_opset(clf)
    if opset < 13:
        raise ValueError(f"the fused MI graph needs a classifier with opset >= 13, got {opset}")
    clf = onnx.compose.add_prefix(clf, _PREFIX)
    c, h, w = (int(d) for d in pool_images.shape[1:])
    g = clf.graph

    inits = [
        numpy_helper.from_array(np.ascontiguousarray(pool_images, dtype=np.uint8), "mi/pool"),
        numpy_helper.from_array(np.array(255.0, dtype=np.float32), "mi/255"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "mi/one"),
        numpy_helper.from_array(np.array([-1, 1, c, h, w], dtype=np.int64), "mi/x_shape"),
        numpy_helper.from_array(np.array([-1, c, h, w], dtype=np.int64), "mi/flat_shape"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "mi/minus_one"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "mi/axis1"),
    ]
    pre = [
        helper.make_node("Gather", ["mi/pool", "partners"], ["mi/partner_u8"], axis=0),  # (B, N, C, H, W)
        helper.make_node("Cast", ["mi/partner_u8"], ["mi/partner_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["mi/partner_f", "mi/255"], ["mi/partner"]),
        helper.make_node("Reshape", ["images", "mi/x_shape"], ["mi/x5"]),  # (B, 1, C, H, W)
        helper.make_node("Mul", ["mi/x5", "lam"], ["mi/x_lam"]),
        helper.make_node("Sub", ["mi/one", "lam"], ["mi/one_minus_lam"]),
        helper.make_node("Mul", ["mi/partner", "mi/one_minus_lam"], ["mi/partner_w"]),
        helper.make_node("Add", ["mi/x_lam", "mi/partner_w"], ["mi/mixed"]),  # (B, N, C, H, W)
        helper.make_node("Reshape", ["mi/mixed", "mi/flat_shape"], [_PREFIX + input_name]),  # (B*N, C, H, W)
    ]
    post = [
        helper.make_node("Softmax", [_PREFIX + output_name], ["mi/probs"], axis=1),  # (B*N, K)
        helper.make_node("Shape", ["partners"], ["mi/bn"]),
        helper.make_node("Concat", ["mi/bn", "mi/minus_one"], ["mi/bnk"], axis=0),
        helper.make_node("Reshape", ["mi/probs", "mi/bnk"], ["mi/probs3"]),  # (B, N, K)
    ]
    if opset >= 18:
        post.append(helper.make_node("ReduceMean", ["mi/probs3", "mi/axis1"], [FUSED_OUTPUT], keepdims=0))
    else:
        post.append(helper.make_node("ReduceMean", ["mi/probs3"], [FUSED_OUTPUT], axes=[1], keepdims=0))

    graph = helper.make_graph(
        [*pre, *g.node, *post],
        "mixinfer_fused_mi",
        [
            helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", c, h, w]),
            helper.make_tensor_value_info("partners", TensorProto.INT64, ["batch", "n_mixes"]),
            helper.make_tensor_value_info("lam", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info(FUSED_OUTPUT, TensorProto.FLOAT, ["batch", None])],
        initializer=[*inits, *g.initializer],
        value_info=list(g.value_info),
    )
    graph.sparse_initializer.extend(g.sparse_initializer)
    fused = helper.make_model(graph, opset_imports=list(clf.opset_import), producer_name="mixinfer.fused")
    fused.ir_version = clf.ir_version
    fused.functions.extend(clf.functions)
    onnx.checker.check_model(fused)
    LOGGER.info(
        "built fused MI graph: pool %s uint8, opset %d, %d classifier nodes", pool_images.shape, opset, len(g.node)
    )
    return fused
