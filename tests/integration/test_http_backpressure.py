"""Backpressure and readiness with the real backend held by a gate: 429 at once, 504, readiness after warm-up."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from mixserver import Gate, run_server, settings_for, wait_until

pytestmark = pytest.mark.integration


def body(n: int = 1) -> dict:
    return {"instances": [np.full((8, 8), 0.3).tolist()] * n}


def test_full_queue_is_refused_with_429_before_any_batch_completes(http_store):
    gate = Gate()
    settings = settings_for(http_store, max_batch_images=1, max_queue_images=2, max_images_per_request=2)
    with run_server(settings, wrap=gate) as srv, ThreadPoolExecutor(4) as pool:
        gate.armed = True
        batcher = srv.holder.batcher
        done_before = batcher.batches_done

        def post(n: int) -> httpx.Response:
            with httpx.Client(base_url=srv.base_url, timeout=30) as c:
                return c.post("/predict", json=body(n))

        running = pool.submit(post, 1)
        assert gate.entered.wait(10)
        sealed = pool.submit(post, 1)
        wait_until(lambda: batcher.inflight_batches == 2, 10, "second batch sealed")
        queued = pool.submit(post, 2)
        wait_until(lambda: batcher.queued_images == 2, 10, "queue full")

        refused = srv.client.post("/predict", json=body(1))
        assert batcher.batches_done == done_before  # the engine has not finished any batch yet
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        err = refused.json()["error"]
        assert err["code"] == "overloaded" and "queue full: 2 images waiting" in err["message"]
        assert srv.metric("mixinfer_queue_images") == 2

        gate.open.set()
        assert [f.result().status_code for f in (running, sealed, queued)] == [200, 200, 200]  # nothing lost
        assert srv.metric("mixinfer_requests_total", route="/predict", code="429") == 1


def test_deadline_gives_504_and_the_server_recovers(http_store):
    gate = Gate()
    with run_server(settings_for(http_store, request_timeout_s=0.3), wrap=gate) as srv, ThreadPoolExecutor(2) as pool:
        gate.armed = True
        first = pool.submit(lambda: httpx.post(f"{srv.base_url}/predict", json=body(), timeout=30))
        assert gate.entered.wait(10)
        late = srv.client.post("/predict", json=body())
        assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
        gate.open.set()
        assert first.result().status_code == 504  # its deadline passed before the gate opened too
        gate.armed = False
        assert srv.client.post("/predict", json=body()).status_code == 200


def test_a_client_that_disconnects_is_withdrawn_and_hurts_nobody(http_store):
    gate = Gate()
    settings = settings_for(http_store, max_batch_images=1, max_queue_images=8, max_images_per_request=4)
    with run_server(settings, wrap=gate) as srv, ThreadPoolExecutor(3) as pool:
        batcher = srv.holder.batcher
        gate.armed = True
        gate.seen.clear()
        first = pool.submit(lambda: httpx.post(f"{srv.base_url}/predict", json=body(), timeout=30))
        assert gate.entered.wait(10)
        sealed = pool.submit(lambda: httpx.post(f"{srv.base_url}/predict", json=body(), timeout=30))
        wait_until(lambda: batcher.inflight_batches == 2, 10, "second batch sealed")
        with pytest.raises(httpx.ReadTimeout):  # queued behind both; gives up and closes its connection
            httpx.post(f"{srv.base_url}/predict", json=body(3), timeout=0.5)
        wait_until(lambda: batcher.queued_images == 0, 10, "the images of the client that left are withdrawn")
        gate.open.set()
        assert first.result().status_code == 200 and sealed.result().status_code == 200
        assert gate.seen == [1, 1]  # the engine never computed anything for the client that left
        assert srv.client.post("/predict", json=body(2)).status_code == 200
        wait_until(lambda: srv.metric("mixinfer_requests_total", route="/predict", code="499") == 1, 10, "499")


def test_readiness_flips_only_after_warm_up(http_store):
    gate = Gate()
    gate.hold_warmup = True
    with run_server(settings_for(http_store), wrap=gate, wait_ready=False) as srv:
        c = srv.client
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").status_code == 503
        r = c.get("/health/ready")
        assert r.status_code == 503 and r.json() == {"ready": False}
        r = c.post("/predict", json=body())
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert c.get("/v2/models/tiny/ready").status_code == 503
        assert srv.metric("mixinfer_ready") == 0
        gate.warm.set()
        wait_until(lambda: c.get("/v2/health/ready").status_code == 200, 20, "readiness")
        assert c.get("/health/ready").json() == {"ready": True}
        assert srv.metric("mixinfer_ready") == 1
        assert c.post("/predict", json=body()).status_code == 200


def test_default_settings_never_429_a_64_client_closed_loop(http_store):
    with run_server(settings_for(http_store)) as srv:

        def client_loop(i: int) -> list[int]:
            with httpx.Client(base_url=srv.base_url, timeout=30) as c:
                return [c.post("/predict", json=body()).status_code for _ in range(3)]

        with ThreadPoolExecutor(64) as pool:
            codes = [code for codes in pool.map(client_loop, range(64)) for code in codes]
        assert codes == [200] * 192
