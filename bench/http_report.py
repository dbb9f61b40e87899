"""The tables and figures of ``bench/http.py``: its rows, the ratios (``http_vs_combined_floor`` and the rest) and
the markdown of ``bench/results.md``."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bench.common import fmt
from bench.openloop import OpenLoopResult


@dataclass
class ClosedLoopRow:
    """One wrk run."""

    bundle: str
    server: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    client_cpu_s: float
    server_cpu_s: float
    wall_s: float

    @classmethod
    def of(cls, bundle: str, server: str, connections: int, res: dict[str, Any]) -> ClosedLoopRow:
        """The row of one :func:`wrk` result."""
        return cls(
            bundle=bundle,
            server=server,
            connections=connections,
            rps=res["requests"] / (res["duration_us"] / 1e6),
            p50_ms=res["p50_us"] / 1000,
            p99_ms=res["p99_us"] / 1000,
            requests=res["requests"],
            non_2xx=res["non_2xx"],
            socket_errors=res["err_connect"] + res["err_read"] + res["err_write"] + res["err_timeout"],
            client_cpu_s=res["client_cpu_s"],
            server_cpu_s=res["server_cpu_s"],
            wall_s=res["wall_s"],
        )

    @property
    def cpu_ms_per_request(self) -> float:
        """Server CPU milliseconds per request: less sensitive to other load on a shared machine than req/s."""
        return 1000 * self.server_cpu_s / self.requests if self.requests else float("nan")

    @property
    def client_share(self) -> float:
        """The load generator's share of the CPU time spent by client and server together."""
        total = self.client_cpu_s + self.server_cpu_s
        return self.client_cpu_s / total if total > 0 else float("nan")


@dataclass
class Report:
    machine: dict[str, Any]
    bundles: dict[str, dict[str, Any]] = field(default_factory=dict)
    closed: list[ClosedLoopRow] = field(default_factory=list)
    engine: dict[str, dict[str, float]] = field(default_factory=dict)
    open_loop: list[OpenLoopResult] = field(default_factory=list)
    rss_mib: dict[str, dict[str, float]] = field(default_factory=dict)
    requests_to_mixinfer: dict[str, int] = field(default_factory=dict)
    #: mean images per engine call that mixinfer formed at 32 clients (its own mixinfer_batch_images histogram)
    formed_batch: dict[str, float] = field(default_factory=dict)

    def rps(self, bundle: str, server: str, conns: int) -> float:
        for row in self.closed:
            if (row.bundle, row.server, row.connections) == (bundle, server, conns):
                return row.rps
        return float("nan")

    def row(self, bundle: str, server: str, conns: int) -> ClosedLoopRow | None:
        return next((r for r in self.closed if (r.bundle, r.server, r.connections) == (bundle, server, conns)), None)


def knee(results: list[OpenLoopResult], p50_single_ms: float) -> OpenLoopResult | None:
    """The highest offered rate still served in full (>= 95 %) with p99 within 3x the single-client p50."""
    ok = [
        r
        for r in results
        if r.achieved_rps >= 0.95 * r.offered_rps and r.p99_ms <= 3 * p50_single_ms and r.timed_out == 0
    ]
    return max(ok, key=lambda r: r.offered_rps) if ok else None


# --- report ---------------------------------------------------------------------------------------------------
def ratio(a: float, b: float) -> float:
    return a / b if b and np.isfinite(b) and np.isfinite(a) else float("nan")


def cpu_ratio(r: Report, bundle: str, base: str, server: str, conns: int = 32) -> float:
    """CPU per request of ``base`` over that of ``server`` at ``conns`` (> 1: ``server`` is cheaper per request)."""
    a, b = r.row(bundle, base, conns), r.row(bundle, server, conns)
    return ratio(a.cpu_ms_per_request, b.cpu_ms_per_request) if a and b else float("nan")


def combined_floor(r: Report, bundle: str = "default") -> dict[str, float]:
    """The floor that counts both costs: cores / (I/O-floor server CPU-s per request at 32 clients + in-process
    MI-Combined engine CPU-s per image at the batch size mixinfer formed at 32 clients), and mixinfer against it:
    by requests/s (``http_vs_combined_floor``) and by its own CPU per request (``..._cpu``, less load-sensitive)."""
    io, mix = r.row(bundle, "io_floor", 32), r.row(bundle, "mixinfer", 32)
    io_cpu = io.server_cpu_s / io.requests if io and io.requests else float("nan")
    engine_cpu = r.engine.get(bundle, {}).get("formed_batch_cpu_s_per_img", float("nan"))
    floor_cpu = io_cpu + engine_cpu
    floor_rps = ratio(float(r.machine["cores"]), floor_cpu)
    mix_cpu = mix.server_cpu_s / mix.requests if mix and mix.requests else float("nan")
    # only a run without errors counts: cheap 503s would otherwise raise the ratio above what the server served
    clean = mix is not None and io is not None and mix.non_2xx + mix.socket_errors + io.non_2xx + io.socket_errors == 0
    return {
        "http_vs_combined_floor": ratio(mix.rps, floor_rps) if clean and mix else float("nan"),
        "http_vs_combined_floor_cpu": ratio(floor_cpu, mix_cpu),
        "combined_floor_rps": floor_rps,
        "io_floor_cpu_ms_per_request": 1000 * io_cpu,
        "engine_cpu_ms_per_image_at_formed_batch": 1000 * engine_cpu,
        "formed_batch_at_32": r.formed_batch.get(bundle, float("nan")),
        "engine_flag_rate": r.engine.get(bundle, {}).get("flag_rate", float("nan")),
    }


def summary(report: Report) -> dict[str, Any]:
    r = report
    floor32 = r.rps("default", "io_floor", 32)
    mix_default32 = r.rps("default", "mixinfer", 32)
    naive32 = r.rps("throughput", "naive", 32)
    mix_tp32 = r.rps("throughput", "mixinfer", 32)
    single = r.row("default", "mixinfer", 1)
    p50_single = single.p50_ms if single else float("nan")
    best = max((x.rps for x in r.closed if x.bundle == "default" and x.server == "mixinfer"), default=float("nan"))
    half = min(r.open_loop, key=lambda x: abs(x.offered_rps - 0.5 * best), default=None)
    k = knee(r.open_loop, p50_single)
    out: dict[str, Any] = {
        **combined_floor(r),
        "http_vs_io_floor": ratio(mix_default32, floor32),
        "http_vs_naive": ratio(mix_tp32, naive32),
        "naive_vs_io_floor_default": ratio(r.rps("default", "naive", 32), floor32),
        "http_vs_naive_default": ratio(mix_default32, r.rps("default", "naive", 32)),
        "p99_at_half_load_over_p50": ratio(half.p99_ms, p50_single) if half else float("nan"),
        # CPU per request instead of requests/s: what each server costs, whatever share of a busy machine it got
        "http_vs_io_floor_cpu": cpu_ratio(r, "default", "io_floor", "mixinfer"),
        "http_vs_naive_cpu": cpu_ratio(r, "throughput", "naive", "mixinfer"),
        "http_vs_naive_default_cpu": cpu_ratio(r, "default", "naive", "mixinfer"),
        "p99_at_half_load_ms": half.p99_ms if half else float("nan"),
        "single_client_p50_ms": p50_single,
        "max_rps_default": best,
        "knee_rps": k.offered_rps if k else float("nan"),
        "knee_fraction_of_max": (k.offered_rps / best) if k else float("nan"),
        "machine": r.machine,
        "bundles": r.bundles,
        "closed_loop": [
            {**asdict(x), "client_share": x.client_share, "cpu_ms_per_request": x.cpu_ms_per_request} for x in r.closed
        ],
        "engine": r.engine,
        "open_loop": [asdict(x) for x in r.open_loop],
        "rss_mib": r.rss_mib,
        "requests_to_mixinfer": r.requests_to_mixinfer,
    }
    rss = r.rss_mib.get("default", {})
    if "after warm-up" in rss and "after load" in rss:
        out["rss_growth_after_warmup"] = rss["after load"] / rss["after warm-up"] - 1
    return {k2: (None if isinstance(v, float) and not np.isfinite(v) else v) for k2, v in out.items()}


def markdown(report: Report, s: dict[str, Any], args: argparse.Namespace) -> str:
    m = report.machine
    lines = [
        "# HTTP benchmark",
        "",
        f"Generated by `python bench/http.py` (`make bench`) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB, {m['os']}, Python {m['python']}, "
        f"onnxruntime {m.get('onnxruntime', '?')}, uvicorn {m.get('uvicorn', '?')}; 1-minute load average at start "
        f"{m['load_avg_1m']} (before the servers start: a figure near or above the core count means other work "
        "shared the machine, so treat the numbers as noisy).",
        f"Load: `wrk` closed loop, {args.duration:g} s per point after a {args.warmup:g} s warm-up, single-image PNG "
        f"bodies (POST /predict, raw `image/png`, {report.bundles.get('default', {}).get('inputs', 0)} "
        f"different images cycled); servers on loopback, ONNX Runtime providers `{args.providers}`.",
        "",
        "## Ratios at 32 clients",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| `http_vs_combined_floor`: mixinfer / combined floor (default bundle) | "
        f"{fmt(s['http_vs_combined_floor'], 2)} | >= 0.85 |",
        f"| same, by CPU per request: combined floor / mixinfer | {fmt(s['http_vs_combined_floor_cpu'], 2)} | |",
        f"| mixinfer / I/O floor (default bundle, `http_vs_io_floor`) | {fmt(s['http_vs_io_floor'], 2)} | |",
        f"| naive server / I/O floor (default bundle) | {fmt(s['naive_vs_io_floor_default'], 2)} | (issue: 0.45) |",
        f"| mixinfer / naive (throughput bundle) | {fmt(s['http_vs_naive'], 2)} | >= 1.2 on CPU, >= 2 on GPU |",
        f"| mixinfer / naive (default bundle) | {fmt(s['http_vs_naive_default'], 2)} | >= 1.3 |",
        f"| p99 at 50 % of max throughput / single-client p50 | {fmt(s['p99_at_half_load_over_p50'], 2)} | <= 3 |",
        f"| CPU/request: I/O floor / mixinfer (default bundle) | {fmt(s['http_vs_io_floor_cpu'], 2)} | |",
        f"| CPU/request: naive / mixinfer (throughput bundle) | {fmt(s['http_vs_naive_cpu'], 2)} | |",
        f"| CPU/request: naive / mixinfer (default bundle) | {fmt(s['http_vs_naive_default_cpu'], 2)} | |",
        "",
        "The CPU rows divide server CPU time per request (from /proc, whole process): on a shared machine they "
        "say what each server costs, while requests/s also depend on the share of the cores each one got.",
        "",
        f"Combined floor = {m['cores']} cores / ({fmt(s['io_floor_cpu_ms_per_request'], 3)} ms CPU per request of "
        f"the I/O floor at 32 clients + {fmt(s['engine_cpu_ms_per_image_at_formed_batch'], 3)} ms CPU per image of "
        "the in-process MI-Combined engine at batch "
        f"{fmt(report.engine.get('default', {}).get('formed_batch'), 0)}, the mean batch mixinfer formed at 32 "
        f"clients: {fmt(s['formed_batch_at_32'], 2)} images per engine call from its `mixinfer_batch_images` "
        f"histogram) = {fmt(s['combined_floor_rps'], 0)} req/s.",
        "",
        "## Closed loop: requests/s by concurrent connections",
        "",
        "| bundle | server | " + " | ".join(f"{c} conn" for c in args.connections)
        + " | p50 ms @1 | p99 ms @32 | server CPU ms/req @32 | server cores @32 | non-2xx | wrk CPU share @32 |",
        "|---|---|" + "---|" * len(args.connections) + "---|---|---|---|---|---|",
    ]  # fmt: skip
    for b in ("default", "throughput"):
        for kind in args.servers:
            rows = [report.row(b, kind, c) for c in args.connections]
            if not any(rows):
                continue
            r1, r32 = report.row(b, kind, 1), report.row(b, kind, 32)
            non2xx = sum(r.non_2xx + r.socket_errors for r in rows if r)
            lines.append(
                f"| {b} | {kind} | " + " | ".join(fmt(r.rps, 0) if r else "–" for r in rows)
                + f" | {fmt(r1.p50_ms if r1 else None, 2)} | {fmt(r32.p99_ms if r32 else None, 1)} | "
                f"{fmt(r32.cpu_ms_per_request if r32 else None, 2)} | "
                f"{fmt(r32.server_cpu_s / r32.wall_s if r32 else None, 2)} | {non2xx} | "
                f"{fmt(100 * r32.client_share if r32 else None, 0)} % |"
            )  # fmt: skip
    lines += [
        "",
        "wrk CPU share: the load generator's CPU seconds over client + server CPU seconds during the run.",
        "",
        "## In-process engine (no HTTP), images/s, MI-Combined",
        "",
        "| bundle | batch 1 | batch 64 | CPU ms/image, batch 1 | batch 64 | formed batch @32 | CPU ms/image |",
        "|---|---|---|---|---|---|---|",
    ]
    for b, e in report.engine.items():
        formed = e.get("formed_batch")
        lines.append(
            f"| {b} | {fmt(e.get('batch1_img_s'), 0)} | {fmt(e.get('batch64_img_s'), 0)} | "
            f"{fmt(1000 * e.get('batch1_cpu_s_per_img', float('nan')), 3)} | "
            f"{fmt(1000 * e.get('batch64_cpu_s_per_img', float('nan')), 3)} | {fmt(formed, 0)} | "
            f"{fmt(1000 * e.get('formed_batch_cpu_s_per_img', float('nan')), 3)} |"
        )
    lines += [
        "",
        "## Open loop: mixinfer, default bundle, fixed arrival rates (latency from the scheduled arrival)",
        "",
        f"Single-client p50 (wrk, 1 connection): {fmt(s['single_client_p50_ms'], 2)} ms; best closed-loop "
        f"throughput {fmt(s['max_rps_default'], 0)} req/s. Generator: `bench/openloop.py` (Python, uvloop).",
        "",
        "| offered req/s | % of max | achieved | p50 ms | p95 ms | p99 ms | errors / late | generator CPU s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    best = s["max_rps_default"] or float("nan")
    for r in report.open_loop:
        bad = sum(v for k, v in r.status.items() if k != "200") + r.errors
        lines.append(
            f"| {r.offered_rps:.0f} | {100 * r.offered_rps / best:.0f} | {r.achieved_rps:.0f} | {r.p50_ms:.2f} | "
            f"{r.p95_ms:.2f} | {r.p99_ms:.2f} | {bad} / {r.timed_out} | {r.client_cpu_s:.2f} |"
        )
    lines += [
        "",
        f"Knee (highest rate served in full with p99 <= 3x single-client p50): {fmt(s['knee_rps'], 0)} req/s "
        f"({fmt(100 * s['knee_fraction_of_max'] if s['knee_fraction_of_max'] else None, 0)} % of max).",
        "",
        "## Memory: mixinfer RSS (MiB)",
        "",
        "| bundle | at start | after warm-up | after all load | requests served |",
        "|---|---|---|---|---|",
    ]
    for b, rss in report.rss_mib.items():
        lines.append(
            f"| {b} | {fmt(rss.get('start'))} | {fmt(rss.get('after warm-up'))} | {fmt(rss.get('after load'))} | "
            f"{report.requests_to_mixinfer.get(b, 0)} |"
        )
    lines += ["", "## Bundles", ""]
    for b, info in report.bundles.items():
        lines.append(f"- {b}: `{info['path']}` {info['note']}")
    return "\n".join(lines) + "\n"
