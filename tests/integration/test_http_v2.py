"""Open Inference Protocol v2 with tritonclient (JSON and binary tensors) and raw HTTP."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import tritonclient.http as tc
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.integration


@pytest.fixture
def triton(server):
    client = tc.InferenceServerClient(server.host_port)
    yield client
    client.close()


def batch(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


def test_server_and_model_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready("tiny")
    meta = triton.get_server_metadata()
    assert meta["name"] == "mixinfer" and "binary_tensor_data" in meta["extensions"]
    model = triton.get_model_metadata("tiny")
    assert model["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    outs = {o["name"]: (o["datatype"], o["shape"]) for o in model["outputs"]}
    assert outs == {
        "probabilities": ("FP32", [-1, 4]),
        "label": ("BYTES", [-1]),
        "adversarial": ("BOOL", [-1]),
        "detection_gap": ("FP32", [-1]),
    }
    assert model["versions"] == ["1", "2"]


def _check(result, n: int) -> None:
    probs = result.as_numpy("probabilities")
    labels = result.as_numpy("label")
    adv = result.as_numpy("adversarial")
    gap = result.as_numpy("detection_gap")
    assert probs.shape == (n, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [lab.decode() if isinstance(lab, bytes) else lab for lab in labels] == [
        f"class{k}" for k in probs.argmax(axis=1)
    ]
    assert adv.dtype == np.bool_ and adv.tolist() == (gap >= 0.2).tolist()


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer_binary_and_json(triton, binary):
    inp = tc.InferInput("images", [3, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(batch(), binary_data=binary)
    outputs = [
        tc.InferRequestedOutput(n, binary_data=binary)
        for n in ("probabilities", "label", "adversarial", "detection_gap")
    ]
    result = triton.infer("tiny", [inp], outputs=outputs, request_id="req-7")
    _check(result, 3)
    assert result.get_response()["id"] == "req-7"


def test_tritonclient_default_request_returns_every_output_binary(triton):
    inp = tc.InferInput("images", [2, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(batch(2))
    result = triton.infer("tiny", [inp])
    _check(result, 2)
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])


def test_versioned_route_and_unknown_models(triton, server):
    inp = tc.InferInput("images", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(batch(1))
    assert triton.infer("tiny", [inp], model_version="1").as_numpy("probabilities").shape == (1, 4)
    with pytest.raises(InferenceServerException, match="version '2' is not served"):
        triton.infer("tiny", [inp], model_version="2")
    with pytest.raises(InferenceServerException, match="unknown model 'other'"):
        triton.infer("other", [inp])
    r = server.client.get("/v2/models/other")
    assert r.status_code == 404 and isinstance(r.json()["error"], str)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}, "named 'images'"),
        ({"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "INT64", "data": [0] * 64}]}, "datatype"),
        ({"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 10}]}, "needs 64"),
        ({"inputs": [{"name": "images", "shape": [1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}, "[-1, 1, 8, 8]"),
        ({"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [2.0] * 64}]}, "[0, 1]"),
        ({"inputs": []}, "inputs: List should have at least 1 item"),
        (
            {
                "inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}],
                "outputs": [{"name": "logits"}],
            },
            "outputs.0.name",
        ),
        (
            {
                "inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}],
                "parameters": {"mode": "turbo"},
            },
            "parameters.mode",
        ),
    ],
)
def test_bad_infer_requests_are_400_with_oip_error_shape(server, body, needle):
    r = server.client.post("/v2/models/tiny/infer", json=body)
    assert r.status_code == 400, r.text
    assert isinstance(r.json()["error"], str) and needle in r.json()["error"]


def test_binary_size_mismatch_is_400(server):
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 256}}
            ]
        }
    )
    r = server.client.post(
        "/v2/models/tiny/infer",
        content=header + b"\0" * 100,
        headers={"Inference-Header-Content-Length": str(len(header)), "content-type": "application/octet-stream"},
    )
    assert r.status_code == 400 and "binary_data_size is 256 but 100" in r.json()["error"]
