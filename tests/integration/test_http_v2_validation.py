"""OIP v2 infer requests are validated as data: every client mistake is a 400 (or 413) naming what was wrong.

Each hostile request below once answered 500 (a JSON ``true`` in ``shape``, a shape product that overflows int64,
a non-ASCII digit in ``Inference-Header-Content-Length``) or was misread (``binary_data_output: "false"`` served
binary outputs). The model metadata advertises exactly the input datatype the server accepts.
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest

pytestmark = pytest.mark.integration

INFER = "/v2/models/tiny/infer"
#: every datatype of the Open Inference Protocol v2 tensor data types table
OIP_DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
)  # fmt: skip


def _input(**over: object) -> dict[str, object]:
    return {"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64} | over


def _binary(doc: dict[str, object], blob: bytes, header_length: bytes | None = None) -> tuple[bytes, dict]:
    head = orjson.dumps(doc)
    length = header_length if header_length is not None else str(len(head)).encode()
    return head + blob, {"Inference-Header-Content-Length": length, "Content-Type": "application/octet-stream"}


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"inputs": [_input(shape=[True, 1, 8, 8])]}, "inputs.0.shape.0"),
        ({"inputs": [_input(shape=[1, 1, 8, 8.0])]}, "inputs.0.shape.3"),
        ({"inputs": [_input(shape=[2**32, 2**32, 1, 1], data=[])]}, "shape"),
        ({"inputs": [_input(shape=[2**63, 2**63, 2**63, 2**63], data=[])]}, "shape"),
        ({"inputs": [_input()], "parameters": {"binary_data_output": "false"}}, "parameters.binary_data_output"),
        ({"inputs": [_input()], "parameters": {"binary_data_output": 0}}, "parameters.binary_data_output"),
        (
            {"inputs": [_input()], "outputs": [{"name": "label", "parameters": {"binary_data": "no"}}]},
            "outputs.0.parameters.binary_data",
        ),
        ({"inputs": [_input(parameters={"binary_data_size": True})]}, "binary_data_size"),
        ({"inputs": [_input(parameters={"binary_data_size": -4})]}, "binary_data_size"),
        ({"inputs": [_input(parameters=[1])]}, "inputs.0.parameters"),
        ({"inputs": [_input(name=7)]}, "inputs.0.name"),
        ({"inputs": [_input()], "id": {"x": 1}}, "id"),
        ({"inputs": [_input()], "outputs": {"name": "label"}}, "outputs"),
        ({"inputs": [_input()], "parameters": {"mode": 3}}, "parameters.mode"),
        ({"inputs": "images"}, "inputs"),
        ([_input()], "JSON object"),
    ],
)
def test_malformed_json_requests_are_400_naming_the_field(server, doc, needle):
    r = server.client.post(INFER, content=orjson.dumps(doc), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"], r.json()


@pytest.mark.parametrize(
    ("shape", "blob"),
    [([2**32, 2**32, 1, 1], b""), ([2**62, 4, 1, 1], b""), ([1, 1, 8, 8], b"")],
)
def test_binary_shapes_that_overflow_or_mismatch_are_400(server, shape, blob):
    doc = {"inputs": [_input(shape=shape, data=None, parameters={"binary_data_size": len(blob)})]}
    del doc["inputs"][0]["data"]
    body, headers = _binary(doc, blob)
    r = server.client.post(INFER, content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert "shape" in r.json()["error"]


@pytest.mark.parametrize("length", ["\u00b2".encode("latin-1"), b"\xb9\xb2", b"+12", b"1_2", b"0x10", b"-1", b""])
def test_header_length_must_be_ascii_digits(server, length):
    blob = np.full(64, 0.5, dtype="<f4").tobytes()
    doc = {"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32"}]}
    doc["inputs"][0]["parameters"] = {"binary_data_size": len(blob)}
    body, headers = _binary(doc, blob, header_length=length)
    r = server.client.post(INFER, content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert "Inference-Header-Content-Length" in r.json()["error"]


def test_string_false_is_not_read_as_true(server):
    """``binary_data_output: false`` (a real boolean) returns JSON outputs; the string "false" is refused above."""
    r = server.client.post(INFER, json={"inputs": [_input()], "parameters": {"binary_data_output": False}})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert all("data" in o for o in r.json()["outputs"])


def test_too_many_images_is_413_before_the_data_is_read(server):
    """shape[0] over MIXINFER_MAX_IMAGES_PER_REQUEST (256) is refused from the shape alone: the empty data that
    would be a 400 count mismatch is never converted."""
    r = server.client.post(INFER, json={"inputs": [_input(shape=[257, 1, 8, 8], data=[])]})
    assert r.status_code == 413, r.text
    assert "257 images" in r.json()["error"] and "256" in r.json()["error"]


def test_metadata_advertises_exactly_the_accepted_datatypes(server):
    """Every OIP datatype is tried with a well-formed tensor: exactly the advertised ones are served."""
    meta = server.client.get("/v2/models/tiny").json()
    (inp,) = meta["inputs"]
    accepted = []
    for datatype in OIP_DATATYPES:
        data: list[object] = ["a"] * 64 if datatype == "BYTES" else [True] * 64 if datatype == "BOOL" else [0] * 64
        r = server.client.post(INFER, json={"inputs": [_input(datatype=datatype, data=data)]})
        assert r.status_code in (200, 400), r.text
        if r.status_code == 200:
            accepted.append(datatype)
        else:
            assert "datatype" in r.json()["error"] and datatype in r.json()["error"]
    assert accepted == [inp["datatype"]]
