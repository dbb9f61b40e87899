"""The hostile corpus over gRPC, against the real ``mixinfer serve`` (uvloop, grpc.aio on MIXINFER_GRPC_PORT):
malformed tensors, wrong datatypes and contents, bad shapes and values, oversized messages, bytes that are no
protobuf at all. Each must get its documented status code; afterwards the server is up, has counted no 5xx, and
still answers a valid request exactly as its REST API does."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from relserver import Proc, free_port, start_serve
from tinybundle import make_tiny_bundle
from tritonclient.grpc import service_pb2, service_pb2_grpc

pytestmark = pytest.mark.integration

NAME = "rgb"
C, H, W = 3, 16, 16
MAX_BODY = 64 * 1024
MAX_IMAGES = 4
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True)
class GrpcCase:
    name: str
    build: Callable[[], bytes]  #: the serialized request (raw bytes, so that non-protobuf bytes fit too)
    code: grpc.StatusCode
    needle: str  #: a piece of the message that says what was wrong


def _request(
    x: np.ndarray | None = None,
    *,
    datatype: str = "FP32",
    shape: list[int] | None = None,
    name: str = "images",
    raw: list[bytes] | None = None,
    typed: dict[str, list] | None = None,
    model: str = NAME,
    version: str = "",
    outputs: tuple[str, ...] = (),
    mode: service_pb2.InferParameter | None = None,
) -> service_pb2.ModelInferRequest:
    x = np.full((1, C, H, W), 0.5, np.float32) if x is None else x
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    inp = request.inputs.add(name=name, datatype=datatype, shape=list(x.shape) if shape is None else shape)
    for field, values in (typed or {}).items():
        getattr(inp.contents, field).extend(values)
    if typed is None:
        request.raw_input_contents.extend([x.tobytes()] if raw is None else raw)
    for output in outputs:
        request.outputs.add(name=output)
    if mode is not None:
        request.parameters["mode"].CopyFrom(mode)
    return request


def build_grpc_corpus() -> list[GrpcCase]:
    one = np.full((1, C, H, W), 0.5, np.float32)
    values = one.ravel().tolist()
    cases: list[tuple[str, Callable[[], service_pb2.ModelInferRequest | bytes], grpc.StatusCode, str]] = [
        ("no inputs", lambda: service_pb2.ModelInferRequest(model_name=NAME), INVALID, "exactly 1 input"),
        ("two inputs", lambda: _two_inputs(one), INVALID, "exactly 1 input"),
        ("wrong input name", lambda: _request(one, name="pixels"), INVALID, "must be named 'images'"),
        ("datatype INT32", lambda: _request(one.astype(np.int32), datatype="INT32"), INVALID, "must be 'FP32'"),
        ("datatype BYTES", lambda: _request(one, datatype="BYTES"), INVALID, "must be 'FP32'"),
        ("datatype empty", lambda: _request(one, datatype=""), INVALID, "must be 'FP32'"),
        ("datatype FP64", lambda: _request(one.astype(np.float64), datatype="FP64"), INVALID, "must be 'FP32'"),
        ("datatype UINT8", lambda: _request((one * 255).astype(np.uint8), datatype="UINT8"), INVALID, "'FP32'"),
        (
            "datatype FP16 typed",
            lambda: _request(one, datatype="FP16", typed={"fp32_contents": values}),
            INVALID,
            "FP32",
        ),
        ("negative dimension", lambda: _request(one, shape=[-1, C, H, W]), INVALID, "at least 1 image"),
        ("raw too short", lambda: _request(one, raw=[one.tobytes()[:-4]]), INVALID, "needs 3072 bytes"),
        ("raw too long", lambda: _request(one, raw=[one.tobytes() + b"\0" * 4]), INVALID, "needs 3072 bytes"),
        ("raw twice", lambda: _request(one, raw=[one.tobytes()] * 2), INVALID, "send the input once"),
        ("raw and typed", lambda: _raw_and_typed(one), INVALID, "send the input once"),
        ("wrong typed field", lambda: _request(one, typed={"int_contents": [1] * one.size}), INVALID, "fp32_contents"),
        ("no contents at all", lambda: _request(one, typed={}), INVALID, "got none"),
        ("typed too few", lambda: _request(one, typed={"fp32_contents": values[:-1]}), INVALID, "needs 768 values"),
        ("rank 3", lambda: _request(one[0]), INVALID, "[-1, 3, 16, 16]"),
        ("wrong size", lambda: _request(np.zeros((1, C, 8, 8), np.float32)), INVALID, "[-1, 3, 16, 16]"),
        ("zero images", lambda: _request(np.zeros((0, C, H, W), np.float32)), INVALID, "[-1, 3, 16, 16]"),
        ("huge image, tiny data", lambda: _request(one, shape=[1, C, 1 << 20, 1 << 20]), INVALID, "[-1, 3, 16, 16]"),
        ("NaN", lambda: _request(_with(one, np.nan)), INVALID, "finite"),
        ("infinity", lambda: _request(_with(one, np.inf)), INVALID, "finite"),
        ("above 1", lambda: _request(_with(one, 1.5)), INVALID, "[0, 1]"),
        (
            "huge batch, tiny data",
            lambda: _request(one, shape=[1 << 40, C, H, W]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "limit is 4 per request",
        ),
        (
            "too many images",
            lambda: _request(np.zeros((MAX_IMAGES + 1, C, H, W), np.float32)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "limit is 4 per request",
        ),
        (
            "message over the body limit",
            lambda: _request(np.zeros((MAX_IMAGES * 8, C, H, W), np.float32)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than max",
        ),
        ("unknown model", lambda: _request(one, model="other"), grpc.StatusCode.NOT_FOUND, "unknown model"),
        ("unknown version", lambda: _request(one, version="7"), grpc.StatusCode.NOT_FOUND, "not served"),
        ("unknown output", lambda: _request(one, outputs=("logits",)), INVALID, "'logits' is not returned"),
        ("bad mode", lambda: _request(one, mode=service_pb2.InferParameter(string_param="max")), INVALID, "mode"),
        ("mode as a number", lambda: _request(one, mode=service_pb2.InferParameter(int64_param=3)), INVALID, "mode"),
        ("not protobuf", lambda: b"\xff\xff\xff\xff\x0f garbage", INVALID, "not a valid inference.ModelInferRequest"),
        ("truncated protobuf", lambda: _request(one).SerializeToString()[:50], INVALID, "not a valid"),
    ]
    return [GrpcCase(n, _serialized(b), code, needle) for n, b, code, needle in cases]


def _serialized(build: Callable[[], service_pb2.ModelInferRequest | bytes]) -> Callable[[], bytes]:
    def make() -> bytes:
        built = build()
        return built if isinstance(built, bytes) else built.SerializeToString()

    return make


def _with(x: np.ndarray, value: float) -> np.ndarray:
    out = x.copy()
    out.flat[7] = value
    return out


def _two_inputs(x: np.ndarray) -> service_pb2.ModelInferRequest:
    request = _request(x)
    request.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def _raw_and_typed(x: np.ndarray) -> service_pb2.ModelInferRequest:
    request = _request(x)
    request.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
    return request


CASES = build_grpc_corpus()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, grpc.Channel]]:
    store = tmp_path_factory.mktemp("grpc-corpus-store")
    make_tiny_bundle(store, name=NAME, shape=(C, H, W), n_classes=4, seed=3)
    port = free_port()
    proc = start_serve(
        store,
        NAME,
        store / "serve.log",
        grpc_port=port,
        response_detail="full",
        allow_mode_override=True,
        max_body_bytes=MAX_BODY,
        max_images_per_request=MAX_IMAGES,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])
    try:
        yield proc, channel
    finally:
        channel.close()
        proc.stop()


def test_grpc_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_grpc_input(served: tuple[Proc, grpc.Channel], case: GrpcCase) -> None:
    proc, channel = served
    call = channel.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        call(case.build(), timeout=30)
    assert err.value.code() is case.code, err.value.details()
    assert case.needle in (err.value.details() or ""), err.value.details()
    assert proc.alive()


def test_server_survives_the_grpc_corpus(served: tuple[Proc, grpc.Channel]) -> None:
    """Still up, no 5xx counted on any gRPC method, and a valid request answers what REST answers (mode=off)."""
    proc, channel = served
    for case in CASES:  # the corpus again, in one go (the parametrized test may have been deselected)
        with pytest.raises(grpc.RpcError):
            channel.unary_unary(INFER_METHOD)(case.build(), timeout=30)
    assert proc.alive()
    samples = proc.metric_samples("mixinfer_requests_total")
    grpc_samples = [(labels, v) for labels, v in samples if labels["route"].startswith("/inference.")]
    five_xx = [(labels, v) for labels, v in grpc_samples if labels["code"].startswith("5") and v > 0]
    assert five_xx == [], five_xx
    counted = sum(v for labels, v in grpc_samples if labels["route"] == INFER_METHOD)
    assert counted >= len(CASES) - 1  # the oversized message is refused by gRPC before any handler runs
    x = np.random.default_rng(5).random((2, C, H, W), dtype=np.float32)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    reply = stub.ModelInfer(
        _request(x, outputs=("probabilities",), mode=service_pb2.InferParameter(string_param="off")), timeout=30
    )
    got = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(2, 4)
    body = {"inputs": [{"name": "images", "shape": [2, C, H, W], "datatype": "FP32", "data": x.ravel().tolist()}]}
    body["parameters"] = {"mode": "off"}
    rest = proc.client.post(f"/v2/models/{NAME}/infer", json=body)
    assert rest.status_code == 200, rest.text
    (probs,) = [o["data"] for o in rest.json()["outputs"] if o["name"] == "probabilities"]
    np.testing.assert_allclose(got.ravel(), probs, atol=1e-6)
    assert "Traceback" not in proc.log()


def test_grpc_port_is_closed_with_the_server(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path, name=NAME, shape=(C, H, W), n_classes=4, seed=3)
    port = free_port()
    proc = start_serve(tmp_path, NAME, tmp_path / "serve.log", grpc_port=port)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready
    assert proc.stop() in (0, -signal.SIGTERM)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(service_pb2.ServerLiveRequest(), timeout=2)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
