"""OIP v2 over gRPC against real servers (uvicorn + grpc.aio in one event loop), with NVIDIA's ``tritonclient.grpc``:
health, metadata, infer with numpy inputs (raw and typed contents), the REST twin's answers, keys, limits, retry
info, readiness, request ids and metrics."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.rpc import error_details_pb2, status_pb2
from mixserver import Gate, Served, run_server, settings_for, wait_until
from testtools import REPO, serve_until_exit
from tritonclient.grpc import service_pb2, service_pb2_grpc

pytestmark = pytest.mark.integration

INFER_ROUTE = "/inference.GRPCInferenceService/ModelInfer"
API_KEY = "grpc-test-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def images(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


class GrpcServed:
    def __init__(self, served: Served, port: int) -> None:
        self.http = served
        self.address = f"127.0.0.1:{port}"
        self.client = triton.InferenceServerClient(self.address)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def close(self) -> None:
        self.client.close()
        self.channel.close()


def grpc_server(store: Path, wrap=None, wait_ready: bool = True, **settings) -> Iterator[GrpcServed]:
    port = free_port()
    settings = {"response_detail": "full", **settings}  # every output; test_label_detail_withholds... checks label
    with run_server(settings_for(store, grpc_port=port, **settings), wrap=wrap, wait_ready=wait_ready) as served:
        g = GrpcServed(served, port)
        try:
            yield g
        finally:
            g.close()


@pytest.fixture(scope="module")
def server(http_store: Path) -> Iterator[GrpcServed]:
    """tiny/1, no keys, mode override allowed."""
    yield from grpc_server(http_store, model_version="1", allow_mode_override=True)


def infer_input(x: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    inp = triton.InferInput("images", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def raw_request(x: np.ndarray, **fields) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="tiny", **fields)
    request.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request


# --- health and metadata ------------------------------------------------------------------------------------------
def test_health_and_metadata_with_tritonclient(server: GrpcServed):
    c = server.client
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("tiny") and c.is_model_ready("tiny", "1")
    meta = c.get_server_metadata(as_json=True)
    rest = server.http.client.get("/v2").json()
    assert (meta["name"], meta["version"], meta["extensions"]) == (rest["name"], rest["version"], rest["extensions"])
    model = c.get_model_metadata("tiny", as_json=True)
    rest_model = server.http.client.get("/v2/models/tiny").json()
    for doc in (model, rest_model):  # gRPC's JSON form writes int64 as strings
        for t in doc["inputs"] + doc["outputs"]:
            t["shape"] = [int(d) for d in t["shape"]]
    assert model == rest_model
    with pytest.raises(triton.InferenceServerException) as err:
        c.is_model_ready("tiny", "2")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(triton.InferenceServerException) as err:
        c.get_model_metadata("other")
    assert err.value.status() == "StatusCode.NOT_FOUND" and "'tiny'" in err.value.message()


def test_unimplemented_methods_answer_unimplemented(server: GrpcServed):
    with pytest.raises(grpc.RpcError) as err:
        server.stub.ModelConfig(service_pb2.ModelConfigRequest(name="tiny"))
    assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


# --- infer ----------------------------------------------------------------------------------------------------------
def test_tritonclient_infer_equals_rest_for_the_same_seeded_draws(http_store: Path):
    """Two fresh servers seeded alike answer their first request with the same draws: the gRPC answer (via
    tritonclient, numpy in and out) must equal the REST answer exactly, labels, flags, gaps and probabilities."""
    x = images(5)
    with contextlib_grpc(http_store, seed=0) as g:
        result = g.client.infer("tiny", [infer_input(x)], request_id="req-7")
    with run_server(settings_for(http_store, model_version="1", seed=0, response_detail="full")) as rest:
        body = {"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        outs = {o["name"]: o for o in rest.client.post("/v2/models/tiny/infer", json=body).json()["outputs"]}
    assert result.get_response().id == "req-7"
    assert result.get_response().model_version == "1"
    np.testing.assert_array_equal(result.as_numpy("label").astype(str), outs["label"]["data"])
    np.testing.assert_array_equal(result.as_numpy("adversarial"), outs["adversarial"]["data"])
    np.testing.assert_allclose(result.as_numpy("detection_gap"), outs["detection_gap"]["data"], rtol=0, atol=1e-6)
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (5, 4)
    np.testing.assert_allclose(probs.ravel(), outs["probabilities"]["data"], rtol=0, atol=1e-6)
    assert [f"class{k}" for k in probs.argmax(1)] == list(result.as_numpy("label").astype(str))


def contextlib_grpc(store: Path, **settings):
    return contextlib.contextmanager(grpc_server)(store, model_version="1", **settings)


def test_typed_contents_and_raw_contents_agree(server: GrpcServed):
    """mode=off is deterministic: typed fp32_contents and raw FP32 give one answer; UINT8 is refused as on REST."""
    x = np.random.default_rng(1).random((2, 1, 8, 8), dtype=np.float32)
    raw = server.client.infer("tiny", [infer_input(x)], parameters={"mode": "off"}).as_numpy("probabilities")
    typed = service_pb2.ModelInferRequest(model_name="tiny")
    typed.parameters["mode"].string_param = "off"
    typed.inputs.add(name="images", datatype="FP32", shape=[2, 1, 8, 8]).contents.fp32_contents.extend(x.ravel())
    reply = server.stub.ModelInfer(typed)
    (index,) = [i for i, o in enumerate(reply.outputs) if o.name == "probabilities"]
    np.testing.assert_allclose(raw, np.frombuffer(reply.raw_output_contents[index], "<f4").reshape(2, 4), atol=1e-6)
    with pytest.raises(triton.InferenceServerException) as err:
        server.client.infer("tiny", [infer_input((x * 255).astype(np.uint8), "UINT8")])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "'FP32'" in err.value.message()


def test_requested_outputs_come_back_in_the_requested_order(server: GrpcServed):
    outputs = [triton.InferRequestedOutput("detection_gap"), triton.InferRequestedOutput("label")]
    result = server.client.infer("tiny", [infer_input(images(2))], outputs=outputs)
    assert [o.name for o in result.get_response().outputs] == ["detection_gap", "label"]


def test_label_detail_withholds_probabilities_and_gap_as_rest_does(http_store: Path):
    x = images(2)
    with contextlib_grpc(http_store, response_detail="label") as g:
        meta = g.client.get_model_metadata("tiny", as_json=True)
        assert [o["name"] for o in meta["outputs"]] == ["label", "adversarial", "top_classes", "top_probabilities"]
        result = g.client.infer("tiny", [infer_input(x)])
        assert [o.name for o in result.get_response().outputs] == [o["name"] for o in meta["outputs"]]
        top = result.as_numpy("top_probabilities")
        assert top.shape == (2, 3) and np.all(np.diff(top, axis=1) <= 0)
        assert list(result.as_numpy("top_classes")[:, 0]) == list(result.as_numpy("label"))
        with pytest.raises(triton.InferenceServerException) as err:
            g.client.infer("tiny", [infer_input(x)], outputs=[triton.InferRequestedOutput("detection_gap")])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "not returned at MIXINFER_RESPONSE_DETAIL=label" in err.value.message()


def test_request_id_metadata_is_echoed_or_created(server: GrpcServed):
    _, call = server.stub.ModelInfer.with_call(raw_request(images(1)), metadata=(("x-request-id", "abc-123"),))
    assert ("x-request-id", "abc-123") in call.initial_metadata()
    _, call = server.stub.ModelInfer.with_call(raw_request(images(1)), metadata=(("x-request-id", "bad id!"),))
    (rid,) = [v for k, v in call.initial_metadata() if k == "x-request-id"]
    assert rid != "bad id!" and len(rid) == 32


def test_infer_is_counted_in_the_shared_metrics(server: GrpcServed):
    before = server.http.metric("mixinfer_requests_total", route=INFER_ROUTE, code="200")
    predictions = server.http.metric("mixinfer_predictions_total", branch="pl", adversarial="false")
    predictions += server.http.metric("mixinfer_predictions_total", branch="ol", adversarial="true")
    server.client.infer("tiny", [infer_input(images(3))])
    with pytest.raises(triton.InferenceServerException):
        server.client.infer("tiny", [infer_input(images(1))], model_version="9")
    assert server.http.metric("mixinfer_requests_total", route=INFER_ROUTE, code="200") == before + 1
    assert server.http.metric("mixinfer_requests_total", route=INFER_ROUTE, code="404") >= 1
    after = server.http.metric("mixinfer_predictions_total", branch="pl", adversarial="false")
    after += server.http.metric("mixinfer_predictions_total", branch="ol", adversarial="true")
    assert after == predictions + 3


# --- keys, limits, readiness --------------------------------------------------------------------------------------
def test_api_keys_in_metadata(http_store: Path):
    with contextlib_grpc(http_store, api_keys=(API_KEY,)) as g:
        assert g.client.is_server_live() and g.client.is_model_ready("tiny")  # health stays open, as on REST
        for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": API_KEY}):
            with pytest.raises(triton.InferenceServerException) as err:
                g.client.infer("tiny", [infer_input(images(1))], headers=headers)
            assert err.value.status() == "StatusCode.UNAUTHENTICATED", headers
        with pytest.raises(triton.InferenceServerException) as err:
            g.client.get_model_metadata("tiny")
        assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        ok = g.client.infer("tiny", [infer_input(images(1))], headers={"authorization": f"Bearer {API_KEY}"})
        assert ok.as_numpy("label").shape == (1,)
        assert g.http.metric("mixinfer_requests_total", route=INFER_ROUTE, code="401") == 3


def _retry_info(err: grpc.RpcError) -> tuple[int, str]:
    trailers = dict(err.trailing_metadata())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    (detail,) = status.details
    info = error_details_pb2.RetryInfo()
    assert detail.Unpack(info)
    return info.retry_delay.seconds, trailers["retry-after"]


def test_rate_limit_is_resource_exhausted_with_retry_info(http_store: Path):
    with contextlib_grpc(http_store, rate_limit_per_key=0.2) as g:
        g.stub.ModelInfer(raw_request(images(1)))
        with pytest.raises(grpc.RpcError) as err:
            g.stub.ModelInfer(raw_request(images(1)))
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in err.value.details()
        seconds, header = _retry_info(err.value)
        assert seconds >= 1 and header == str(seconds)


def test_full_queue_is_unavailable_with_retry_info_and_a_cancelled_call_leaves_the_queue(http_store: Path):
    gate = Gate()
    settings = {"max_batch_images": 1, "max_queue_images": 3, "max_images_per_request": 2, "request_timeout_s": 30}
    with contextlib_grpc(http_store, wrap=gate, **settings) as g, ThreadPoolExecutor(3) as pool:
        batcher = g.http.holder.batcher
        gate.armed = True
        running = pool.submit(g.stub.ModelInfer, raw_request(images(1)))
        assert gate.entered.wait(10)
        sealed = pool.submit(g.stub.ModelInfer, raw_request(images(1)))
        wait_until(lambda: batcher.inflight_batches == 2, 10, "second batch sealed")
        queued = pool.submit(g.stub.ModelInfer, raw_request(images(2)))
        wait_until(lambda: batcher.queued_images == 2, 10, "two images queued")
        with pytest.raises(grpc.RpcError) as late:  # the client's deadline passes while its image waits
            g.stub.ModelInfer(raw_request(images(1)), timeout=0.5)
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: batcher.queued_images == 2, 10, "the cancelled call's image left the queue")
        with pytest.raises(grpc.RpcError) as full:
            g.stub.ModelInfer(raw_request(images(2)))
        assert full.value.code() is grpc.StatusCode.UNAVAILABLE  # REST's 503 overloaded
        assert "queue full: 2 images waiting" in full.value.details()
        assert _retry_info(full.value) == (1, "1")
        gate.open.set()
        assert [f.result(30).model_name for f in (running, sealed, queued)] == ["tiny"] * 3  # nothing lost
        assert g.http.metric("mixinfer_requests_total", route=INFER_ROUTE, code="503") == 1
        assert g.http.metric("mixinfer_requests_total", route=INFER_ROUTE, code="499") == 1


def test_not_ready_is_unavailable_and_server_ready_false(http_store: Path):
    gate = Gate()
    gate.hold_warmup = True
    with contextlib_grpc(http_store, wrap=gate, wait_ready=False) as g:
        wait_until(lambda: _live(g), 20, "gRPC live")
        assert g.client.is_server_ready() is False and g.client.is_model_ready("tiny") is False
        with pytest.raises(grpc.RpcError) as err:
            g.stub.ModelInfer(raw_request(images(1)))
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE and _retry_info(err.value) == (1, "1")
        gate.warm.set()
        wait_until(g.client.is_server_ready, 20, "ready after warm-up")


def _live(g: GrpcServed) -> bool:
    try:
        return bool(g.client.is_server_live())
    except triton.InferenceServerException:
        return False


def test_mode_override_refused_is_permission_denied(http_store: Path):
    with contextlib_grpc(http_store) as g:
        with pytest.raises(triton.InferenceServerException) as err:
            g.client.infer("tiny", [infer_input(images(1))], parameters={"mode": "off"})
        assert err.value.status() == "StatusCode.PERMISSION_DENIED"


def test_a_busy_grpc_port_stops_mixinfer_serve(http_store: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIXINFER_")}
        env |= {
            "MIXINFER_MODEL_DIR": str(http_store),
            "MIXINFER_MODEL_NAME": "tiny",
            "MIXINFER_PROVIDERS": "CPUExecutionProvider",
            "MIXINFER_PORT": str(free_port()),
            "MIXINFER_GRPC_PORT": str(busy),
            "PYTHONPATH": str(REPO),
        }
        out = serve_until_exit(env, timeout_s=60)
    assert out.returncode != 0
    assert f"cannot serve gRPC on 127.0.0.1:{busy}" in out.stderr


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.7:51234", "10.0.0.7"),
        ("ipv6:[::1]:51234", "::1"),
        ("ipv6:%5B2001:db8::7%5D:51234", "2001:db8::7"),  # what grpcio 1.85's context.peer() says (URI-escaped)
        ("unix:/tmp/s", None),
        ("", None),
    ],
)
def test_peer_host_of_grpc_peer_strings(peer: str, host: str | None):
    from service.api.grpc_server import peer_host

    assert peer_host(peer) == host


def test_model_statistics_equal_the_rest_twin(server: GrpcServed):
    server.client.infer("tiny", [infer_input(images(3))])
    stats = server.client.get_inference_statistics("tiny", as_json=True)
    rest = server.http.client.get("/v2/models/tiny/stats").json()
    (entry,) = stats["model_stats"]
    (rest_entry,) = rest["model_stats"]
    assert (entry["name"], entry["version"]) == ("tiny", "1")
    # gRPC's JSON form writes uint64 as strings; the REST answer was read after, so it counts at least as much
    assert int(entry["inference_count"]) >= 3 and int(entry["inference_count"]) <= rest_entry["inference_count"]
    assert int(entry["inference_stats"]["success"]["count"]) <= rest_entry["inference_stats"]["success"]["count"]
    assert [m["name"] for m in server.client.get_inference_statistics(as_json=True)["model_stats"]] == ["tiny"]
    with pytest.raises(triton.InferenceServerException) as err:
        server.client.get_inference_statistics("tiny", "2")
    assert err.value.status() == "StatusCode.NOT_FOUND"


def test_repository_index_needs_the_admin_key_and_equals_rest(http_store: Path):
    admin = "grpc-admin-key-0123456789abcdef"
    with contextlib_grpc(http_store, admin_key=admin) as g:
        for headers, status in ((None, "UNAUTHENTICATED"), ({"authorization": "Bearer wrong"}, "UNAUTHENTICATED")):
            with pytest.raises(triton.InferenceServerException) as err:
                g.client.get_model_repository_index(headers=headers)
            assert err.value.status() == f"StatusCode.{status}"
        index = g.client.get_model_repository_index(headers={"authorization": f"Bearer {admin}"}, as_json=True)
        rest = g.http.client.post("/v2/repository/index", headers={"Authorization": f"Bearer {admin}"}, json={})
        assert index["models"] == [{k: v for k, v in m.items() if v} for m in rest.json()]  # JSON form drops ""
        assert {(m["version"], m["state"]) for m in index["models"]} == {("1", "READY"), ("2", "UNAVAILABLE")}
    with contextlib_grpc(http_store) as g, pytest.raises(triton.InferenceServerException) as err:
        g.client.get_model_repository_index()
    assert err.value.status() == "StatusCode.PERMISSION_DENIED"  # no admin key configured: admin is off


def test_the_largest_body_limit_the_settings_accept_still_starts_grpc(http_store: Path):
    """MIXINFER_MAX_BODY_BYTES accepts up to 2 GiB; gRPC's message limits are C ints (at most 2 GiB - 1 byte): the
    server must start and serve, not die at start-up with an OverflowError."""
    with contextlib_grpc(http_store, max_body_bytes=1 << 31) as g:
        assert g.client.is_server_live()
        assert g.client.infer("tiny", [infer_input(images(1))]).as_numpy("label").shape == (1,)


def test_an_ipv6_peer_is_the_address_rest_sees(http_store: Path):
    """grpc.aio names an IPv6 peer ``ipv6:%5B::1%5D:port``: the escaped brackets must not make it an address of its
    own (outside the /64 grouping and every trusted-proxy network). Behind a trusted IPv6 proxy, two clients named
    by X-Forwarded-For have a rate limit each, as on REST."""
    port = free_port()
    settings = settings_for(
        http_store, host="::1", grpc_port=port, model_version="1", trusted_proxies=("::1",), rate_limit_per_key=0.2
    )
    with run_server(settings), grpc.insecure_channel(f"[::1]:{port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for client in ("2001:db8:1::7", "2001:db8:2::7"):
            stub.ModelInfer(raw_request(images(1)), metadata=(("x-forwarded-for", client),), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(raw_request(images(1)), metadata=(("x-forwarded-for", "2001:db8:1::8"),), timeout=30)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # the same /64 as the first client
