"""HTTP benchmark: mixinfer against the I/O floor and the naive server, closed and open loop, plus RSS.

For each bundle (the default MNIST bundle, and the throughput bundle: a seeded random CIFAR-shaped ResNet-18
whose threshold flags 5 % of the bench inputs) it starts each server on a free loopback port and drives it with
``wrk`` (closed loop, single-image PNG bodies, 1/8/32/64 connections), recording requests/s, latency, errors and
the client's own CPU share. It measures the in-process engine on the same inputs, then sweeps fixed arrival rates
against mixinfer with the default bundle (``bench/openloop.py``) up to saturation: p50/p95/p99 and the knee. RSS of
the mixinfer process is sampled at start, after warm-up and after all the load.

Writes ``bench/results.md``; prints the tables on stdout; with ``--json`` the last stdout line is one JSON object
with ``http_vs_combined_floor`` (default bundle, 32 clients: mixinfer against cores / (I/O-floor CPU per request +
engine CPU per image at the batch mixinfer formed)), ``http_vs_naive`` (throughput bundle, 32 clients),
``p99_at_half_load_over_p50`` and every figure. Needs ``wrk`` (Debian package ``wrk``). About 5 minutes.

Usage: ``python bench/http.py [--json] [--duration 5] [--quick]``
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/http.py` puts bench/ first on sys.path, where this very file would
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # shadow the standard library's http: use the root

import argparse
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.common import (
    BENCH_DIR,
    CACHE_DIR,
    ROOT,
    Server,
    emit_json,
    free_port,
    log,
    machine_info,
    metric_total,
    run_with_cpu,
    scrape,
    start_server,
)
from bench.http_report import ClosedLoopRow, Report, markdown, ratio, summary
from bench.openloop import OpenLoopResult, open_loop
from bench.throughput_bundle import MNIST_STANDIN, THROUGHPUT, build, default_bundle_inputs

DEFAULT_STORE = ROOT / "model_store"
DEFAULT_NAME = "mnist-mixup"
LUA = BENCH_DIR / "post_images.lua"
SERVERS = ("io_floor", "naive", "mixinfer")
#: the I/O floor only matters next to the default bundle; the throughput bundle compares mixinfer with naive
SERVERS_FOR = {"default": SERVERS, "throughput": ("naive", "mixinfer")}
CPU_PROVIDER = "CPUExecutionProvider"
OPEN_LOOP_FRACTIONS = (0.1, 0.25, 0.5, 0.7, 0.85, 1.0, 1.15)


@dataclass
class BundleUnderTest:
    """A bundle and the PNG inputs every server gets."""

    label: str
    store: Path
    name: str
    path: Path
    inputs: list[Path]
    note: str = ""


# --- bundles --------------------------------------------------------------------------------------------------
def default_bundle(args: argparse.Namespace) -> BundleUnderTest:
    """``model_store/mnist-mixup/<highest>``, or a random MNIST-shaped stand-in when it is not built yet."""
    from service.errors import MixinferError
    from service.store import resolve_bundle

    try:
        path = resolve_bundle(args.store, args.name)
    except MixinferError as exc:
        log("default bundle unavailable (%s); using a random MNIST-shaped stand-in", exc)
        built = build(MNIST_STANDIN)
        return BundleUnderTest("default", built.store, built.name, built.path, built.inputs, "random stand-in")
    return BundleUnderTest("default", args.store, args.name, path, default_bundle_inputs(path))


def throughput_bundle() -> BundleUnderTest:
    built = build(THROUGHPUT)
    note = f"random ResNet-18, threshold {built.threshold:.3g} flags {100 * built.flag_rate:.1f} % of bench inputs"
    return BundleUnderTest("throughput", built.store, built.name, built.path, built.inputs, note)


# --- servers --------------------------------------------------------------------------------------------------
def start(
    kind: str,
    b: BundleUnderTest,
    threads: int | None,
    *,
    cpus: str | None = None,
    name: str | None = None,
    providers: str = CPU_PROVIDER,
    extra_env: dict[str, str] | None = None,
) -> Server:
    """Start one server for ``b`` on a free port; ``cpus``: pin it with ``taskset -c cpus``; ``providers``: ONNX
    Runtime providers in order, comma-separated (the I/O floor runs none); ``extra_env``: more ``MIXINFER_*``
    settings of a mixinfer server."""
    port = free_port()
    py = sys.executable
    env: dict[str, str] = {}
    if kind == "io_floor":
        cmd = [py, str(BENCH_DIR / "io_floor.py"), "--bundle", str(b.path), "--port", str(port)]
        ready = "/health"
    elif kind == "naive":
        cmd = [py, str(BENCH_DIR / "naive_server.py"), "--bundle", str(b.path), "--port", str(port)]
        cmd += ["--providers", providers]
        if threads:
            cmd += ["--intra-op-threads", str(threads)]
        ready = "/health"
    else:
        cmd = [py, "-m", "service.cli", "serve"]
        ready = "/v2/health/ready"
        env = mixinfer_env(b, port, threads, providers) | (extra_env or {})
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    label = name or f"{b.label}-{kind}"
    # mixinfer warms up every N at the largest batch before it is ready: minutes for ResNet-18 on a busy CPU
    return start_server(label, cmd, port=port, ready_path=ready, env=env, timeout_s=600)


def mixinfer_env(b: BundleUnderTest, port: int, threads: int | None, providers: str = CPU_PROVIDER) -> dict[str, str]:
    """The ``MIXINFER_*`` settings the benchmarks serve ``b`` with on ``127.0.0.1:port``."""
    env = {
        "MIXINFER_MODEL_DIR": str(b.store),
        "MIXINFER_MODEL_NAME": b.name,
        "MIXINFER_MODEL_VERSION": b.path.name,
        "MIXINFER_HOST": "127.0.0.1",
        "MIXINFER_PORT": str(port),
        "MIXINFER_PROVIDERS": providers,
    }
    if threads:
        env["MIXINFER_INTRA_OP_THREADS"] = str(threads)
    return env


def wrk(
    server: Server | Sequence[Server], b: BundleUnderTest, conns: int, duration_s: float, *, cpus: str | None = None
) -> dict[str, Any]:
    """One closed-loop wrk run; returns wrk's JSON summary plus its own CPU seconds and the server's (summed over
    ``server`` when it is several processes behind one port). ``cpus``: pin wrk (one thread) with taskset."""
    servers = [server] if isinstance(server, Server) else list(server)
    env = dict(os.environ)
    env["BENCH_BODIES"] = "\n".join(str(p) for p in b.inputs)
    threads = 1 if cpus is not None else min(2, conns)
    cmd = [
        "wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(duration_s))}s", "--timeout", "30s", "-s", str(LUA),
        servers[0].base_url + "/predict",
    ]  # fmt: skip
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    for s in servers:
        s.wait_idle()
    cpu0 = sum(s.cpu_seconds() for s in servers)
    t0 = time.perf_counter()
    out, client_cpu = run_with_cpu(cmd, env=env, timeout_s=duration_s + 60)
    wall = time.perf_counter() - t0
    server_cpu = sum(s.cpu_seconds() for s in servers) - cpu0
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("JSONRESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no JSONRESULT line: {out[-500:]}")
    res: dict[str, Any] = json.loads(line.removeprefix("JSONRESULT "))
    res.update(client_cpu_s=client_cpu, server_cpu_s=server_cpu, wall_s=wall)
    return res


def batch_histogram(server: Server) -> tuple[float, float]:
    """(images, engine calls) so far, from the server's own ``mixinfer_batch_images`` histogram on /metrics."""
    series = scrape(server.base_url)
    return metric_total(series, "mixinfer_batch_images_sum"), metric_total(series, "mixinfer_batch_images_count")


def closed_loop(report: Report, b: BundleUnderTest, kind: str, args: argparse.Namespace) -> None:
    log("%s / %s: starting", b.label, kind)
    server = start(kind, b, args.threads, providers=args.providers)
    try:
        if kind == "mixinfer":
            server.sample_rss("start")
        wrk(server, b, 32, args.warmup)  # warm-up: allocator, caches, ORT arenas; not recorded
        sent = 0
        if kind == "mixinfer":
            server.sample_rss("after warm-up")
        for conns in args.connections:
            before = batch_histogram(server) if kind == "mixinfer" else (0.0, 0.0)
            res = wrk(server, b, conns, args.duration * (args.throughput_factor if b.label == "throughput" else 1))
            if kind == "mixinfer" and conns == 32:
                after = batch_histogram(server)
                report.formed_batch[b.label] = ratio(after[0] - before[0], after[1] - before[1])
            sent += res["requests"]
            row = ClosedLoopRow.of(b.label, kind, conns, res)
            report.closed.append(row)
            log(
                "%s / %s @%d: %.0f req/s, p50 %.1f ms, p99 %.1f ms, non-2xx %d, client CPU share %.0f %%",
                b.label, kind, conns, row.rps, row.p50_ms, row.p99_ms, row.non_2xx, 100 * row.client_share,
            )  # fmt: skip
        if kind == "mixinfer" and b.label == "default" and not args.no_open_loop:
            report.open_loop = sweep(report, server, b, args)
            sent += sum(r.completed for r in report.open_loop)
        if kind == "mixinfer":
            server.sample_rss("after load")
            report.rss_mib[b.label] = dict(server.rss_mib)
            report.requests_to_mixinfer[b.label] = sent
    finally:
        code = server.stop()
        if code not in (0, None, -15):  # uvicorn re-raises SIGTERM after its graceful shutdown
            log("%s / %s exited with %s; log %s", b.label, kind, code, server.log_path)


# --- open loop ------------------------------------------------------------------------------------------------
def sweep(report: Report, server: Server, b: BundleUnderTest, args: argparse.Namespace) -> list[OpenLoopResult]:
    """Fixed arrival rates as fractions of the best closed-loop throughput, stopping once clearly saturated."""
    best = max(r.rps for r in report.closed if r.bundle == b.label and r.server == "mixinfer")
    bodies = [p.read_bytes() for p in b.inputs]
    results = []
    for frac in OPEN_LOOP_FRACTIONS:
        rate = max(1.0, frac * best)
        res = open_loop(server.base_url + "/predict", bodies, rate, args.open_loop_duration, max_conns=512)
        results.append(res)
        log(
            "open loop %.0f req/s (%.0f %% of max): achieved %.0f, p50 %.1f ms, p95 %.1f ms, p99 %.1f ms, "
            "errors %d, late %d, status %s",
            rate, 100 * frac, res.achieved_rps, res.p50_ms, res.p95_ms, res.p99_ms, res.errors, res.timed_out,
            res.status,
        )  # fmt: skip
        if res.achieved_rps < 0.8 * rate:
            break
    return results


# --- in-process engine ----------------------------------------------------------------------------------------
def engine_throughput(
    b: BundleUnderTest,
    threads: int | None,
    seconds: float,
    formed_batch: float | None = None,
    providers: str = CPU_PROVIDER,
) -> dict[str, float]:
    """``MIEngine`` (Combined) on the decoded bench inputs, no HTTP: images/s at batch 1 and 64, and process
    CPU-seconds per image (``time.process_time``, every thread of this process) at each batch and at the batch size
    the server formed at 32 clients (rounded), the engine's share of the combined floor."""
    from service.mi.engine import MIEngine
    from service.preprocess import ImageSpec, decode_image
    from service.store import load_bundle, open_backend

    bundle = load_bundle(b.path)
    backend = open_backend(bundle, providers=providers.split(","), intra_op_threads=threads)
    engine = MIEngine(backend, bundle.pool_labels, bundle.manifest.mi)
    spec = ImageSpec(*bundle.manifest.input.shape)
    x = np.stack([decode_image(p.read_bytes(), spec) for p in b.inputs])
    out: dict[str, float] = {}
    batches = [1, 64]
    formed = max(1, round(formed_batch)) if formed_batch and np.isfinite(formed_batch) else None
    if formed is not None and formed not in batches:
        batches.append(formed)
    # every input in turn, as the server sees them (the inputs are class-sorted pool images: a fixed first slice
    # would be one digit, and its flag rate, hence its share of OL calls, would not be the server's)
    ring = np.concatenate([x] * (1 + 64 // len(x))).astype(np.float32)
    flagged = []
    for batch in batches:
        starts = [(i * batch) % len(x) for i in range(len(x))]
        chunks = [ring[s : s + batch] for s in starts]
        engine(chunks[0])
        n, t0, cpu0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            res = engine(chunks[(n // batch) % len(chunks)])
            flagged.append(float(np.mean(res.flagged)))
            n += batch
        out[f"batch{batch}_img_s"] = n / (time.perf_counter() - t0)
        out[f"batch{batch}_cpu_s_per_img"] = (time.process_time() - cpu0) / n
    out["flag_rate"] = float(np.mean(flagged))
    if formed is not None:
        out["formed_batch"] = formed
        out["formed_batch_cpu_s_per_img"] = out[f"batch{formed}_cpu_s_per_img"]
    log("%s in-process engine: %s", b.label, {k: round(v, 6) for k, v in out.items()})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per closed-loop point")
    parser.add_argument(
        "--throughput-factor", type=float, default=2.0, help="longer points for the slow throughput bundle"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up load per server")
    parser.add_argument("--open-loop-duration", type=float, default=4.0, help="seconds per open-loop rate")
    parser.add_argument("--connections", default="1,8,32,64", help="closed-loop concurrency levels")
    parser.add_argument("--servers", default=",".join(SERVERS), help="subset of " + ",".join(SERVERS))
    parser.add_argument("--bundles", default="default,throughput", help="default, throughput or both")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ORT's)")
    parser.add_argument("--providers", default=CPU_PROVIDER, help="ONNX Runtime providers, in order (comma-separated)")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE, help="store of the default bundle")
    parser.add_argument("--name", default=DEFAULT_NAME, help="name of the default bundle")
    parser.add_argument("--no-open-loop", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 s points, for checking the harness")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results.md", help="markdown report path")
    args = parser.parse_args()
    args.connections = [int(c) for c in args.connections.split(",")]
    args.servers = [s for s in args.servers.split(",") if s]
    if args.quick:
        args.duration, args.warmup, args.open_loop_duration = 1.0, 1.0, 1.0
    if shutil.which("wrk") is None:
        log("wrk not found: install the Debian package `wrk` (apt-get install -y wrk)")
        return 2
    t_start = time.perf_counter()
    report = Report(machine=machine_info())
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    bundles = []
    for label in args.bundles.split(","):
        b = default_bundle(args) if label == "default" else throughput_bundle()
        bundles.append(b)
        report.bundles[b.label] = {"path": str(b.path), "note": b.note, "inputs": len(b.inputs)}
    for b in bundles:
        for kind in (k for k in args.servers if k in SERVERS_FOR[b.label]):
            closed_loop(report, b, kind, args)
        # after the servers: the engine runs at the batch size mixinfer formed at 32 clients
        seconds = max(1.0, args.duration / 2)
        report.engine[b.label] = engine_throughput(
            b, args.threads, seconds, report.formed_batch.get(b.label), args.providers
        )
    s = summary(report)
    s["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    text = markdown(report, s, args)
    args.out.write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    log("wrote %s in %.0f s", args.out, s["elapsed_s"])
    if args.json:
        emit_json(s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
