"""Structural A/B of the server, side by side in one run: ONNX Runtime intra-op threads, one process or two.

Variants, all serving the default bundle at once on their own loopback ports (idle servers cost nothing: ONNX
Runtime's spinning is off), measured in alternating rounds with ``wrk`` (single-image PNG bodies, 1 and 32
connections, after a warm-up):

- ``threads=1``, ``threads=2``, ``threads=default``: one ``mixinfer serve`` with ``MIXINFER_INTRA_OP_THREADS`` 1, 2
  or unset (ONNX Runtime's choice): how the engine's threads share the cores with the event loop;
- ``mixing=fused``: one ``mixinfer serve`` with ``MIXINFER_MIXING=fused`` (the blends formed inside the ONNX graph,
  where ONNX Runtime releases the GIL, instead of by NumPy on the host, which holds it);
- ``workers=2``: two processes on one port (``bench/reuseport_server.py``, ``SO_REUSEPORT``), one intra-op thread
  each. After the load, ``/metrics`` is scraped repeatedly through that port: each scrape reaches ONE worker, so
  the request totals it shows differ from scrape to scrape and never add up (recorded as ``metrics_totals_seen``).

Adds the section "Structure A/B" to ``bench/results.md``; with ``--json`` the last stdout line holds every row,
``best_intra_op_threads`` (highest req/s at 32 clients among the thread variants), ``fused_vs_host`` and
``workers2_vs_best``.

Usage: ``python bench/structure.py [--json] [--duration 4] [--rounds 2]``
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/x.py` puts bench/ first on sys.path, where bench/http.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the standard library's http: use the repo root

import argparse
import statistics
import time
from typing import Any

from bench.common import (
    BENCH_DIR,
    Server,
    fmt,
    free_port,
    generated_by,
    log,
    machine_info,
    metric_total,
    publish,
    scrape,
    start_server,
)
from bench.http import DEFAULT_NAME, DEFAULT_STORE, BundleUnderTest, default_bundle, mixinfer_env, wrk
from bench.http import start as start_one
from bench.http_report import ClosedLoopRow

THREAD_VARIANTS: dict[str, int | None] = {"threads=1": 1, "threads=2": 2, "threads=default": None}
WORKERS_VARIANT = "workers=2"
#: the blends formed inside the ONNX graph (ONNX Runtime releases the GIL for them) instead of by NumPy on the host
FUSED_VARIANT = "mixing=fused"
SECTION = "Structure A/B: intra-op threads, one process or two (`bench/structure.py`)"


def start_workers(b: BundleUnderTest, n: int, threads: int) -> list[Server]:
    """``n`` reuse-port processes on one free port, each ready (its log says its startup completed)."""
    port = free_port()
    cmd = [sys.executable, str(BENCH_DIR / "reuseport_server.py")]
    env = mixinfer_env(b, port, threads)
    servers: list[Server] = []
    for i in range(n):
        s = start_server(f"structure-worker{i}", cmd, port=port, ready_path="/v2/health/ready", env=env, timeout_s=600)
        servers.append(s)
        deadline = time.monotonic() + 180
        while "startup complete" not in s.log_path.read_text(errors="replace"):
            if time.monotonic() > deadline or s.proc.poll() is not None:
                raise RuntimeError(f"worker {i} did not start; log {s.log_path}")
            time.sleep(0.2)
    return servers


def measure(name: str, servers: list[Server], b: BundleUnderTest, args: argparse.Namespace) -> list[ClosedLoopRow]:
    wrk(servers, b, 32, args.warmup)
    rows = []
    for conns in (1, 32):
        res = wrk(servers, b, conns, args.duration)
        row = ClosedLoopRow.of(b.label, name, conns, res)
        rows.append(row)
        log("%s @%d: %.0f req/s, p50 %.2f ms, p99 %.1f ms, CPU %.3f ms/req", name, conns, row.rps, row.p50_ms,
            row.p99_ms, row.cpu_ms_per_request)  # fmt: skip
    return rows


def median_row(rows: list[ClosedLoopRow]) -> dict[str, Any]:
    """Medians over the rounds of one variant at one concurrency."""
    return {
        "server": rows[0].server,
        "connections": rows[0].connections,
        "rps": statistics.median(r.rps for r in rows),
        "p50_ms": statistics.median(r.p50_ms for r in rows),
        "p99_ms": statistics.median(r.p99_ms for r in rows),
        "cpu_ms_per_request": statistics.median(r.cpu_ms_per_request for r in rows),
        "server_cores": statistics.median(r.server_cpu_s / r.wall_s for r in rows),
        "non_2xx": sum(r.non_2xx + r.socket_errors for r in rows),
        "rounds": len(rows),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per point")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up load before each variant")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the variants (medians)")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--name", default=DEFAULT_NAME)
    parser.add_argument("--results", action="store_true", help="add the section to bench/results.md (make bench)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    machine = machine_info()
    b = default_bundle(args)
    servers: dict[str, list[Server]] = {}
    try:
        for name, threads in THREAD_VARIANTS.items():
            servers[name] = [start_one("mixinfer", b, threads, name=f"structure-{name}")]
        servers[FUSED_VARIANT] = [
            start_one("mixinfer", b, None, name=f"structure-{FUSED_VARIANT}", extra_env={"MIXINFER_MIXING": "fused"})
        ]
        servers[WORKERS_VARIANT] = start_workers(b, 2, threads=1)
        measured: dict[tuple[str, int], list[ClosedLoopRow]] = {}
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                for row in measure(name, servers[name], b, args):
                    measured.setdefault((name, row.connections), []).append(row)
        workers = servers[WORKERS_VARIANT]
        totals = set()
        for _ in range(10):
            # /predict only: the scrapes themselves count under /metrics, so every total of all routes would differ
            totals.add(metric_total(scrape(workers[0].base_url), "mixinfer_requests_total", 'route="/predict"'))
        share = [w.cpu_seconds() for w in workers]
    finally:
        for group in servers.values():
            for s in group:
                s.stop()
    rows = [median_row(v) for v in measured.values()]
    by = {(r["server"], r["connections"]): r for r in rows}
    best = max(THREAD_VARIANTS, key=lambda n: by[(n, 32)]["rps"])
    summary: dict[str, Any] = {
        "rows": rows,
        "best_intra_op_threads": THREAD_VARIANTS[best] or "default",
        "workers2_vs_best": by[(WORKERS_VARIANT, 32)]["rps"] / by[(best, 32)]["rps"],
        "fused_vs_host": by[(FUSED_VARIANT, 32)]["rps"] / by[("threads=default", 32)]["rps"],
        "metrics_totals_seen": sorted(totals),
        "worker_cpu_s": share,
        "machine": machine,
    }
    publish(SECTION, markdown(summary, args), summary, started=t0, results=args.results, json_line=args.json)
    return 0


def markdown(s: dict[str, Any], args: argparse.Namespace) -> str:
    m = s["machine"]
    lines = [
        generated_by("python bench/structure.py --results", m) + " "
        f"Default bundle, `wrk` closed loop, {args.duration:g} s per point, medians of "
        f"{args.rounds} alternating rounds; all variants up at once on their own ports.",
        "",
        "| variant | req/s @1 | p50 ms @1 | CPU ms/req @1 | req/s @32 | p99 ms @32 | CPU ms/req @32 | cores @32 | "
        "non-2xx |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["server"], r["connections"]): r for r in s["rows"]}
    for name in [*THREAD_VARIANTS, FUSED_VARIANT, WORKERS_VARIANT]:
        one, many = by.get((name, 1)), by.get((name, 32))
        if not one or not many:
            continue
        lines.append(
            f"| {name} | {fmt(one['rps'], 0)} | {fmt(one['p50_ms'], 2)} | {fmt(one['cpu_ms_per_request'], 3)} | "
            f"{fmt(many['rps'], 0)} | {fmt(many['p99_ms'], 1)} | {fmt(many['cpu_ms_per_request'], 3)} | "
            f"{fmt(many['server_cores'], 2)} | {one['non_2xx'] + many['non_2xx']} |"
        )
    lines += [
        "",
        f"Best one-process variant at 32 clients: intra-op threads = {s['best_intra_op_threads']}; two workers / "
        f"that: {fmt(s['workers2_vs_best'], 2)}. Blends in the ONNX graph (`MIXINFER_MIXING=fused`) / on the host "
        f"(both at the default threads), 32 clients: {fmt(s['fused_vs_host'], 2)}. Two workers, 10 scrapes of "
        f"/metrics through their port after the load saw `/predict` request totals {s['metrics_totals_seen']} (one "
        "process always shows one figure; two figures mean each scrape reached one worker and neither counts the "
        "whole: the metrics do not add up); worker CPU "
        f"seconds {[round(c, 1) for c in s['worker_cpu_s']]}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
