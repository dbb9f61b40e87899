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


def test_results_section_replaces_only_its_own(tmp_path: Path) -> None:
    from bench.common import write_results_section

    path = tmp_path / "results.md"
    path.write_text("# HTTP benchmark\n\ntable\n\n## Query watch\n\nwatch rows\n")
    write_results_section("Structure A/B", "first", path)
    write_results_section("Tail", "tail rows", path)
    write_results_section("Structure A/B", "second", path)
    text = path.read_text()
    assert text.count("## Structure A/B") == 1 and "second" in text and "first" not in text
    assert "# HTTP benchmark\n\ntable" in text and "watch rows" in text and "tail rows" in text


def test_combined_floor_counts_both_costs() -> None:
    from bench.http_report import ClosedLoopRow, Report, combined_floor

    def row(server: str, rps: float, requests: int, cpu_s: float) -> ClosedLoopRow:
        return ClosedLoopRow("default", server, 32, rps, 1.0, 2.0, requests, 0, 0, 0.1, cpu_s, 1.0)

    report = Report(machine={"cores": 2})
    # I/O floor: 0.2 ms CPU per request; engine: 0.8 ms CPU per image at the formed batch -> 2 / 1 ms = 2000 req/s
    report.closed = [row("io_floor", 8000.0, 10_000, 2.0), row("mixinfer", 1500.0, 3000, 4.5)]
    report.engine["default"] = {"formed_batch": 10, "formed_batch_cpu_s_per_img": 0.0008}
    report.formed_batch["default"] = 9.7
    got = combined_floor(report)
    assert got["combined_floor_rps"] == pytest.approx(2000.0)
    assert got["http_vs_combined_floor"] == pytest.approx(0.75)
    assert got["http_vs_combined_floor_cpu"] == pytest.approx(1.0 / 1.5)  # 1 ms floor / 1.5 ms mixinfer per request
    assert got["formed_batch_at_32"] == 9.7
