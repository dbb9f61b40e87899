"""Tail latency with the load generator and the server on separate cores: mixinfer against the naive server.

Each server (default bundle, one intra-op thread: it has one core) runs under ``taskset -c 1``; this process and
``wrk`` run on core 0. Per server: the single-client p50 (``wrk``, 1 connection), the best throughput (``wrk``, 32
connections), then the open-loop generator (``bench/openloop.py``, latency from the scheduled arrival) at 50 % of
that best for ``--windows`` windows. The figure is p99 at 50 % load / single-client p50 (target <= 3), the median
over the windows. For mixinfer the server's own stage histograms over the open-loop windows say where the time
went (mean decode, queue wait per image piece, clean / mix calls per batch, images per batch, the share of images
the OL branch answered: a flagged image costs a third engine call, so those requests form the tail).

Adds the section "Tail latency, pinned" to ``bench/results.md`` with ``--results``; with ``--json`` the last stdout
line holds ``p99_at_half_load_over_p50_pinned`` for both servers.

Usage: ``python bench/tail.py [--json] [--duration 4] [--windows 3]``
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/x.py` puts bench/ first on sys.path, where bench/http.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the standard library's http: use the repo root

import argparse
import os
import statistics
import time
from dataclasses import asdict
from typing import Any

from bench.common import fmt, generated_by, log, machine_info, metric_total, publish, scrape
from bench.http import DEFAULT_NAME, DEFAULT_STORE, default_bundle, start, wrk
from bench.http_report import ClosedLoopRow
from bench.openloop import OpenLoopResult, open_loop

SERVER_CPU, CLIENT_CPU = "1", "0"
SERVERS = ("naive", "mixinfer")
STAGES = ("decode", "queue", "clean", "mix_pl", "mix_ol")
SECTION = "Tail latency, load generator and server pinned to separate cores (`bench/tail.py`)"


def stage_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean milliseconds per observation of each stage, and images per batch, between two scrapes."""
    out: dict[str, float] = {}
    for stage in STAGES:
        label = f'stage="{stage}"'
        n = metric_total(after, "mixinfer_stage_duration_seconds_count", label) - metric_total(
            before, "mixinfer_stage_duration_seconds_count", label
        )
        total = metric_total(after, "mixinfer_stage_duration_seconds_sum", label) - metric_total(
            before, "mixinfer_stage_duration_seconds_sum", label
        )
        out[f"{stage}_ms"] = 1000 * total / n if n else float("nan")
    calls = metric_total(after, "mixinfer_batch_images_count") - metric_total(before, "mixinfer_batch_images_count")
    images = metric_total(after, "mixinfer_batch_images_sum") - metric_total(before, "mixinfer_batch_images_sum")
    out["images_per_batch"] = images / calls if calls else float("nan")
    answered = metric_total(after, "mixinfer_predictions_total") - metric_total(before, "mixinfer_predictions_total")
    ol = metric_total(after, "mixinfer_predictions_total", 'branch="ol"') - metric_total(
        before, "mixinfer_predictions_total", 'branch="ol"'
    )
    out["ol_share"] = ol / answered if answered else float("nan")
    return out


def one_server(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    b = default_bundle(args)
    server = start(kind, b, 1, cpus=SERVER_CPU, name=f"tail-{kind}")
    try:
        wrk(server, b, 32, args.warmup, cpus=CLIENT_CPU)
        single = ClosedLoopRow.of(b.label, kind, 1, wrk(server, b, 1, args.duration, cpus=CLIENT_CPU))
        best = ClosedLoopRow.of(b.label, kind, 32, wrk(server, b, 32, args.duration, cpus=CLIENT_CPU))
        bodies = [p.read_bytes() for p in b.inputs]
        rate = 0.5 * best.rps
        windows: list[OpenLoopResult] = []
        before = scrape(server.base_url) if kind == "mixinfer" else {}
        for _ in range(args.windows):
            server.wait_idle()
            res = open_loop(server.base_url + "/predict", bodies, rate, args.duration, max_conns=256)
            windows.append(res)
            log("%s open loop %.0f req/s: achieved %.0f, p50 %.2f, p99 %.2f, max %.1f ms", kind, rate,
                res.achieved_rps, res.p50_ms, res.p99_ms, res.max_ms)  # fmt: skip
        stages = stage_means(before, scrape(server.base_url)) if kind == "mixinfer" else {}
    finally:
        server.stop()
    p99 = statistics.median(w.p99_ms for w in windows)
    return {
        "server": kind,
        "single_client_p50_ms": single.p50_ms,
        "best_rps": best.rps,
        "half_load_rps": rate,
        "p50_at_half_load_ms": statistics.median(w.p50_ms for w in windows),
        "p99_at_half_load_ms": p99,
        "max_at_half_load_ms": max(w.max_ms for w in windows),
        "p99_at_half_load_over_p50_pinned": p99 / single.p50_ms,
        "stages": stages,
        "windows": [asdict(w) for w in windows],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per closed-loop point and window")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--windows", type=int, default=3, help="open-loop windows at 50 %% load (median p99)")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--name", default=DEFAULT_NAME)
    parser.add_argument("--results", action="store_true", help="add the section to bench/results.md (make bench)")
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        log("needs two cores")
        return 2
    t0 = time.perf_counter()
    machine = machine_info()
    os.sched_setaffinity(0, {int(CLIENT_CPU)})  # the generator (this process) on core 0
    results = {kind: one_server(kind, args) for kind in SERVERS}
    summary: dict[str, Any] = {
        "p99_at_half_load_over_p50_pinned": {k: v["p99_at_half_load_over_p50_pinned"] for k, v in results.items()},
        "servers": results,
        "machine": machine,
    }
    publish(SECTION, markdown(summary, args), summary, started=t0, results=args.results, json_line=args.json)
    return 0


def markdown(s: dict[str, Any], args: argparse.Namespace) -> str:
    m = s["machine"]
    lines = [
        generated_by("python bench/tail.py --results", m) + " "
        f"Default bundle; each server on core {SERVER_CPU} (`taskset`, 1 intra-op "
        f"thread), `wrk` and the open-loop generator on core {CLIENT_CPU}; {args.duration:g} s points, "
        f"{args.windows} open-loop windows at 50 % of the server's own best (median p99). Target: <= 3.",
        "",
        "| server | p50 ms @1 client | best req/s @32 | 50 % load req/s | p50 ms | p99 ms | max ms | p99 / p50 @1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s["servers"].values():
        lines.append(
            f"| {r['server']} | {fmt(r['single_client_p50_ms'], 2)} | {fmt(r['best_rps'], 0)} | "
            f"{fmt(r['half_load_rps'], 0)} | {fmt(r['p50_at_half_load_ms'], 2)} | {fmt(r['p99_at_half_load_ms'], 2)} | "
            f"{fmt(r['max_at_half_load_ms'], 1)} | **{fmt(r['p99_at_half_load_over_p50_pinned'], 2)}** |"
        )
    st = s["servers"].get("mixinfer", {}).get("stages", {})
    if st:
        lines += [
            "",
            "mixinfer's own stage means over the open-loop windows (its `mixinfer_stage_duration_seconds` and "
            "`mixinfer_batch_images` histograms): "
            + ", ".join(f"{k.removesuffix('_ms')} {fmt(v, 3)} ms" for k, v in st.items() if k.endswith("_ms"))
            + f"; {fmt(st.get('images_per_batch'), 2)} images per batch; "
            f"{fmt(100 * st.get('ol_share', float('nan')), 1)} % of the images answered by the OL branch (flagged: "
            "clean + PL + OL calls, the slowest requests).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
