"""Hot swap through POST /v2/repository/models/{name}/load under concurrent traffic; failures keep the old model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from mixserver import ADMIN_KEY, Gate, run_server, settings_for
from tinybundle import make_tiny_bundle

pytestmark = pytest.mark.integration

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
X = np.random.default_rng(3).random((8, 8))


def plain(bundle, x: np.ndarray) -> np.ndarray:
    """softmax(f(x)) of the bundle's model for one (8, 8) image or a stack of them, (K,) or (B, K)."""
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"images": x.astype(np.float32).reshape(-1, 1, 8, 8)})[0]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    return probs[0] if x.ndim == 2 else probs


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    make_tiny_bundle(root, name="tiny", version="1", seed=0)
    make_tiny_bundle(root, name="tiny", version="2", seed=5)
    return root


def test_swap_under_traffic_loses_no_request(store):
    settings = settings_for(
        store, model_version="1", admin_key=ADMIN_KEY, allow_mode_override=True, response_detail="full"
    )
    with run_server(settings) as srv:
        stop = threading.Event()
        seen: list[list[tuple[int, str]]] = [[] for _ in range(6)]

        def traffic(i: int) -> None:
            with httpx.Client(base_url=srv.base_url, timeout=30) as c:
                for _ in range(2000):
                    if stop.is_set():
                        return
                    r = c.post("/predict", json={"instances": [X.tolist()]})
                    seen[i].append((r.status_code, r.json().get("version", "?")))

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(traffic, i) for i in range(6)]
            time.sleep(0.3)
            r = srv.client.post("/v2/repository/models/tiny/load", json={"parameters": {"version": "2"}}, headers=ADMIN)
            assert r.status_code == 200, r.text
            assert r.json() == {"name": "tiny", "version": "2", "previous_version": "1"}
            time.sleep(0.3)
            stop.set()
            for f in futures:
                f.result()

        for per_client in seen:
            assert per_client and all(code == 200 for code, _ in per_client)
            versions = [v for _, v in per_client]
            assert versions == sorted(versions)  # 1 ... 1 2 ... 2 for every client: the swap is atomic
        assert {v for per_client in seen for _, v in per_client} == {"1", "2"}
        # each version's gap series counts exactly the answers it gave; the next scrape drops the idle version 1
        answered = {v: sum(ver == v for per_client in seen for _, ver in per_client) for v in ("1", "2")}
        gaps = srv.metric_by_version("mixinfer_detection_gap_count")
        assert gaps == {("tiny", "1"): answered["1"], ("tiny", "2"): answered["2"]}
        assert srv.metric_by_version("mixinfer_detection_gap_count") == {("tiny", "2"): answered["2"]}

        r = srv.client.post("/predict?mode=off", json={"instances": [X.tolist()]})
        got = np.array(list(r.json()["predictions"][0]["probabilities"].values()))
        np.testing.assert_allclose(got, plain(store / "tiny" / "2", X), atol=1e-5)
        assert srv.metric("mixinfer_build_info", model="tiny", version="2", provider="CPUExecutionProvider") == 1
        assert srv.metric("mixinfer_build_info", model="tiny", version="1", provider="CPUExecutionProvider") == 0


def test_failed_loads_keep_the_old_version_serving(store):
    broken = make_tiny_bundle(store, name="tiny", version="3", seed=2)
    (broken / "model.onnx").write_bytes(b"corrupt")  # hash no longer matches the manifest
    make_tiny_bundle(store, name="tiny", version="4", shape=(1, 9, 9), seed=1)
    settings = settings_for(store, model_version="1", admin_key=ADMIN_KEY)
    with run_server(settings) as srv:
        c = srv.client
        url = "/v2/repository/models/tiny/load"
        r = c.post(url, json={"parameters": {"version": "3"}}, headers=ADMIN)
        assert r.status_code == 500 and "model.onnx" in r.json()["error"]
        r = c.post(url, json={"parameters": {"version": "4"}}, headers=ADMIN)
        assert r.status_code == 400 and "restart" in r.json()["error"]
        r = c.post(url, json={"parameters": {"version": "9"}}, headers=ADMIN)
        assert r.status_code == 404 and "has versions ['1', '2', '3', '4']" in r.json()["error"]
        r = c.post("/v2/repository/models/other/load", json={}, headers=ADMIN)
        assert r.status_code == 404
        r = c.post(url, json={"parameters": {"version": "../1"}}, headers=ADMIN)
        assert r.status_code == 422
        r = c.post("/predict", json={"instances": [X.tolist()]})
        assert r.status_code == 200 and r.json()["version"] == "1"
        r = c.post(url, json={}, headers=ADMIN)  # no version: the highest, 4 (another input shape): refused
        assert r.status_code == 400
        assert c.post("/predict", json={"instances": [X.tolist()]}).json()["version"] == "1"


def test_a_request_larger_than_a_batch_is_answered_by_one_version_across_a_swap(store):
    """Its first piece runs on version 1, the swap to 2 lands before the other pieces run: all of them still run
    on version 1, the version the request was admitted under."""
    gate = Gate(once=True)
    settings = settings_for(
        store,
        model_version="1",
        admin_key=ADMIN_KEY,
        allow_mode_override=True,
        max_batch_images=2,
        response_detail="full",  # every probability, to compare with each version's own numbers
    )
    xs = np.random.default_rng(7).random((6, 8, 8))
    with run_server(settings, wrap=gate) as srv, ThreadPoolExecutor(1) as pool:
        gate.armed = True
        big = pool.submit(srv.client.post, "/predict?mode=off", json={"instances": xs.tolist()})
        assert gate.entered.wait(10)  # piece 1 of 3 holds the engine, pieces 2 and 3 wait behind it
        r = srv.client.post("/v2/repository/models/tiny/load", json={"parameters": {"version": "2"}}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["version"] == "2"
        gate.open.set()
        answer = big.result(timeout=30)
        after = srv.client.post("/predict?mode=off", json={"instances": xs[:2].tolist()})
    assert answer.status_code == 200 and answer.json()["version"] == "1"
    got = np.array([list(p["probabilities"].values()) for p in answer.json()["predictions"]])
    np.testing.assert_allclose(got, plain(store / "tiny" / "1", xs), atol=1e-5)
    assert after.json()["version"] == "2"  # requests admitted after the swap get the new version
    got = np.array([list(p["probabilities"].values()) for p in after.json()["predictions"]])
    np.testing.assert_allclose(got, plain(store / "tiny" / "2", xs[:2]), atol=1e-5)
