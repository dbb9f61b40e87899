"""The benchmark harness measures what it claims: the open-loop generator and the wrk script, against a real server.

No timing assertions: only counts (every scheduled request answered and counted once, statuses split correctly,
latency measured from the scheduled time so it can never be below the server's own time).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from relserver import ROOT
from tinybundle import make_tiny_bundle

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import Server, free_port, start_server
from bench.openloop import open_loop
from bench.throughput_bundle import default_bundle_inputs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def floor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, list[Path]]]:
    store = tmp_path_factory.mktemp("bench-store")
    bundle = make_tiny_bundle(store, name="tiny", shape=(3, 16, 16))
    inputs = default_bundle_inputs(bundle, n=8, directory=store / "inputs")
    port = free_port()
    server = start_server(
        "test-io-floor",
        [sys.executable, str(ROOT / "bench" / "io_floor.py"), "--bundle", str(bundle), "--port", str(port)],
        port=port,
        ready_path="/health",
        log_dir=store / "logs",
        timeout_s=60,
    )
    try:
        yield server, inputs
    finally:
        server.stop()


def test_open_loop_counts_every_request(floor: tuple[Server, list[Path]]) -> None:
    server, inputs = floor
    bodies = [p.read_bytes() for p in inputs] + [b"not an image"]  # 1 in 9 requests is a 400
    res = open_loop(server.base_url + "/predict", bodies, rate=180.0, duration_s=1.0, max_conns=16)
    assert res.scheduled == 180
    assert res.completed == 180 and res.errors == 0 and res.timed_out == 0
    assert res.status == {"200": 160, "400": 20}
    assert 0 < res.p50_ms <= res.p95_ms <= res.p99_ms <= res.max_ms
    assert 1 <= res.max_conns_used <= 16


def test_open_loop_counts_refused_connections() -> None:
    port = free_port()  # nobody listens here
    res = open_loop(f"http://127.0.0.1:{port}/predict", [b"x"], rate=50.0, duration_s=0.2, max_conns=4)
    assert res.scheduled == 10 and res.completed == 0 and res.errors == 10


def test_wrk_script_reports_requests_and_errors(floor: tuple[Server, list[Path]]) -> None:
    from testtools import require_tool

    require_tool("wrk")
    from bench.http import BundleUnderTest, wrk

    server, inputs = floor
    b = BundleUnderTest("default", inputs[0].parent, "tiny", inputs[0].parent, inputs)
    res = wrk(server, b, conns=2, duration_s=1)
    assert res["requests"] > 0 and res["non_2xx"] == 0
    assert res["p50_us"] <= res["p99_us"] <= res["lat_max_us"]
    assert res["client_cpu_s"] > 0 and res["server_cpu_s"] > 0
    bad = BundleUnderTest("default", inputs[0].parent, "tiny", inputs[0].parent, [inputs[0].parent / "bad.png"])
    (inputs[0].parent / "bad.png").write_bytes(b"not an image")
    res = wrk(server, bad, conns=1, duration_s=1)
    assert res["requests"] > 0 and res["non_2xx"] == res["requests"]
