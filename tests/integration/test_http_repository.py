"""OIP v2 model repository and statistics with tritonclient.http (issue 13 item 12): index, load (tritonclient posts
``{}`` without a JSON content type), unload with Triton's semantics for the one served model, and per-model
statistics readable by ``get_inference_statistics``."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as tc
from mixserver import ADMIN_KEY, run_server, settings_for
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def srv(http_store):
    with run_server(settings_for(http_store, model_version="1", admin_key=ADMIN_KEY, seed=0)) as served:
        yield served


@pytest.fixture
def triton(srv):
    client = tc.InferenceServerClient(srv.host_port)
    yield client
    client.close()


def infer(triton, n: int) -> None:
    inp = tc.InferInput("images", [n, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(np.random.default_rng(n).random((n, 1, 8, 8), dtype=np.float32))
    triton.infer("tiny", [inp])


def test_index_lists_the_store_versions_and_what_is_served(triton):
    assert triton.get_model_repository_index(headers=ADMIN) == [
        {"name": "tiny", "version": "1", "state": "READY", "reason": ""},
        {"name": "tiny", "version": "2", "state": "UNAVAILABLE", "reason": "not loaded: a hot swap (load) serves it"},
    ]


def test_load_and_unload_have_tritons_semantics(srv, triton):
    triton.load_model("tiny", headers=ADMIN)  # body '{}', no content type: the highest version, 2
    assert triton.is_model_ready("tiny") and srv.client.post("/predict", json=body()).json()["version"] == "2"
    assert [e["state"] for e in triton.get_model_repository_index(headers=ADMIN)] == ["UNAVAILABLE", "READY"]

    triton.unload_model("tiny", headers=ADMIN)  # body {"parameters": {"unload_dependents": false}}
    assert not triton.is_model_ready("tiny") and not triton.is_server_ready()
    r = srv.client.post("/predict", json=body())
    assert r.status_code == 503 and "unloaded by an admin" in r.json()["error"]["message"]
    assert triton.get_model_repository_index(headers=ADMIN)[1] == {
        "name": "tiny",
        "version": "2",
        "state": "UNAVAILABLE",
        "reason": "unloaded",
    }
    triton.unload_model("tiny", headers=ADMIN)  # unloading what is unloaded: a no-op, as in Triton

    r = srv.client.post("/v2/repository/models/tiny/load", content=b'{"parameters": {"version": "1"}}', headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"name": "tiny", "version": "1", "previous_version": "2"}
    assert triton.is_server_ready() and srv.client.post("/predict", json=body()).json()["version"] == "1"


def test_repository_requests_are_checked(srv, triton):
    with pytest.raises(InferenceServerException) as info:
        triton.load_model("other", headers=ADMIN)
    assert info.value.status() == "404"
    with pytest.raises(InferenceServerException) as info:
        triton.load_model("tiny", headers=ADMIN, config='{"backend": "python"}')  # Triton's config override
    assert info.value.status() == "422" and "parameters.config" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.unload_model("tiny")  # no admin key
    assert info.value.status() == "401"
    r = srv.client.post("/v2/repository/index", content=b"{not json", headers=ADMIN)
    assert r.status_code == 400 and "invalid JSON" in r.json()["error"]
    r = srv.client.post("/v2/repository/index", json={"ready": "yes"}, headers=ADMIN)
    assert r.status_code == 422
    r = srv.client.post("/v2/repository/index", json={"ready": True}, headers=ADMIN)
    assert r.json() == [{"name": "tiny", "version": "1", "state": "READY", "reason": ""}]
    assert triton.is_model_ready("tiny")  # nothing above changed what is served


def test_statistics_count_requests_images_and_engine_calls(srv, triton):
    infer(triton, 3)
    infer(triton, 2)
    assert srv.client.post("/predict", json=body()).status_code == 200
    stats = triton.get_inference_statistics("tiny")
    (entry,) = stats["model_stats"]
    assert (entry["name"], entry["version"]) == ("tiny", "1")
    assert entry["inference_count"] == 6  # images
    inference = entry["inference_stats"]
    assert inference["success"]["count"] == 3 and inference["fail"]["count"] == 0
    assert inference["success"]["ns"] >= inference["queue"]["ns"] > 0 and inference["compute_input"]["count"] == 3
    assert entry["execution_count"] == inference["compute_infer"]["count"] >= 3
    assert sum(b["compute_infer"]["count"] for b in entry["batch_stats"]) == entry["execution_count"]
    assert {b["batch_size"] for b in entry["batch_stats"]} <= {1, 2, 3}
    assert entry["last_inference"] > 1_700_000_000_000
    assert triton.get_inference_statistics("tiny", "1") == triton.get_inference_statistics() == stats
    with pytest.raises(InferenceServerException) as info:
        triton.get_inference_statistics("tiny", "2")
    assert info.value.status() == "404"


def body() -> dict:
    return {"instances": [np.full((8, 8), 0.5).tolist()]}
