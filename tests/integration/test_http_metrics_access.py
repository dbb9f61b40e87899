"""Who reads /metrics: MIXINFER_METRICS_PORT moves it to its own port, MIXINFER_METRICS_KEY puts it behind a key
(it publishes the threshold and the calibrated gap quantiles: half of the tuning oracle of issue 13 item 9)."""

from __future__ import annotations

import socket

import httpx
import pytest
from mixserver import run_server, settings_for
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

METRICS_KEY = "metrics-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_port_serves_metrics_and_the_main_port_does_not(http_store):
    port = free_port()
    with run_server(settings_for(http_store, model_version="1", metrics_port=port)) as srv:
        assert srv.client.post("/predict", json={"instances": [[[0.5] * 8] * 8]}).status_code == 200
        main = srv.client.get("/metrics")
        assert main.status_code == 404 and main.json()["error"]["message"] == f"/metrics is served on port {port}"
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        samples = {
            (s.name, s.labels.get("route"), s.labels.get("code")): s.value
            for fam in text_string_to_metric_families(r.text)
            for s in fam.samples
        }
        assert samples[("mixinfer_requests_total", "/predict", "200")] == 1.0
        assert samples[("mixinfer_detection_threshold", None, None)] == 0.2
    with pytest.raises(httpx.ConnectError):  # stopped with the server
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_key_guards_the_metrics_port(http_store):
    port = free_port()
    with run_server(settings_for(http_store, model_version="1", metrics_port=port, metrics_key=METRICS_KEY)):
        url = f"http://127.0.0.1:{port}/metrics"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {METRICS_KEY}"}):
            r = httpx.get(url, headers=headers, timeout=10)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
            assert r.json()["error"]["code"] == "unauthorized" and "mixinfer_" not in r.text
        r = httpx.get(url, headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=10)
        assert r.status_code == 200 and "\nmixinfer_ready 1.0\n" in r.text


def test_metrics_key_guards_the_main_port(http_store):
    with run_server(settings_for(http_store, model_version="1", metrics_key=METRICS_KEY)) as srv:
        r = srv.client.get("/metrics")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized" and "tau" not in r.text
        assert srv.client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        r = srv.client.get("/metrics", headers={"Authorization": f"bearer {METRICS_KEY}"})
        assert r.status_code == 200 and "mixinfer_detection_threshold" in r.text
        assert srv.client.get("/health/ready").status_code == 200  # health stays open


def test_metrics_port_must_differ_from_the_port(http_store):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"metrics_port \(8000\) must differ from port \(8000\)"):
        settings_for(http_store, metrics_port=8000)


def test_metrics_port_closes_idle_connections(http_store):
    # one thread per connection: a connection that never sends its request used to hold a thread of the server
    # process forever (enough of them exhaust the threads the main port decodes on)
    from service.api.metrics_port import IDLE_TIMEOUT_S

    port = free_port()
    with (
        run_server(settings_for(http_store, model_version="1", metrics_port=port)),
        socket.create_connection(("127.0.0.1", port), timeout=IDLE_TIMEOUT_S + 15) as idle,
    ):
        idle.sendall(b"GET /metr")  # a request line never finished
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 200  # others are served
        try:
            while idle.recv(4096):  # a 408/400 answer, then the close
                pass
        except TimeoutError:
            pytest.fail(f"the idle connection was still open after {IDLE_TIMEOUT_S + 15} s")


def test_an_open_metrics_route_is_named_at_start_up(http_store, caplog):
    # at label detail /metrics still publishes the threshold, the gap quantiles, a histogram of every answered
    # query's gap and the query watch's hit counts: a stranger reading it before and after a query learns the gap
    # bucket of that query and whether the watch counted it (outside review); the operator is told at start-up
    with caplog.at_level("WARNING", logger="service.config"), run_server(settings_for(http_store, model_version="1")):
        pass
    assert any("MIXINFER_METRICS_PORT or MIXINFER_METRICS_KEY" in r.getMessage() for r in caplog.records)
    caplog.clear()
    port = free_port()
    with (
        caplog.at_level("WARNING", logger="service.config"),
        run_server(settings_for(http_store, model_version="1", metrics_port=port)),
    ):
        pass
    assert not any("MIXINFER_METRICS_PORT or MIXINFER_METRICS_KEY" in r.getMessage() for r in caplog.records)
