"""The ONNX Runtime backend on the tiny real model: numbers, chunking, host vs fused, providers, refusals."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tinybundle import make_tiny_bundle, rehash, tiny_onnx_model, tiny_weights

from service.backends.base import Classifier, MixingBackend
from service.backends.fused import FUSED_OUTPUT, build_fused_model
from service.backends.onnx import OrtBackend
from service.backends.providers import CPU, CUDA, check_no_fallback, parse_providers, providers_for_build
from service.errors import BackendError, BundleError, ConfigError
from service.store import Bundle, load_bundle, open_backend


@pytest.fixture
def bundle(tiny_bundle: Path) -> Bundle:
    return load_bundle(tiny_bundle)


def _numpy_tiny_cnn(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """The tiny CNN written out in float64 numpy, independently of ONNX: norm, conv3x3 pad 1, relu, linear."""
    z = (x.astype(np.float64) - 0.5) / 0.5
    b, _, h, wd = z.shape
    padded = np.pad(z, ((0, 0), (0, 0), (1, 1), (1, 1)))
    kw = w["body.0.weight"].astype(np.float64)
    conv = np.zeros((b, kw.shape[0], h, wd))
    for dy in range(3):
        for dx in range(3):
            conv += np.einsum("bchw,oc->bohw", padded[:, :, dy : dy + h, dx : dx + wd], kw[:, :, dy, dx])
    conv += w["body.0.bias"][None, :, None, None]
    hidden = np.maximum(conv, 0).reshape(b, -1)
    return hidden @ w["body.3.weight"].T.astype(np.float64) + w["body.3.bias"]


def _softmax64(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _x(b: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((b, 1, 8, 8), dtype=np.float32)


def _protocol_methods(proto: type) -> dict[str, list[str]]:
    """Method name -> parameter names (without self) of a protocol's methods."""
    return {
        name: list(inspect.signature(member).parameters)[1:]
        for name, member in vars(proto).items()
        if callable(member) and (not name.startswith("_") or name == "__call__")
    }


@pytest.mark.parametrize("mixing", ["host", "fused"])
def test_backend_keeps_the_protocols_contract_and_reports_its_provider(bundle: Bundle, mixing: str) -> None:
    """``isinstance`` on a runtime-checkable protocol only checks that the names exist: check the signatures and
    what each member gives (types, shapes, rows summing to 1)."""
    be = open_backend(bundle, mixing=mixing)
    assert isinstance(be, MixingBackend) and isinstance(be, Classifier)
    for proto in (MixingBackend, Classifier):
        for name, params in _protocol_methods(proto).items():
            assert list(inspect.signature(getattr(be, name)).parameters) == params, (proto.__name__, name)
    assert be.provider == CPU and be.mixing == mixing  # auto picks host on the CPU provider
    assert type(be.n_classes) is int and be.n_classes == 4
    assert be.input_shape == (1, 8, 8) and all(type(d) is int for d in be.input_shape)
    x = _x(3)
    logits, probs = be(x), be.probs(x)
    mixed = be.mean_mix_probs(x, np.zeros((3, 2), dtype=np.int64), 0.5)
    for out in (logits, probs, mixed):
        assert out.dtype == np.float32 and out.shape == (3, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(mixed.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probs, _softmax64(logits.astype(np.float64)), atol=1e-6)
    assert open_backend(bundle).mixing == "host"  # auto picks host on the CPU provider


def test_logits_and_probs_match_an_independent_numpy_network(bundle: Bundle) -> None:
    be = open_backend(bundle)
    x = _x(7)
    expected = _numpy_tiny_cnn(x, tiny_weights(4, (1, 8, 8), 0))
    np.testing.assert_allclose(be.logits(x), expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(be.probs(x), _softmax64(expected), atol=1e-5)


@pytest.mark.parametrize("mixing", ["host", "fused"])
def test_mean_mix_probs_is_the_mean_of_softmax_over_the_blends(bundle: Bundle, mixing: str) -> None:
    be = open_backend(bundle, mixing=mixing)
    x = _x(5, seed=1)
    partners = np.random.default_rng(2).integers(0, 24, size=(5, 6))
    lam = 0.3
    pool = bundle.pool_images.astype(np.float64) / 255.0
    blends = lam * x[:, None].astype(np.float64) + (1 - lam) * pool[partners]  # (5, 6, 1, 8, 8)
    logits = _numpy_tiny_cnn(blends.reshape(30, 1, 8, 8), tiny_weights(4, (1, 8, 8), 0)).reshape(5, 6, 4)
    expected = _softmax64(logits).mean(axis=1)  # softmax first, then the mean (never the other way round)
    np.testing.assert_allclose(be.mean_mix_probs(x, partners, lam), expected, atol=1e-5)


@pytest.mark.parametrize("n", [1, 5, 15, 40])
@pytest.mark.parametrize("max_mixes", [1, 7, 1024])
def test_fused_and_host_paths_agree_on_the_same_indices(bundle: Bundle, n: int, max_mixes: int) -> None:
    host = open_backend(bundle, mixing="host", max_mixes_per_call=max_mixes)
    fused = open_backend(bundle, mixing="fused", max_mixes_per_call=max_mixes)
    assert fused.mixing == "fused" and fused.provider == CPU
    x = _x(9, seed=n)
    partners = np.random.default_rng(n).integers(0, 24, size=(9, n))
    for lam in (0.4, 0.5, 1.0):
        np.testing.assert_allclose(
            host.mean_mix_probs(x, partners, lam), fused.mean_mix_probs(x, partners, lam), atol=1e-5
        )
    np.testing.assert_array_equal(host.probs(x), fused.probs(x))


def test_no_backend_call_exceeds_the_configured_number_of_mixes(bundle: Bundle) -> None:
    seen: list[int] = []

    class Recording(OrtBackend):
        def _run_classifier(self, x: np.ndarray) -> np.ndarray:
            seen.append(x.shape[0])
            return super()._run_classifier(x)

    be = Recording(bundle.model_bytes, bundle.pool_images, max_mixes_per_call=8)
    big = open_backend(bundle)
    x = _x(5)
    partners = np.random.default_rng(0).integers(0, 24, size=(5, 7))  # 35 mixes
    seen.clear()
    out = be.mean_mix_probs(x, partners, 0.5)
    assert max(seen) <= 8 and sum(seen) == 35
    np.testing.assert_allclose(out, big.mean_mix_probs(x, partners, 0.5), atol=1e-6)
    seen.clear()
    be.probs(_x(20))
    assert seen == [8, 8, 4]


def test_the_fused_graph_keeps_the_pool_as_a_uint8_initializer(bundle: Bundle) -> None:
    fused = build_fused_model(bundle.model_bytes, bundle.pool_images)
    pool = next(i for i in fused.graph.initializer if i.name == "mi/pool")
    assert pool.data_type == onnx.TensorProto.UINT8 and list(pool.dims) == [24, 1, 8, 8]
    assert [i.name for i in fused.graph.input] == ["images", "partners", "lam"]
    assert [o.name for o in fused.graph.output] == [FUSED_OUTPUT]


def test_warmup_runs_every_path_at_each_batch_size(bundle: Bundle) -> None:
    ran: list[tuple[str, int, int]] = []

    class Recording(OrtBackend):
        def _run_classifier(self, x: np.ndarray) -> np.ndarray:
            ran.append(("classifier", x.shape[0], 1))
            return super()._run_classifier(x)

        def _run_fused(self, x: np.ndarray, idx: np.ndarray, lam: np.ndarray) -> np.ndarray:
            ran.append(("fused", *idx.shape))
            return super()._run_fused(x, idx, lam)

    be = Recording(bundle.model_bytes, bundle.pool_images, mixing="fused", static_shapes="off")
    be.warmup((1, 3), mixes_per_image=(2, 5))
    expected = {("classifier", b, 1) for b in (1, 3)} | {("fused", b, n) for b in (1, 3) for n in (2, 5)}
    assert set(ran) == expected  # the plain path at each batch size, the mix path at each (batch size, N)
    with pytest.raises(ConfigError, match="warm-up batch sizes must be >= 1, got 0"):
        be.warmup((0,))


# --- static shapes: one session per (graph, row bucket, N), padded calls ------------------------------------------
@pytest.mark.parametrize("mixing", ["host", "fused"])
def test_static_shapes_give_the_unpadded_numbers_for_every_batch_size(bundle: Bundle, mixing: str) -> None:
    plain = open_backend(bundle, mixing=mixing, static_shapes="off", max_mixes_per_call=40)
    static = open_backend(bundle, mixing=mixing, static_shapes="on", max_mixes_per_call=40)
    assert static.static_shapes and not plain.static_shapes
    rng = np.random.default_rng(4)
    for b in (1, 2, 3, 5, 8, 13, 40, 41, 100):
        x = _x(b)
        np.testing.assert_allclose(static.probs(x), plain.probs(x), atol=1e-6)
        for n in (1, 5, 7):
            partners = rng.integers(0, 24, size=(b, n))
            got = static.mean_mix_probs(x, partners, 0.4)
            np.testing.assert_allclose(got, plain.mean_mix_probs(x, partners, 0.4), atol=1e-6)
    # every session saw one shape: its rows are a power of two or the per-call cap (40 blends // N)
    for graph, rows, n in static.static_sessions:
        assert rows & (rows - 1) == 0 or rows == 40 // n, (graph, rows, n)


def test_static_shape_warmup_makes_every_bucket_up_to_the_largest_batch(bundle: Bundle) -> None:
    be = open_backend(bundle, mixing="fused", static_shapes="on")
    be.warmup((1, 12), mixes_per_image=(5, 15))
    buckets = (1, 2, 4, 8, 16)  # 1..12 rows land in one of these (12 pads to 16)
    expected = {("classifier", r, 1) for r in buckets} | {("fused", r, n) for r in buckets for n in (5, 15)}
    assert set(be.static_sessions) == expected
    made = list(be.static_sessions)
    rng = np.random.default_rng(0)
    for b in range(1, 13):  # any batch size up to the warmed one, any N warmed: no new session at request time
        be.probs(_x(b))
        be.mean_mix_probs(_x(b), rng.integers(0, 24, size=(b, 15)), 0.4)
    assert be.static_sessions == made


def test_static_shapes_are_off_on_the_cpu_provider_unless_asked(bundle: Bundle) -> None:
    be = open_backend(bundle)
    assert be.provider == CPU and not be.static_shapes
    be.probs(_x(3))
    assert be.static_sessions == []


def test_thread_counts_are_applied(bundle: Bundle) -> None:
    be = open_backend(bundle, intra_op_threads=1, inter_op_threads=1)
    assert be._factory.options.intra_op_num_threads == 1 and be._factory.options.inter_op_num_threads == 1
    assert be.probs(_x(2)).shape == (2, 4)


def _symbolic_class_model() -> onnx.ModelProto:
    """The tiny CNN with its logits reshaped to [batch, -1] by a runtime shape, so ONNX Runtime only knows the class
    axis as the symbol ``k`` (a constant [0, -1] would let its shape inference fill in 4)."""
    from onnx import helper, numpy_helper

    model = tiny_onnx_model(tiny_weights(4, (1, 8, 8), 0), (1, 8, 8), 4)
    graph = model.graph
    graph.node[-1].output[0] = "fc_out"
    for name, value in (("zero", 0), ("one", 1), ("minus_one", -1)):
        graph.initializer.append(numpy_helper.from_array(np.array([value], dtype=np.int64), name))
    graph.node.extend(
        [
            helper.make_node("Shape", ["fc_out"], ["fc_shape"]),
            helper.make_node("Slice", ["fc_shape", "zero", "one"], ["batch_dim"]),
            helper.make_node("Concat", ["batch_dim", "minus_one"], ["flat_shape"], axis=0),
            helper.make_node("Reshape", ["fc_out", "flat_shape"], ["logits"]),
        ]
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", "k"]))
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(("mixing", "static_shapes"), [("host", "off"), ("host", "on"), ("fused", "on")])
def test_a_model_with_a_symbolic_class_dimension_is_served(tiny_bundle: Path, mixing: str, static_shapes: str) -> None:
    onnx.save_model(_symbolic_class_model(), str(tiny_bundle / "model.onnx"))
    rehash(tiny_bundle)
    bundle = load_bundle(tiny_bundle)  # the store accepts it, so the backend must serve it
    be = open_backend(bundle, mixing=mixing, static_shapes=static_shapes)
    assert be.n_classes == 4
    x = _x(3)
    weights = tiny_weights(4, (1, 8, 8), 0)
    np.testing.assert_allclose(be.probs(x), _softmax64(_numpy_tiny_cnn(x, weights)), atol=1e-5)
    partners = np.array([[0, 5], [7, 23], [11, 11]])
    blends = 0.5 * x[:, None].astype(np.float64) + 0.5 * bundle.pool_images[partners].astype(np.float64) / 255.0
    mixed = _softmax64(_numpy_tiny_cnn(blends.reshape(6, 1, 8, 8), weights)).reshape(3, 2, 4).mean(axis=1)
    np.testing.assert_allclose(be.mean_mix_probs(x, partners, 0.5), mixed, atol=1e-5)


# --- refusals ----------------------------------------------------------------------------------------------------
def test_refuses_a_model_whose_input_disagrees_with_the_pool(bundle: Bundle, tmp_path: Path) -> None:
    other = make_tiny_bundle(tmp_path, shape=(1, 9, 9))
    with pytest.raises(
        BackendError, match=r"input shape must agree with the pool, expected \(1, 8, 8\) \(pool\), got \(1, 9, 9\)"
    ):
        OrtBackend((other / "model.onnx").read_bytes(), bundle.pool_images)


def test_refuses_a_model_that_disagrees_with_the_manifest(bundle: Bundle) -> None:
    with pytest.raises(
        BackendError, match=r"expected \(1, 8, 8\) \(pool\) = \(3, 8, 8\) \(manifest\), got \(1, 8, 8\)"
    ):
        OrtBackend(bundle.model_bytes, bundle.pool_images, expected_input_shape=(3, 8, 8))
    with pytest.raises(BackendError, match=r"output 'logits' must be \(B, 10\) logits, got \[None, 4\]"):
        OrtBackend(bundle.model_bytes, bundle.pool_images, expected_n_classes=10)


def test_the_store_and_the_backend_refuse_a_model_with_the_same_check(tiny_bundle: Path, tmp_path: Path) -> None:
    """One signature check: a model the store refuses is refused by the backend with the same words."""
    other = make_tiny_bundle(tmp_path, shape=(1, 9, 9))
    (tiny_bundle / "model.onnx").write_bytes((other / "model.onnx").read_bytes())
    rehash(tiny_bundle)
    with pytest.raises(BundleError) as refused:
        load_bundle(tiny_bundle)
    pool = np.zeros((4, 1, 8, 8), np.uint8)
    with pytest.raises(BackendError) as backend_refused:
        OrtBackend((other / "model.onnx").read_bytes(), pool, expected_input_shape=(1, 8, 8))
    assert str(refused.value).split("model.onnx: ")[1] == str(backend_refused.value).split("model.onnx: ")[1]


def test_refuses_a_corrupt_model(bundle: Bundle) -> None:
    with pytest.raises(BackendError, match=r"ONNX Runtime cannot create the classifier session for bad\.onnx"):
        OrtBackend(b"\x08\x07garbage", bundle.pool_images, source="bad.onnx")


def test_refuses_a_model_with_a_different_input_name(bundle: Bundle, tmp_path: Path) -> None:
    model = tiny_onnx_model(tiny_weights(4, (1, 8, 8), 0), (1, 8, 8), 4)
    with pytest.raises(BackendError, match=r"expected one input named 'pixels', got \['images'\]"):
        OrtBackend(model.SerializeToString(), bundle.pool_images, input_name="pixels")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mixing": "gpu"}, "mixing must be one of 'auto', 'host', 'fused', got 'gpu'"),
        ({"max_mixes_per_call": 0}, "max_mixes_per_call must be >= 1, got 0"),
        ({"static_shapes": "yes"}, "static_shapes must be one of 'auto', 'on', 'off', got 'yes'"),
        ({"intra_op_threads": -1}, r"intra_op_threads must be >= 0 \(0: ONNX Runtime's default\), got -1"),
        ({"providers": " , "}, "providers must name at least one"),
    ],
)
def test_refuses_bad_settings(bundle: Bundle, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OrtBackend(bundle.model_bytes, bundle.pool_images, **kwargs)


def test_refuses_bad_mix_calls(bundle: Bundle) -> None:
    be = open_backend(bundle)
    x = _x(2)
    with pytest.raises(ValueError, match=r"partners must index \[0, 23\], got \[0, 24\]"):
        be.mean_mix_probs(x, np.array([[0], [24]]), 0.5)
    with pytest.raises(ValueError, match=r"partners must be shaped \(2, N >= 1\), got \(3, 1\)"):
        be.mean_mix_probs(x, np.zeros((3, 1), dtype=np.int64), 0.5)
    with pytest.raises(ValueError, match=r"lam must be in \(0, 1\], got 0.0"):
        be.mean_mix_probs(x, np.zeros((2, 1), dtype=np.int64), 0.0)


# --- providers (pure rules; the CUDA session itself is covered by tests/gpu) ---------------------------------------
def test_parse_providers_accepts_the_settings_string() -> None:
    assert parse_providers(f" {CUDA} ,{CPU},") == [CUDA, CPU]
    assert parse_providers([CPU]) == [CPU]


def test_cuda_then_cpu_on_a_cpu_only_build_runs_on_cpu(bundle: Bundle) -> None:
    assert providers_for_build([CUDA, CPU], [CPU]) == [CPU]
    be = open_backend(bundle, providers=f"{CUDA},{CPU}")
    if CUDA not in ort.get_available_providers():
        assert be.provider == CPU


def test_cuda_required_but_not_in_the_build_is_refused() -> None:
    with pytest.raises(
        BackendError, match=r"require CUDA, but this ONNX Runtime build offers only \['CPUExecutionProvider'\]"
    ):
        providers_for_build([CUDA], [CPU])
    with pytest.raises(BackendError, match="none of the providers"):
        providers_for_build(["TensorrtExecutionProvider"], [CPU])


def test_a_silent_fallback_from_cuda_to_cpu_is_refused() -> None:
    with pytest.raises(BackendError, match=r"session fell back to \['CPUExecutionProvider'\]"):
        check_no_fallback([CUDA, CPU], [CUDA, CPU], [CPU])
    check_no_fallback([CUDA, CPU], [CUDA, CPU], [CUDA, CPU])  # got CUDA: fine
    check_no_fallback([CUDA, CPU], [CPU], [CPU])  # CUDA not in the build, CPU asked as fallback: fine


def test_fused_graph_wraps_a_torch_exported_network(tmp_path: Path) -> None:
    """The fused wrapper must also work on what the pipeline exports (BatchNorm, pooling, opset 17)."""
    torch = pytest.importorskip("torch")
    from service.training.export import export_onnx
    from service.training.models import build_model

    torch.manual_seed(0)
    model = build_model("mnist_cnn", 10, 1).eval()
    export_onnx(model, tmp_path / "model.onnx", (1, 28, 28))
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, size=(30, 1, 28, 28), dtype=np.uint8)
    onnx_bytes = (tmp_path / "model.onnx").read_bytes()
    host = OrtBackend(onnx_bytes, pool, mixing="host", intra_op_threads=1)
    fused = OrtBackend(onnx_bytes, pool, mixing="fused", intra_op_threads=1)
    x = rng.random((6, 1, 28, 28), dtype=np.float32)
    partners = rng.integers(0, 30, size=(6, 5))
    got = fused.mean_mix_probs(x, partners, 0.5)
    np.testing.assert_allclose(got, host.mean_mix_probs(x, partners, 0.5), atol=1e-5)
    blends = 0.5 * x[:, None] + 0.5 * (pool[partners].astype(np.float32) / 255)
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(blends.reshape(30, 1, 28, 28))), dim=1).reshape(6, 5, 10).mean(1)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
