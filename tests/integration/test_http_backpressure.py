"""Backpressure and readiness with the real backend held by a gate: 503 overloaded at once, 504, readiness after
warm-up and readiness 503 as soon as the drain starts."""

from __future__ import annotations

import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from mixserver import Gate, run_server, settings_for, wait_until

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def body(n: int = 1) -> dict:
    return {"instances": [np.full((8, 8), 0.3).tolist()] * n}


def test_full_queue_is_refused_with_503_overloaded_before_any_batch_completes(http_store):
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
        assert refused.status_code == 503  # the server is short of capacity, not the client over its rate
        assert refused.headers["retry-after"] == "1"
        err = refused.json()["error"]
        assert err["code"] == "overloaded" and "queue full: 2 images waiting" in err["message"]
        assert srv.metric("mixinfer_queue_images") == 2

        gate.open.set()
        assert [f.result().status_code for f in (running, sealed, queued)] == [200, 200, 200]  # nothing lost
        assert srv.metric("mixinfer_requests_total", route="/predict", code="503") == 1
        assert srv.metric("mixinfer_requests_total", route="/predict", code="429") == 0


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
        for path in ("/v2/health/ready", "/health/ready", "/v2/models/tiny/ready"):  # every 503 says when to retry
            r = c.get(path)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", path
        assert c.get("/health/ready").json() == {"ready": False}
        r = c.post("/predict", json=body())
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and r.headers["retry-after"] == "1"
        assert srv.metric("mixinfer_ready") == 0
        gate.warm.set()
        wait_until(lambda: c.get("/v2/health/ready").status_code == 200, 20, "readiness")
        assert c.get("/health/ready").json() == {"ready": True}
        assert srv.metric("mixinfer_ready") == 1
        assert c.post("/predict", json=body()).status_code == 200


def test_default_settings_never_refuse_a_64_client_closed_loop(http_store):
    with run_server(settings_for(http_store)) as srv:

        def client_loop(i: int) -> list[int]:
            with httpx.Client(base_url=srv.base_url, timeout=30) as c:
                return [c.post("/predict", json=body()).status_code for _ in range(3)]

        with ThreadPoolExecutor(64) as pool:
            codes = [code for codes in pool.map(client_loop, range(64)) for code in codes]
        assert codes == [200] * 192


def test_readiness_turns_503_as_soon_as_the_drain_starts(http_store):
    """SIGTERM (uvicorn's exit handler, as the signal calls it) with a request in flight: readiness and the
    mixinfer_ready gauge (scraped from the metrics port, which outlives the drain) say 0 while the request is
    still being served; it is answered, nothing is lost."""
    gate = Gate()
    port = free_port()
    with run_server(settings_for(http_store, metrics_port=port), wrap=gate) as srv, ThreadPoolExecutor(1) as pool:
        gate.armed = True
        running = pool.submit(lambda: httpx.post(f"{srv.base_url}/predict", json=body(), timeout=30))
        assert gate.entered.wait(10)
        srv.server.handle_exit(signal.SIGTERM, None)
        assert srv.holder.ready is False and srv.holder.draining

        def scraped_ready() -> float:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("mixinfer_ready "))

        wait_until(lambda: scraped_ready() == 0.0, 10, "mixinfer_ready 0 during the drain")
        try:  # the listener closes within uvicorn's 0.1 s tick: a probe meets a 503 or a closed port, never a 200
            probe = httpx.get(f"{srv.base_url}/health/ready", timeout=5)
            assert probe.status_code == 503 and probe.headers["retry-after"] == "1"
        except httpx.TransportError:
            pass
        assert not running.done()
        gate.open.set()
        assert running.result().status_code == 200


class Failing:
    """Wraps the real backend; once ``armed``, a plain forward raises (a bug: an unhandled error, not ours)."""

    def __init__(self) -> None:
        self.armed = False

    def __call__(self, inner):
        failing = self

        class Broken:
            n_classes, input_shape, provider = inner.n_classes, inner.input_shape, inner.provider

            def probs(self, x):
                if failing.armed:
                    raise RuntimeError("backend exploded")
                return inner.probs(x)

            def mean_mix_probs(self, x, p, lam):
                return inner.mean_mix_probs(x, p, lam)

            def warmup(self, sizes, mixes=(1,)):
                inner.warmup(sizes, mixes)

        return Broken()


def test_an_unhandled_error_is_one_log_line_and_a_500_naming_the_request_id(http_store, caplog):
    failing = Failing()
    with run_server(settings_for(http_store), wrap=failing) as srv:
        failing.armed = True
        with caplog.at_level("ERROR"):
            r = srv.client.post("/predict", json=body(), headers={"X-Request-ID": "req-boom-1"})
            oip = {"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
            r2 = srv.client.post("/v2/models/tiny/infer", json=oip)
        assert r.status_code == 500 and r.headers["x-request-id"] == "req-boom-1"
        assert r.json()["error"] == {
            "code": "internal_error",
            "message": "internal server error (request id req-boom-1); see the server log",
        }
        assert "exploded" not in r.text and "Traceback" not in r.text
        rid2 = r2.headers["x-request-id"]
        assert (
            r2.status_code == 500
            and r2.json()["error"] == f"internal server error (request id {rid2}); see the server log"
        )
        # one traceback per request with its id (the batcher logs the failed batch, which spans requests, once);
        # nothing from Starlette's or uvicorn's last-resort handlers
        assert not [rec for rec in caplog.records if rec.name.startswith(("uvicorn", "starlette"))]
        per_request = [rec for rec in caplog.records if rec.exc_info and rec.name == "service.api.middleware"]
        assert [rec.getMessage() for rec in per_request] == [
            "unhandled error on POST /predict (request id req-boom-1)",
            f"unhandled error on POST /v2/models/tiny/infer (request id {rid2})",
        ]
        failing.armed = False
        assert srv.client.post("/predict", json=body()).status_code == 200
