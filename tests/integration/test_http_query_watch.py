"""The query watch in a real server: near-copies are counted, refused before the model runs, clients banned."""

from __future__ import annotations

import numpy as np
import pytest
from mixserver import png_bytes, run_server, settings_for


def rgb_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)


def near_copy(image: np.ndarray, step: int) -> np.ndarray:
    """A query an attacker would send next: one pixel of the last row moved (a Square/SimBA-like step)."""
    out = image.copy()
    out[7, step % 8, step % 3] ^= 0x80
    return out


def post(served, image: np.ndarray, **headers: str):
    return served.client.post("/predict", content=png_bytes(image), headers={"content-type": "image/png", **headers})


def answered(served) -> float:
    return sum(
        served.metric("mixinfer_predictions_total", branch=b, adversarial=a)
        for b, a in (("pl", "false"), ("ol", "true"))
    )


@pytest.fixture()
def rejecting(http_store):
    with run_server(settings_for(http_store, name="rgb", query_watch="reject", seed=0)) as served:
        yield served


def test_reject_refuses_a_near_copy_before_the_model_runs(rejecting):
    base = rgb_image(1)
    assert post(rejecting, base).status_code == 200
    before = answered(rejecting)
    refused = post(rejecting, near_copy(base, 1))
    assert refused.status_code == 403
    body = refused.json()
    assert body["error"]["code"] == "query_rejected"
    assert "nearly repeats earlier queries" in body["error"]["message"]
    assert answered(rejecting) == before, "a refused query must not reach the model"
    assert rejecting.metric("mixinfer_query_watch_refusals_total", reason="query_rejected") == 1
    assert rejecting.metric("mixinfer_query_watch_hits_total", scope="client") == 1
    assert post(rejecting, rgb_image(2)).status_code == 200  # a different image is answered


def test_reject_applies_to_oip_tensors_quantised_like_pixels(rejecting):
    base = rgb_image(3)
    tensor = (np.transpose(base, (2, 0, 1))[None].astype(np.float32) / 255.0).round(6)

    def infer(t: np.ndarray):
        return rejecting.client.post(
            "/v2/models/rgb/infer",
            json={
                "inputs": [{"name": "images", "shape": list(t.shape), "datatype": "FP32", "data": t.ravel().tolist()}]
            },
        )

    input_name = rejecting.client.get("/v2/models/rgb").json()["inputs"][0]["name"]
    assert input_name == "images"
    assert infer(tensor).status_code == 200
    tweaked = tensor.copy()
    tweaked[0, 1, 7, 2] = 1.0 - tweaked[0, 1, 7, 2]
    refused = infer(tweaked)
    assert refused.status_code == 403 and "nearly repeats earlier queries" in refused.json()["error"]  # OIP errors


def test_ban_refuses_every_query_of_a_suspect_client_and_no_other(http_store):
    settings = settings_for(
        http_store, name="rgb", query_watch="ban", query_watch_ban_hits=3, query_watch_ban_s=600, seed=0
    )
    with run_server(settings) as served:
        image = rgb_image(4)
        codes = []
        for step in range(4):
            codes.append(post(served, image).status_code)
            image = near_copy(image, step)  # each query one step from the last, as an attack's iterations
        assert codes == [200, 200, 200, 403]  # the first query, two hits answered, the third hit bans
        banned = post(served, rgb_image(5))
        assert banned.status_code == 403 and banned.json()["error"]["code"] == "client_banned"
        assert served.metric("mixinfer_query_watch_suspect_clients") == 1
        assert served.metric("mixinfer_query_watch_refusals_total", reason="client_banned") == 2


def test_observe_counts_hits_and_answers_every_query(http_store, caplog):
    # its own server: the shared one has seen other tests resend images from this client (no first-hit log line)
    with run_server(settings_for(http_store, model_version="1", seed=0)) as server:
        image = rgb_image(6)[..., 0]
        image = np.kron(image, np.ones((1, 1), np.uint8))[:8, :8]  # tiny/1 takes 1x8x8
        before = server.metric("mixinfer_query_watch_hits_total", scope="client")
        with caplog.at_level("WARNING", logger="service.watch.watch"):
            codes = [post(server, image, **{"x-test": str(i)}).status_code for i in range(6)]
        assert codes == [200] * 6
        # the first send and 3 resends are retries; resends 4 and 5 are hits
        assert server.metric("mixinfer_query_watch_hits_total", scope="client") - before == 2
        assert any("query watch: client 127.0.0.1" in r.getMessage() for r in caplog.records)
