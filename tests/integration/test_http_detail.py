"""MIXINFER_RESPONSE_DETAIL: the default ``label`` answers label, flag and the 3 most probable classes on /predict
and OIP v2 alike (no gap, threshold or full distribution: the tuning oracle of issue 13 item 9); ``full`` adds them."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as tc
from mixserver import run_server, settings_for
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.integration

LABEL_KEYS = {"label", "class_index", "probabilities", "adversarial", "mode"}
FULL_KEYS = LABEL_KEYS | {"detection_gap", "threshold", "mixes"}


@pytest.fixture(scope="module")
def label_server(http_store):
    """tiny/1 with every setting at its default except what a test needs (mode override for an exact check)."""
    with run_server(settings_for(http_store, model_version="1", allow_mode_override=True, seed=0)) as srv:
        yield srv


def images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(7).random((n, 1, 8, 8), dtype=np.float32)


def test_predict_answers_label_flag_and_top_3_by_default(label_server, plain):
    x = images()
    r = label_server.client.post("/predict?mode=off", json={"instances": x[:, 0].tolist()})
    assert r.status_code == 200, r.text
    expected = plain(x)
    for pred, p in zip(r.json()["predictions"], expected, strict=True):
        assert set(pred) == LABEL_KEYS
        top3 = np.argsort(-p, kind="stable")[:3]
        assert list(pred["probabilities"]) == [f"class{k}" for k in top3]  # most probable first
        np.testing.assert_allclose(list(pred["probabilities"].values()), p[top3], atol=1e-5)
        assert pred["label"] == f"class{top3[0]}" and pred["class_index"] == top3[0]


def test_predict_default_mode_hides_the_gap_and_threshold(label_server):
    r = label_server.client.post("/predict", json={"instances": images()[:, 0].tolist()})
    assert r.status_code == 200
    for pred in r.json()["predictions"]:
        assert set(pred) == LABEL_KEYS and len(pred["probabilities"]) == 3
        assert isinstance(pred["adversarial"], bool) and pred["mode"] == ("ol" if pred["adversarial"] else "pl")
        assert "threshold" not in str(pred) and "gap" not in str(pred)


@pytest.mark.parametrize(("query", "shown"), [("top_k=1", 1), ("top_k=2", 2), ("top_k=3", 3), ("top_k=4", 3)])
def test_top_k_is_capped_at_3_at_label_detail(label_server, query, shown):
    r = label_server.client.post(f"/predict?{query}", json={"instances": images(1)[:, 0].tolist()})
    assert r.status_code == 200 and len(r.json()["predictions"][0]["probabilities"]) == shown


def test_full_detail_is_todays_answer(http_store):
    with run_server(settings_for(http_store, model_version="1", seed=0, response_detail="full")) as srv:
        r = srv.client.post("/predict", json={"instances": images()[:, 0].tolist()})
        assert r.status_code == 200
        for pred in r.json()["predictions"]:
            assert set(pred) == FULL_KEYS and list(pred["probabilities"]) == [f"class{k}" for k in range(4)]
            assert pred["threshold"] == pytest.approx(0.2)
            assert pred["adversarial"] == (pred["detection_gap"] >= pred["threshold"])
        meta = tc.InferenceServerClient(srv.host_port).get_model_metadata("tiny")
        assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label", "adversarial", "detection_gap"]


def test_oip_metadata_and_infer_at_label_detail(label_server, plain):
    client = tc.InferenceServerClient(label_server.host_port)
    meta = client.get_model_metadata("tiny")
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "label": ("BYTES", [-1]),
        "adversarial": ("BOOL", [-1]),
        "top_classes": ("BYTES", [-1, 3]),
        "top_probabilities": ("FP32", [-1, 3]),
    }
    x = images(5)
    for binary in (True, False):
        inp = tc.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        res = client.infer("tiny", [inp], parameters={"mode": "off"})
        expected = plain(x)
        top3 = np.argsort(-expected, axis=1, kind="stable")[:, :3]
        assert [[s.decode() for s in row] for row in res.as_numpy("top_classes")] == [
            [f"class{k}" for k in row] for row in top3
        ]
        np.testing.assert_allclose(res.as_numpy("top_probabilities"), np.take_along_axis(expected, top3, 1), atol=1e-5)
        assert [s.decode() for s in res.as_numpy("label")] == [f"class{k}" for k in top3[:, 0]]
        assert res.as_numpy("probabilities") is None and res.as_numpy("detection_gap") is None
    client.close()


@pytest.mark.parametrize("withheld", ["probabilities", "detection_gap"])
def test_oip_refuses_outputs_the_detail_withholds(label_server, withheld):
    client = tc.InferenceServerClient(label_server.host_port)
    inp = tc.InferInput("images", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(images(1))
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny", [inp], outputs=[tc.InferRequestedOutput(withheld)])
    client.close()
    assert info.value.status() == "400"
    assert f"output '{withheld}' is not returned at MIXINFER_RESPONSE_DETAIL=label" in info.value.message()
