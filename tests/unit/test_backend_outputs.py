"""The ONNX Runtime backend against models whose output is not what it declares or not float32 logits.

Tiny real ONNX graphs over a (1, 2, 2) input: the store and the backend share one signature check, and what a model
really returns is checked against (rows, K) before any number reaches a client.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tinybundle import make_tiny_bundle, rehash

from service.backends.onnx import OrtBackend
from service.errors import BackendError, BundleError
from service.store import load_bundle

POOL = (np.arange(16).reshape(4, 1, 2, 2) * 10).astype(np.uint8)
X = np.random.default_rng(0).random((3, 1, 2, 2), dtype=np.float32)


def _model(nodes: list, out_type: int, out_shape: list, inits: tuple = ()) -> bytes:
    """images (batch, 1, 2, 2) -> nodes -> logits, opset 17."""
    graph = helper.make_graph(
        nodes,
        "odd",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", out_type, out_shape)],
        initializer=list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _flat() -> onnx.NodeProto:
    return helper.make_node("Flatten", ["images"], ["flat"], axis=1)  # (B, 4): K = 4


def _batch_mean_model() -> bytes:
    """Declares logits (batch, 4) but averages over the batch: always one row, whatever the batch."""
    reduce = helper.make_node("ReduceMean", ["flat"], ["logits"], axes=[0], keepdims=1)
    return _model([_flat(), reduce], TensorProto.FLOAT, ["batch", 4])


def _two_of_four_model() -> bytes:
    """Declares logits (batch, 4) but returns the first two columns: (B, 2)."""
    inits = [numpy_helper.from_array(np.array([v], dtype=np.int64), n) for n, v in (("s", 0), ("e", 2), ("a", 1))]
    slice_ = helper.make_node("Slice", ["flat", "s", "e", "a"], ["logits"])
    return _model([_flat(), slice_], TensorProto.FLOAT, ["batch", 4], tuple(inits))


def _cast_model(to: int) -> bytes:
    return _model([_flat(), helper.make_node("Cast", ["flat"], ["logits"], to=to)], to, ["batch", 4])


@pytest.mark.parametrize(("mixing", "static_shapes"), [("host", "off"), ("host", "on"), ("fused", "off")])
def test_a_model_that_returns_one_row_for_a_batch_is_refused_not_broadcast(mixing: str, static_shapes: str) -> None:
    """One row copied to every image (or, with static shapes, an average over the zero padding) is a wrong answer
    for every client: refused when the backend is built, before it serves anything."""
    with pytest.raises(BackendError, match=r"output 'logits' must be \(rows, K\) = \(2, 4\) .*got \(1, 4\)"):
        OrtBackend(_batch_mean_model(), POOL, mixing=mixing, static_shapes=static_shapes)


@pytest.mark.parametrize("mixing", ["host", "fused"])
def test_a_model_whose_output_disagrees_with_its_declared_classes_is_refused_at_load(mixing: str) -> None:
    """Declared (batch, 4), really (batch, 2): a clear refusal at load, not a numpy broadcast error per request."""
    with pytest.raises(BackendError, match=r"output 'logits' must be \(rows, K\) = \(2, 4\) .*got \(2, 2\)"):
        OrtBackend(_two_of_four_model(), POOL, mixing=mixing)


@pytest.mark.parametrize("elem", [TensorProto.INT64, TensorProto.DOUBLE, TensorProto.FLOAT16])
@pytest.mark.parametrize("mixing", ["host", "fused"])
def test_a_model_without_float32_logits_is_refused_the_same_way_on_both_paths(elem: int, mixing: str) -> None:
    """The fused graph cannot take them and the host path served int64 'logits' as a uniform softmax: one rule."""
    name = TensorProto.DataType.Name(elem)
    with pytest.raises(BackendError, match=rf"output 'logits' must be float32 logits, got {name}"):
        OrtBackend(_cast_model(elem), POOL, mixing=mixing)


def test_the_store_refuses_int64_logits_with_the_backends_words(tmp_path: Path) -> None:
    bundle_dir = make_tiny_bundle(tmp_path)
    model = onnx.load_model(str(bundle_dir / "model.onnx"))
    model.graph.node[-1].output[0] = "fc_out"
    model.graph.node.append(helper.make_node("Cast", ["fc_out"], ["logits"], to=TensorProto.INT64))
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.INT64
    onnx.save_model(model, str(bundle_dir / "model.onnx"))
    rehash(bundle_dir)
    with pytest.raises(BundleError, match=r"model.onnx: output 'logits' must be float32 logits, got INT64"):
        load_bundle(bundle_dir)


def test_a_well_formed_model_still_serves_the_same_numbers_on_both_paths() -> None:
    """The checks refuse only the odd models: a plain Flatten classifier answers softmax(x) per row."""
    model = _model([helper.make_node("Flatten", ["images"], ["logits"], axis=1)], TensorProto.FLOAT, ["batch", 4])
    flat = X.reshape(3, 4).astype(np.float64)
    expected = np.exp(flat) / np.exp(flat).sum(axis=1, keepdims=True)
    for mixing in ("host", "fused"):
        be = OrtBackend(model, POOL, mixing=mixing, static_shapes="on")
        np.testing.assert_allclose(be.probs(X), expected, atol=1e-6)
        assert be.mean_mix_probs(X, np.zeros((3, 2), np.int64), 1.0).shape == (3, 4)


def test_an_opset_11_model_asked_to_mix_fused_is_refused_with_a_backend_error_naming_it(tmp_path: Path) -> None:
    """The store accepts opset 11; the fused graph needs 13. That refusal was a bare ValueError: a hot swap to such
    a bundle answered 'internal server error' instead of the load failure that names the model."""
    bundle_dir = make_tiny_bundle(tmp_path)
    model = onnx.load_model(str(bundle_dir / "model.onnx"))
    model.opset_import[0].version = 11
    pool = np.zeros((4, 1, 8, 8), np.uint8)
    needs = r"old\.onnx: the fused MI graph needs a classifier with opset >= 13, got 11"
    with pytest.raises(BackendError, match=needs):
        OrtBackend(model.SerializeToString(), pool, mixing="fused", source="old.onnx")
    host = OrtBackend(model.SerializeToString(), pool, mixing="host")  # the host path serves it
    assert host.probs(np.zeros((2, 1, 8, 8), np.float32)).shape == (2, 4)
